"""Class names -> Grounding DINO text prompts ("cat . dog . person .") and per-class scores.

A pretrained checkpoint brings its own tokenizer (``AutoTokenizer`` from the same directory or
hub name). A random-init preset has none and nothing can be downloaded here, so it gets an
offline word-level BERT tokenizer whose ids are a stable hash of each word into the preset's
vocabulary: the same word always maps to the same id, which is all a text encoder trained from
scratch needs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

# Grounding DINO hard-codes these BERT ids; every tokenizer used with it must keep them.
SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012,
               "?": 1029}


def offline_tokenizer(vocab_size: int, words: list[str]):
    """A word-level ``BertTokenizer`` covering ``words`` (lower-cased), ids stable per word."""
    from transformers import BertTokenizer

    vocab = dict(SPECIAL_IDS)
    free = [i for i in range(vocab_size) if i not in SPECIAL_IDS.values()]
    used = set(vocab.values())
    for word in sorted({w.lower() for name in words for w in _words(name)}):
        if word in vocab:
            continue
        slot = zlib.crc32(word.encode()) % len(free)
        while free[slot] in used:  # open addressing: collisions move to the next free id
            slot = (slot + 1) % len(free)
        vocab[word] = free[slot]
        used.add(free[slot])
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def _words(name: str) -> list[str]:
    return name.replace("_", " ").replace("-", " ").split()


def load_tokenizer(model_source: str | None, vocab_size: int, class_names: list[str]):
    """The checkpoint's own tokenizer when it has one, else :func:`offline_tokenizer`."""
    if model_source and (Path(model_source) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_source)
    return offline_tokenizer(vocab_size, class_names)


@dataclass
class TextPrompt:
    """One tokenised caption for a group of classes and where each class's tokens are."""

    input_ids: torch.Tensor  # [1, T]
    attention_mask: torch.Tensor  # [1, T]
    spans: list[tuple[int, int]]  # per class: [start, end) token positions


def class_captions(tokenizer, names: list[str], max_len: int) -> list[tuple[list[int], TextPrompt]]:
    """Split the class list into captions that fit ``max_len`` tokens.

    Returns (class indices, prompt) per caption; every class appears in exactly one caption.
    """
    pieces = [tokenizer(name.replace("_", " "), add_special_tokens=False)["input_ids"] or
              [SPECIAL_IDS["[UNK]"]] for name in names]
    groups: list[tuple[list[int], TextPrompt]] = []
    ids, spans, members = [SPECIAL_IDS["[CLS]"]], [], []
    for index, piece in enumerate(pieces):
        piece = piece[: max_len - 3]
        if len(ids) + len(piece) + 2 > max_len and members:
            groups.append((members, _prompt(ids, spans)))
            ids, spans, members = [SPECIAL_IDS["[CLS]"]], [], []
        spans.append((len(ids), len(ids) + len(piece)))
        ids.extend(piece + [SPECIAL_IDS["."]])
        members.append(index)
    groups.append((members, _prompt(ids, spans)))
    return groups


def _prompt(ids: list[int], spans: list[tuple[int, int]]) -> TextPrompt:
    tensor = torch.tensor([ids + [SPECIAL_IDS["[SEP]"]]])
    return TextPrompt(input_ids=tensor, attention_mask=torch.ones_like(tensor), spans=spans)


def class_logits(token_logits: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Per-token logits [..., T] -> per-class logits [..., C]: max over each class's tokens."""
    return torch.stack([token_logits[..., a:b].max(-1).values for a, b in spans], -1)


@torch.no_grad()
def class_text_embeddings(model, tokenizer, names: dict[int, str]) -> dict[int, torch.Tensor]:
    """``t_u`` of the visual-text contrastive loss: each class name through the (frozen) text
    encoder and projection, averaged over the name's tokens.

    Args:
        model: a :class:`~dinor1.model.dino_r1.DinoR1`.
        tokenizer: :func:`load_tokenizer`'s.
        names: {category id: class name}.

    Returns:
        {category id: [d] embedding} on the model's device, without a graph.
    """
    device = next(model.parameters()).device
    ids = sorted(names)
    out: dict[int, torch.Tensor] = {}
    for members, prompt in class_captions(tokenizer, [names[i] for i in ids],
                                          model.config.max_text_len):
        tokens = model.text_prompts(prompt.input_ids.to(device),
                                    prompt.attention_mask.to(device)).embeddings[0]  # [T, d]
        for member, (start, end) in zip(members, prompt.spans):
            out[ids[member]] = tokens[start:end].float().mean(0)
    return out
