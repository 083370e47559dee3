"""DINO-R1 model: text-path parity with transformers, visual prompts, CDN, reference, save/load."""

import pytest
import torch
from transformers import GroundingDinoForObjectDetection

from dinor1.model.denoising import build_denoising_queries
from dinor1.model.dino_r1 import DinoR1
from dinor1.model.presets import tiny_cpu
from dinor1.model.prompts import GenericPrompts, assemble_training_prompts, build_generic_prompts


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DinoR1(tiny_cpu()).eval()


def _images(batch=2, height=96, width=128):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, height, width, generator=g)
    mask = torch.ones(batch, height, width, dtype=torch.long)
    mask[1, :, 96:] = 0  # second image padded on the right
    pixels[1, :, :, 96:] = 0
    return pixels, mask


def _batch_targets():
    boxes = [torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.2, 0.2]]),
             torch.tensor([[0.5, 0.5, 0.3, 0.3]])]
    labels = [torch.tensor([3, 5]), torch.tensor([5])]
    return boxes, labels


def test_text_path_matches_transformers(model):
    pixels, mask = _images()
    ids = torch.tensor([[101, 1050, 1012, 1060, 1070, 1012, 102],
                        [101, 1055, 1012, 102, 0, 0, 0]])
    attention = (ids != 0).long()
    with torch.no_grad():
        ref = model.gdino(pixel_values=pixels, pixel_mask=mask, input_ids=ids,
                          attention_mask=attention)
        ours = model(pixels, mask, model.text_prompts(ids, attention))
    tokens = ids.shape[1]
    expected = ref.logits[..., :tokens]
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(ours.pred_logits))
    torch.testing.assert_close(ours.pred_logits[finite], expected[finite], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.pred_boxes, ref.pred_boxes, atol=1e-5, rtol=1e-5)
    assert isinstance(model.gdino, GroundingDinoForObjectDetection)


def test_visual_prompts_shapes_padding_and_other_images(model):
    pixels, mask = _images()
    boxes, labels = _batch_targets()
    features = model.image_features(pixels, mask)
    prompts = assemble_training_prompts(model, features, boxes, labels,
                                        generator=torch.Generator().manual_seed(0))
    # categories 3 and 5 -> 2 prompts shared by both images; image 1 has no category-3 box, so
    # the category-3 prompt (taken from image 0) is a negative for it
    assert prompts.category_ids.tolist() == [3, 5]
    assert [t.tolist() for t in prompts.target_labels] == [[0, 1], [1]]
    assert prompts.exemplars[0, 0].tolist() == [0, 0]
    embeddings = prompts.embeddings[None].expand(2, -1, -1)
    prompt_mask = torch.tensor([[True, True], [True, True]])
    # pad the prompt list to 3 to check padded prompts never score
    embeddings = torch.cat([embeddings, torch.zeros(2, 1, embeddings.shape[-1])], 1)
    prompt_mask = torch.cat([prompt_mask, torch.zeros(2, 1, dtype=torch.bool)], 1)
    out = model(pixels, mask, model.visual_prompts(embeddings, prompt_mask), features=features)
    layers, queries = tiny_cpu().decoder_layers, tiny_cpu().num_queries
    assert out.logits.shape == (layers, 2, queries, 3)
    assert out.boxes.shape == (layers, 2, queries, 4)
    assert out.encoder_logits.shape == (2, queries, 3) and out.selected_indices.shape == (2, queries)
    assert torch.isinf(out.logits[..., 2]).all() and torch.isfinite(out.logits[..., :2]).all()
    assert ((out.boxes >= 0) & (out.boxes <= 1)).all()
    torch.testing.assert_close(out.objectness, out.encoder_logits.max(-1).values)
    # padded image: selection never picks padding tokens
    valid = features.valid.gather(1, out.selected_indices)
    assert valid.all()


def test_gradient_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    model = DinoR1(tiny_cpu()).train()
    pixels, mask = _images()
    boxes, labels = _batch_targets()
    features = model.image_features(pixels, mask)
    prompts = assemble_training_prompts(model, features, boxes, labels)
    embeddings = prompts.embeddings[None].expand(2, -1, -1)
    targets = [{"labels": lab, "boxes": b} for lab, b in zip(prompts.target_labels, boxes)]
    dn = build_denoising_queries(targets, embeddings, model.config.num_queries,
                                 generator=torch.Generator().manual_seed(0))
    out = model(pixels, mask, model.visual_prompts(embeddings), features=features, denoising=dn)
    assert out.dn_logits.shape[:3] == (model.config.decoder_layers, 2, dn.meta.num_dn)
    loss = (out.logits.sigmoid().sum() + out.boxes.sum() + out.encoder_logits.sigmoid().sum()
            + out.encoder_boxes.sum() + out.dn_logits.sigmoid().sum() + out.dn_boxes.sum())
    loss.backward()
    text_only = ("gdino.model.text_backbone", "gdino.model.text_projection",
                 "gdino.model.encoder_output_class_embed", "gdino.class_embed")
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and p.grad is None and not name.startswith(text_only)]
    assert not missing, missing[:10]


def test_reference_forward_matches_full_forward(model):
    pixels, mask = _images()
    features = model.image_features(pixels, mask)
    boxes = torch.tensor([[[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.2, 0.2]]] * 2)
    embeddings = model.encode_boxes(features, boxes)
    with torch.no_grad():
        full = model(pixels, mask, model.visual_prompts(embeddings))
        ref = model.reference_forward(pixels, mask, embeddings)
        ref_boxes = model.reference_forward(pixels, mask, prompt_boxes=boxes)
    at_selected = ref.token_objectness.gather(1, full.selected_indices)
    torch.testing.assert_close(at_selected, full.objectness)
    torch.testing.assert_close(ref_boxes.token_objectness, ref.token_objectness)
    assert torch.equal(ref.selected_indices, full.selected_indices)


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                  "model.safetensors"]
    loaded = DinoR1.from_pretrained(str(tmp_path / "m")).eval()
    pixels, mask = _images()
    boxes = torch.tensor([[[0.3, 0.4, 0.2, 0.3]]] * 2)
    with torch.no_grad():
        outs = []
        for m in (model, loaded):
            feats = m.image_features(pixels, mask)
            outs.append(m(pixels, mask, m.visual_prompts(m.encode_boxes(feats, boxes)),
                          features=feats))
    assert torch.equal(outs[0].logits, outs[1].logits)
    assert torch.equal(outs[0].boxes, outs[1].boxes)


def test_from_pretrained_grounding_dino_checkpoint(tmp_path):
    """A Hugging Face Grounding DINO directory is a valid starting point."""
    torch.manual_seed(3)
    hf = GroundingDinoForObjectDetection(tiny_cpu())
    hf.save_pretrained(tmp_path / "gdino")
    model = DinoR1.from_pretrained(str(tmp_path / "gdino"))
    for (name, a), (_, b) in zip(hf.state_dict().items(), model.gdino.state_dict().items()):
        assert torch.equal(a, b), name


def test_generic_prompts_build_save_load(model, tmp_path):
    pixels, mask = _images()
    boxes, labels = _batch_targets()
    batch = {"pixel_values": pixels, "pixel_mask": mask, "boxes": torch.cat(boxes),
             "class_labels": torch.cat(labels), "num_boxes": torch.tensor([2, 1])}
    generic = build_generic_prompts(model, [batch], {3: "red star", 5: "blue ring"}, per_class=4)
    assert generic.embeddings.shape == (2, model.config.d_model) and generic.counts == [1, 2]
    generic.save(tmp_path / "prompts.safetensors")
    again = GenericPrompts.load(tmp_path / "prompts.safetensors")
    assert again.names == ["red star", "blue ring"] and again.category_ids == [3, 5]
    assert torch.equal(again.embeddings, generic.embeddings)
    with pytest.raises(ValueError, match="no instance"):
        build_generic_prompts(model, [batch], {9: "absent"})


def test_paper_size_presets():
    """-T / -B / -L: Swin-T/B/L, d_model 256, 6 + 6 layers, 900 queries (configs only: building
    the -L weights takes minutes on this CPU)."""
    from dinor1.model.presets import PRESETS, preset_config

    embed = {"swin-t": 96, "swin-b": 128, "swin-l": 192}
    for name, dim in embed.items():
        cfg = preset_config(name)
        assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.num_queries) == (
            256, 6, 6, 900)
        assert cfg.backbone_config.embed_dim == dim
    assert set(PRESETS) == {"tiny-cpu", "swin-t", "swin-b", "swin-l"}
    with pytest.raises(KeyError, match="unknown model preset"):
        preset_config("swin-xl")
