"""ONNX export (``dinor1/export.py``) measured: export time, size, the largest difference from
PyTorch on another input, and the time per forward of onnxruntime and of PyTorch on this
machine's CPU, in one run. Also tries torch's older TorchScript exporter and prints what fails.

    python bench/onnx_export.py [--preset tiny-cpu] [--size 96] [--prompts 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _time(fn, repeats: int = 5) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--size", type=int, default=96, help="image height and width")
    parser.add_argument("--prompts", type=int, default=3)
    args = parser.parse_args()
    import onnxruntime

    from dinor1.export import (
        INPUTS,
        PromptedDetection,
        check_onnx,
        example_inputs,
        export_onnx,
        exported_files,
    )
    from dinor1.model.dino_r1 import DinoR1

    torch.manual_seed(0)
    model = DinoR1.from_pretrained(args.preset).eval()
    shape = {"height": args.size, "width": args.size, "prompts": args.prompts}
    out = Path(tempfile.mkdtemp(prefix="dinor1-onnx-"))
    started = time.perf_counter()
    path = export_onnx(model, out / "dynamo.onnx", **shape)
    exported = time.perf_counter() - started
    difference = check_onnx(model, path, **shape)
    inputs = example_inputs(model, args.size, args.size, args.prompts, seed=1)
    graph = PromptedDetection(model)
    with torch.inference_mode():
        torch_seconds = _time(lambda: graph(*inputs))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: t.numpy() for name, t in zip(INPUTS, inputs)}
    ort_seconds = _time(lambda: session.run(None, feed))
    size = exported_files(path)[1]
    print(f"[onnx] {args.preset}, {args.size} px, {args.prompts} prompts: dynamo exporter "
          f"{exported:.0f} s, {size / 2**20:.1f} MiB with its weights, max |difference| "
          f"{difference:.2e}; a forward: PyTorch {1000 * torch_seconds:.1f} ms, onnxruntime "
          f"{1000 * ort_seconds:.1f} ms ({torch_seconds / ort_seconds:.2f}x)")
    legacy = out / "torchscript.onnx"
    try:
        with torch.no_grad():
            torch.onnx.export(graph, inputs, str(legacy), dynamo=False, opset_version=18,
                              input_names=list(INPUTS))
        onnxruntime.InferenceSession(str(legacy), providers=["CPUExecutionProvider"]).run(
            None, feed)
        print("[onnx] TorchScript exporter: runs in onnxruntime too")
    except Exception as exc:  # noqa: BLE001 - what fails is the result
        print(f"[onnx] TorchScript exporter: {type(exc).__name__}: {str(exc)[:300]}")


if __name__ == "__main__":
    main()
