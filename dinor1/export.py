"""``dinor1 export onnx``: the inference graph as ONNX, checked with onnxruntime.

The graph: an image batch and a fixed number of visual prompt embeddings (generic prompts, or
what :class:`~dinor1.api.Detector` averages from prompt boxes) -> per-query prompt scores and
boxes, the forward ``dinor1/api.py`` runs. Shapes are fixed at export (batch, image size,
prompt count). torch's ``dynamo`` exporter is used: its program has transformers' runtime shape
checks removed first (``aten._is_all_true`` has no ONNX function); the older TorchScript
exporter's graph does not run in onnxruntime (no ``GridSample`` for the deformable attention's
sampling). The text path (BERT) is not exported. Needs ``onnx``, ``onnxscript`` and, for the
check, ``onnxruntime`` (the ``export`` extra).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dinor1.errors import UserError

INPUTS = ("pixel_values", "pixel_mask", "prompts")
OUTPUTS = ("scores", "boxes")


class PromptedDetection(torch.nn.Module):
    """pixel_values [B, 3, H, W], pixel_mask [B, H, W], prompts [B, P, d] -> scores [B, Q, P],
    boxes [B, Q, 4] (normalised cx, cy, w, h)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_mask, prompts):
        out = self.model(pixel_values, pixel_mask, self.model.visual_prompts(prompts))
        return out.pred_logits.sigmoid(), out.pred_boxes


def example_inputs(model, height: int, width: int, prompts: int, batch: int = 1,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, height, width, generator=generator),
            torch.ones(batch, height, width, dtype=torch.long),
            torch.randn(batch, prompts, model.config.d_model, generator=generator))


def _without_checks(graph, example):
    """torch.export's program of ``graph`` without its runtime shape checks: transformers'
    deformable attention checks that the spatial shapes add up to the sequence length
    (``torch_compilable_check``), exported as ``aten._is_all_true`` + ``_assert_scalar``."""
    program = torch.export.export(graph, example)
    checks = (torch.ops.aten._assert_scalar.default, torch.ops.aten._assert_async.msg,
              torch.ops.aten._assert_async.default)
    for node in list(program.graph.nodes):
        if node.target in checks:
            program.graph.erase_node(node)
    program.graph.eliminate_dead_code()
    return program


def export_onnx(model, out: str | Path, *, height: int, width: int, prompts: int,
                batch: int = 1) -> Path:
    """Write ``model``'s :class:`PromptedDetection` graph to ``out`` (ONNX, opset 18)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise UserError(f"ONNX export needs the export extra: pip install 'dinor1[export]' "
                        f"({exc})") from exc
    import contextlib
    import io
    import warnings

    from dinor1.console import is_verbose

    graph = PromptedDetection(model.eval()).eval()
    example = example_inputs(model, height, width, prompts, batch)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quiet = not is_verbose()  # (the exporter prints its steps and warns about each op)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(
            io.StringIO()) if quiet else contextlib.nullcontext():
        if quiet:
            warnings.simplefilter("ignore")
        torch.onnx.export(_without_checks(graph, example), example, str(out), dynamo=True,
                          input_names=list(INPUTS), output_names=list(OUTPUTS),
                          opset_version=18)
    return out


def exported_files(path: str | Path) -> tuple[list[Path], int]:
    """The files an export wrote (the graph, and its weights beside it when large) and their
    bytes."""
    path = Path(path)
    files = [f for f in (path, path.with_name(path.name + ".data")) if f.is_file()]
    return files, sum(f.stat().st_size for f in files)


def check_onnx(model, path: str | Path, *, height: int, width: int, prompts: int,
               batch: int = 1) -> float:
    """Largest |difference| between onnxruntime (CPU) and PyTorch on an input other than the
    export's."""
    import numpy as np
    import onnxruntime

    inputs = example_inputs(model, height, width, prompts, batch, seed=1)
    with torch.inference_mode():
        expected = PromptedDetection(model.eval())(*inputs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: t.numpy() for name, t in zip(INPUTS, inputs)})
    return max(float(np.abs(a - b.numpy()).max()) for a, b in zip(got, expected))
