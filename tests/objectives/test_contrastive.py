"""Visual-text contrastive loss, by hand."""

import math

import pytest
import torch

from dinor1.objectives.contrastive import VisualTextContrastive, mean_instance_embeddings


def test_symmetric_infonce_by_hand():
    loss_fn = VisualTextContrastive(init_log_scale=0.0)  # scale 1: logits are the cosines
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    # cosines: identity -> each row's CE = -log(e^1 / (e^1 + e^0))
    expected = -math.log(math.e / (math.e + 1))
    assert loss_fn(visual, text).item() == pytest.approx(expected, abs=1e-6)
    swapped = loss_fn(visual, text.flip(0))
    assert swapped.item() > loss_fn(visual, text).item()
    swapped.backward()
    assert loss_fn.log_scale.grad is not None


def test_single_class_and_instance_means():
    loss_fn = VisualTextContrastive()
    assert loss_fn(torch.ones(1, 4), torch.ones(1, 4)).item() == 0.0
    instances = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[0.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    labels = [torch.tensor([5, 7]), torch.tensor([5])]
    means = mean_instance_embeddings(instances, mask, labels, torch.tensor([5, 7]))
    torch.testing.assert_close(means, torch.tensor([[0.5, 1.0], [3.0, 0.0]]))
