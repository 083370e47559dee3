"""Named model sizes (random init) and the Grounding DINO configs behind them.

``tiny-cpu`` trains on 2 CPU cores in minutes; ``swin-t`` / ``swin-b`` / ``swin-l`` match the
paper's DINO-R1-T / -B / -L (Swin backbone, d_model 256, 6 encoder + 6 decoder layers, 900
queries, BERT-base text encoder). Pretrained starting points are Hugging Face Grounding DINO
checkpoints instead (a local directory, or a hub name on a machine that can download), see
:meth:`dinor1.model.dino_r1.DinoR1.from_pretrained`.
"""

from __future__ import annotations

from transformers import BertConfig, GroundingDinoConfig, SwinConfig

# Grounding DINO hard-codes the BERT ids of [CLS], [SEP], "." and "?" (101, 102, 1012, 1029),
# so even a tiny text vocabulary must reach past 1029.
TINY_TEXT_VOCAB = 1100


def _swin(embed_dim: int, depths, heads, window: int, image_size: int = 224) -> SwinConfig:
    return SwinConfig(embed_dim=embed_dim, depths=list(depths), num_heads=list(heads),
                      window_size=window, image_size=image_size, out_indices=[2, 3, 4])


def _bert_base() -> BertConfig:
    return BertConfig()  # bert-base-uncased shape: 12 layers, hidden 768


def tiny_cpu() -> GroundingDinoConfig:
    return GroundingDinoConfig(
        backbone_config=_swin(16, [1, 1, 1, 1], [1, 2, 2, 4], window=4, image_size=128),
        text_config=BertConfig(vocab_size=TINY_TEXT_VOCAB, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=64),
        d_model=64,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        num_queries=50,
        num_feature_levels=4,
        max_text_len=64,
        dropout=0.0,
        fusion_droppath=0.0,
    )


def swin_t() -> GroundingDinoConfig:
    return GroundingDinoConfig(
        backbone_config=_swin(96, [2, 2, 6, 2], [3, 6, 12, 24], window=7),
        text_config=_bert_base(),
    )


def swin_b() -> GroundingDinoConfig:
    return GroundingDinoConfig(
        backbone_config=_swin(128, [2, 2, 18, 2], [4, 8, 16, 32], window=12, image_size=384),
        text_config=_bert_base(),
    )


def swin_l() -> GroundingDinoConfig:
    return GroundingDinoConfig(
        backbone_config=_swin(192, [2, 2, 18, 2], [6, 12, 24, 48], window=12, image_size=384),
        text_config=_bert_base(),
    )


PRESETS = {"tiny-cpu": tiny_cpu, "swin-t": swin_t, "swin-b": swin_b, "swin-l": swin_l}


def preset_config(name: str) -> GroundingDinoConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
