"""The typed configuration schema and its loader (YAML file + dotted ``key=value`` overrides).

Every section is a strict pydantic model: unknown keys and bad values are errors that name the
dotted key (``data.batch_size: Input should be greater than 0``), raised before anything starts.
Sections are added as the system grows; YAML files in ``jobs/`` are instances of the schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dinor1.data.collate import IMAGENET_MEAN, IMAGENET_STD
from dinor1.errors import UserError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    """Shards -> batches. Sizes are pixels; ``batch_size`` is per training worker."""

    train_shards: str | list[str] | None = None
    val_shards: str | list[str] | None = None
    batch_size: int = Field(4, gt=0)
    train_short_sides: list[int] = Field(
        default_factory=lambda: list(range(480, 801, 32)), min_length=1
    )
    train_max_size: int = Field(1333, gt=0)
    eval_short_side: int = Field(800, gt=0)
    eval_max_size: int = Field(1333, gt=0)
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0)
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    size_divisor: int = Field(1, gt=0)
    keep_crowd: bool = False
    seed: int = 0
    shuffle_files: bool = True
    local_shuffle_buffer: int = Field(256, ge=0)
    prefetch_batches: int = Field(2, ge=0)
    decode_concurrency: int | None = Field(None, gt=0)
    decode_num_cpus: float = Field(1.0, gt=0)
    decode_batch_size: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _positive_sides(self) -> DataConfig:
        if any(s <= 0 for s in self.train_short_sides):
            raise ValueError("train_short_sides must all be > 0")
        return self


M = TypeVar("M", bound=BaseModel)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML: ``2``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def validate(model: type[M], data: dict[str, Any], prefix: str = "") -> M:
    """Build ``model`` from ``data``; on failure, a UserError naming the first bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise UserError(f"config key {key!r}: {msg}") from None
