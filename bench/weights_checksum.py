"""Train a short fixed-seed run with ``data.preserve_order: true`` and print the SHA-256 of its
final weights: two trees that train the same print the same digest.

    python bench/weights_checksum.py OUT_DIR [key=value ...]

Used to show a refactor of the training side leaves what a run computes bit for bit unchanged
(run it on both trees; same digest). Real Ray Train, DeepSpeed ZeRO-2 over gloo, 2 CPU workers.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(out: Path, overrides: list[str]) -> str:
    from dinor1.config import load_train_config
    from dinor1.train.launch import run_training
    from tests.helpers import synthetic_train_shards

    shards = out / "shards"
    if not shards.exists():
        synthetic_train_shards(out, 64, 16)
    cfg = load_train_config(ROOT / "jobs" / "demo.yaml", [
        f"data.train_shards={shards}", "data.train_short_sides=[96]", "data.train_max_size=96",
        "data.preserve_order=true", "stages.max_steps_per_epoch=6", "stages.sft_epochs=1",
        "stages.grqo_epochs=2", "checkpointing.every_steps=5",
        f"checkpointing.storage_path={out / 'runs'}", "mlflow.log_every_steps=1",
        "eval.every_epochs=0", *overrides])
    result = run_training(cfg)
    assert result.error is None, result.error
    weights = out / "runs" / "demo" / "final_model" / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()


if __name__ == "__main__":
    print("weights sha256:", main(Path(sys.argv[1]), sys.argv[2:]))
