"""Checkpoint files are read with torch.load(weights_only=True): a pickled payload is refused
instead of run. (Real DeepSpeed checkpoints load through the same engine in the resume, branch
and object-store tests.)"""

import pathlib

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from dinor1.train.safe_load import WeightsOnlyCheckpointEngine


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a hostile checkpoint would do on unpickling
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"x": torch.ones(2)}, "evil": _Payload(marker)}, path)

    with pytest.raises(Exception, match="Weights only load failed"):
        WeightsOnlyCheckpointEngine().load(str(path), map_location="cpu")
    assert not marker.exists()

    TorchCheckpointEngine().load(str(path), map_location="cpu")  # DeepSpeed's default engine
    assert marker.exists()  # ... runs the payload: why dinor1 swaps it out


def test_tensors_and_deepspeed_state_holders_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "state.pt"
    state = {"w": torch.arange(4.0), "loss_scaler": LossScaler(1.0),
             "zero_stage": ZeroStageEnum.gradients, "step": 3}
    torch.save(state, path)
    loaded = WeightsOnlyCheckpointEngine().load(str(path), map_location="cpu")
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3
    assert loaded["zero_stage"] == ZeroStageEnum.gradients
    assert isinstance(loaded["loss_scaler"], LossScaler)
