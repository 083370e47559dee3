"""Bad input, counted: samples skipped by kind, annotation boxes dropped by rule.

Nothing a shard holds stops a read (see :mod:`dinor1.data.datasource`); what cannot be used is
left out and counted here, so a run reports exactly what it did not train or score on.

A skipped sample is a row whose ``error`` is ``"<kind>: <message naming the shard and key>"``;
the kinds (:data:`SKIP_KINDS`):

====================  ==========================================================================
``corrupt_shard``     the rest of a shard cannot be read (truncated, not a tar, zero bytes, no
                      end-of-archive marker): one row per shard; the samples it held past the
                      break are unknown
``truncated_sample``  the sample being read when its shard broke off
``missing_image``     a key with no ``.jpg``/``.png`` member
``missing_json``      a key with no ``.json`` member
``refused_member``    a key with a pickle-capable member (``.pkl``, ``.pt``, ...): never unpickled
``duplicate_member``  a key with two image members, or whose members are not adjacent
``bad_json``          annotation JSON that does not parse or lacks ``image_id``/``annotations``
``bad_image``         image bytes that do not decode (truncated, garbage)
``other``             anything else (an error without a known kind prefix)
====================  ==========================================================================

A kept sample's annotations are cleaned by
:func:`dinor1.data_pipelines.annotations.clean_annotations`; the boxes it drops are counted by
rule (:data:`DROP_RULES`: ``unknown_category``, ``invalid_box`` (not 4 finite numbers, width or
height <= 0, or not an annotation object), ``box_outside_image``). Boxes partly outside the image
are clipped and kept, and counted apart as ``clipped``. Crowd boxes left out by
``data.keep_crowd=false`` are a choice, not bad input, and are not counted.

:class:`QualityCounter` keeps the totals of one rank and sums them over all ranks for logging::

    quality = QualityCounter()
    for batch in batches:
        quality.update(batch)
    metrics = quality.metrics("data/")  # collective under torch.distributed: every rank calls
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SKIP_KINDS = (
    "corrupt_shard",
    "truncated_sample",
    "missing_image",
    "missing_json",
    "refused_member",
    "duplicate_member",
    "bad_json",
    "bad_image",
    "other",
)
DROP_RULES = ("unknown_category", "invalid_box", "box_outside_image")
CLIPPED = "clipped_box"  # the clean_annotations stats key of the one fix-up that keeps the box


def skip_error(kind: str, message: str) -> str:
    """The ``error`` of a skipped row: ``"<kind>: <message>"`` (``kind`` from SKIP_KINDS)."""
    if kind not in SKIP_KINDS:
        raise ValueError(f"unknown skip kind {kind!r}; choose one of {SKIP_KINDS}")
    return f"{kind}: {message}"


def skip_kind(error: str) -> str:
    """The kind a skipped row's ``error`` carries (see :func:`skip_error`); ``other`` if none."""
    kind = error.split(":", 1)[0]
    return kind if kind in SKIP_KINDS else "other"


def count_kinds(errors: Iterable[str]) -> list[int]:
    """Skipped-row errors -> counts in :data:`SKIP_KINDS` order."""
    counts = [0] * len(SKIP_KINDS)
    for error in errors:
        counts[SKIP_KINDS.index(skip_kind(error))] += 1
    return counts


def drop_counts(stats: Mapping[str, int]) -> list[int]:
    """``clean_annotations`` stats -> dropped boxes in :data:`DROP_RULES` order."""
    return [int(stats.get(rule, 0)) for rule in DROP_RULES]


def encode_errors(errors: Sequence[str]):
    """Messages -> uint8 tensor [L] of their UTF-8, one per line (empty when none).

    A tensor because collated batches hold only tensors (Ray moves them to the device).
    """
    import torch  # here, not at the top: the Ray Data read and decode tasks never need it

    data = "\n".join(e.replace("\n", " ") for e in errors).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.zeros(0, dtype=torch.uint8)


def decode_errors(data) -> list[str]:
    """The inverse of :func:`encode_errors` (the tensor may be on any device)."""
    text = bytes(data.cpu().numpy().tobytes()).decode(errors="replace")
    return text.split("\n") if text else []


class QualityCounter:
    """Skipped samples by kind, dropped boxes by rule and clipped boxes, as running totals.

    Args:
        max_errors: how many skipped-sample messages to keep (the first ones; ``None``: all).

    The counts are plain ints and :meth:`state_dict` is plain JSON, so a training loop can keep
    it in its checkpoint and resume the counts.
    """

    def __init__(self, max_errors: int | None = 50):
        self.max_errors = max_errors
        self.skipped = dict.fromkeys(SKIP_KINDS, 0)
        self.dropped = dict.fromkeys(DROP_RULES, 0)
        self.clipped = 0
        self.errors: list[str] = []

    @property
    def skipped_samples(self) -> int:
        return sum(self.skipped.values())

    @property
    def dropped_boxes(self) -> int:
        return sum(self.dropped.values())

    def _keep_errors(self, errors: Iterable[str]) -> None:
        room = None if self.max_errors is None else self.max_errors - len(self.errors)
        if room is None or room > 0:
            self.errors.extend(list(errors)[:room])

    def add_skipped(self, errors: Iterable[str]) -> None:
        """Count skipped rows by the kind their ``error`` carries, keeping the messages."""
        errors = list(errors)
        for kind, n in zip(SKIP_KINDS, count_kinds(errors)):
            self.skipped[kind] += n
        self._keep_errors(errors)

    def add_boxes(self, dropped_by_rule: Sequence[int], clipped: int = 0) -> None:
        """Add dropped boxes (counts in :data:`DROP_RULES` order) and clipped boxes."""
        for rule, n in zip(DROP_RULES, dropped_by_rule, strict=True):
            self.dropped[rule] += int(n)
        self.clipped += int(clipped)

    def update(self, batch: Mapping[str, Any]) -> None:
        """Add one batch of :class:`~dinor1.data.collate.DetectionCollateFn` (its
        ``skipped_by_kind`` [K], ``dropped_by_rule`` [R], ``clipped_boxes`` [] and
        ``skipped_errors`` [L] tensors)."""
        for kind, n in zip(SKIP_KINDS, batch["skipped_by_kind"].tolist(), strict=True):
            self.skipped[kind] += int(n)
        self.add_boxes(batch["dropped_by_rule"].tolist(), int(batch["clipped_boxes"]))
        self._keep_errors(decode_errors(batch["skipped_errors"]))

    def merge(self, other: QualityCounter) -> None:
        """Add another counter's counts (and messages, up to ``max_errors``)."""
        for kind, n in other.skipped.items():
            self.skipped[kind] += n
        self.add_boxes([other.dropped[r] for r in DROP_RULES], other.clipped)
        self._keep_errors(other.errors)

    def state_dict(self) -> dict:
        """This counter as plain JSON: ``{"skipped": {kind: n}, "dropped": {rule: n},
        "clipped": n, "errors": [...]}``."""
        return {"skipped": dict(self.skipped), "dropped": dict(self.dropped),
                "clipped": self.clipped, "errors": list(self.errors)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the counts with saved ones (kinds unknown to this version count as ``other``).

        Saved totals are sums over all ranks (:meth:`totals`): under data parallelism load them
        on one rank only, or :meth:`metrics` counts them once per rank.
        """
        self.skipped = dict.fromkeys(SKIP_KINDS, 0)
        for kind, n in state.get("skipped", {}).items():
            self.skipped[kind if kind in SKIP_KINDS else "other"] += int(n)
        self.dropped = {rule: int(state.get("dropped", {}).get(rule, 0)) for rule in DROP_RULES}
        self.clipped = int(state.get("clipped", 0))
        self.errors = []
        self._keep_errors(state.get("errors", []))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], max_errors: int | None = 50):
        """A counter holding saved counts (see :meth:`load_state_dict`)."""
        counter = cls(max_errors)
        counter.load_state_dict(state)
        return counter

    def totals(self) -> QualityCounter:
        """A counter holding the counts summed over all ranks (this rank's messages).

        Collective when ``torch.distributed`` is initialised: every rank must call it, at the
        same point (one ``all_reduce``, on the current CUDA device under NCCL). Otherwise a copy.
        """
        import torch
        import torch.distributed as dist

        out = QualityCounter.from_state_dict(self.state_dict(), self.max_errors)
        if not (dist.is_available() and dist.is_initialized()):
            return out
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        values = [self.skipped[k] for k in SKIP_KINDS] + [self.dropped[r] for r in DROP_RULES]
        summed = torch.tensor(values + [self.clipped], dtype=torch.int64, device=device)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        summed = summed.tolist()
        out.skipped = dict(zip(SKIP_KINDS, summed[:len(SKIP_KINDS)]))
        out.dropped = dict(zip(DROP_RULES, summed[len(SKIP_KINDS):-1]))
        out.clipped = summed[-1]
        return out

    def metrics(self, prefix: str = "data/", *, reduce: bool = True) -> dict[str, float]:
        """``{prefix}skipped_samples``, ``{prefix}skipped/<kind>`` (every kind),
        ``{prefix}dropped_boxes``, ``{prefix}dropped_boxes/<rule>`` (every rule) and
        ``{prefix}clipped_boxes``.

        Summed over all ranks (a collective, see :meth:`totals`) unless ``reduce=False``.
        """
        counts = self.totals() if reduce else self
        out = {f"{prefix}skipped_samples": float(counts.skipped_samples)}
        out.update({f"{prefix}skipped/{k}": float(n) for k, n in counts.skipped.items()})
        out[f"{prefix}dropped_boxes"] = float(counts.dropped_boxes)
        out.update({f"{prefix}dropped_boxes/{r}": float(n) for r, n in counts.dropped.items()})
        out[f"{prefix}clipped_boxes"] = float(counts.clipped)
        return out

    def gather_errors(self) -> list[str]:
        """Every rank's kept messages, in rank order (this rank's alone without
        ``torch.distributed``). Collective (``all_gather_object``): every rank must call it."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return list(self.errors)
        everyone: list[list[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, self.errors)
        return [e for part in everyone for e in part or []]
