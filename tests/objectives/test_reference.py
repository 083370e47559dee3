"""The GRQO reference model: frozen, refreshed only when its policy says so."""

import pytest
import torch

from dinor1.model.dino_r1 import DinoR1
from dinor1.model.presets import tiny_cpu
from dinor1.model.prompts import assemble_training_prompts
from dinor1.objectives.reference import ReferenceModel, parse_refresh


def _batch():
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 64, 64, dtype=torch.long)
    boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2]]), torch.tensor([[0.6, 0.6, 0.3, 0.3]])]
    labels = [torch.tensor([1]), torch.tensor([2])]
    return pixels, mask, boxes, labels


def test_refresh_policies():
    assert parse_refresh("epoch") == ("epoch", 0) and parse_refresh("steps:25") == ("steps", 25)
    with pytest.raises(ValueError, match="ref_refresh"):
        parse_refresh("steps:x")


def test_reference_is_frozen_until_refresh_and_matches_policy_objectness():
    torch.manual_seed(0)
    policy = DinoR1(tiny_cpu()).train()
    policy.eval()  # same dropout state as the reference for the comparison below
    reference = ReferenceModel(policy, refresh="steps:2")
    assert all(not p.requires_grad for p in reference.model.parameters())
    pixels, mask, boxes, labels = _batch()
    features = policy.image_features(pixels, mask)
    prompts = assemble_training_prompts(policy, features, boxes, labels)
    out = policy(pixels, mask, policy.visual_prompts(prompts.embeddings[None].expand(2, -1, -1)),
                 features=features)
    ref = reference.objectness(pixels, mask, boxes, prompts.exemplars, out.selected_indices)
    torch.testing.assert_close(ref, out.objectness.detach(), atol=1e-5, rtol=1e-5)

    before = {k: v.clone() for k, v in reference.model.state_dict().items()}
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    (out.logits.sigmoid().sum() + out.objectness.sum()).backward()
    optimizer.step()
    after_step = reference.model.state_dict()
    assert all(torch.equal(before[k], after_step[k]) for k in before)
    assert not reference.should_refresh(step=1, new_epoch=True)
    assert reference.should_refresh(step=2, new_epoch=False)
    reference.refresh(policy, step=2)
    refreshed = reference.model.state_dict()
    policy_state = policy.state_dict()
    assert any(not torch.equal(before[k], refreshed[k]) for k in before)
    assert all(torch.equal(policy_state[k], refreshed[k]) for k in refreshed
               if k not in reference.pruned)
    # the weights its forward never runs (text encoder, decoder) are not kept
    assert any(k.startswith("gdino.model.text_backbone.") for k in reference.pruned)
    assert all(k.startswith(("gdino.model.text_backbone.", "gdino.model.decoder."))
               for k in reference.pruned)
    assert all(refreshed[k].numel() == 0 for k in reference.pruned)
    stats = reference.stats()
    assert stats["reference/refreshes"] == 2 and stats["reference/param_megabytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_reference_under_deepspeed(stage):
    """Real DeepSpeed (gloo on CPU): a ZeRO-3 engine's partitioned weights are gathered."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("zero_reference_check.py")
    proc = subprocess.run([sys.executable, str(script), str(stage)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"ZeRO-{stage}: reference holds" in proc.stdout
