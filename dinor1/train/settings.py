"""What every Ray Train worker receives: the job's config plus what the driver resolved.

The driver (``train/launch.py``) builds a :class:`WorkerSettings`, hands it to Ray Train as a
plain dict (``train_loop_config`` is pickled to the workers) and each worker validates it back,
so the loop reads typed attributes (``settings.train.mlflow.log_every_steps``), never nested
string keys.
"""

from __future__ import annotations

from pydantic import Field

from dinor1.config import StrictModel, TrainConfig


class WorkerSettings(StrictModel):
    """The job's config and the paths, run ids and class lists the driver resolved for it."""

    train: TrainConfig
    mlflow_run_id: str | None = None  # the run the driver created (None: no tracking)
    tracking_uri: str = ""
    total_steps: int | None = None  # for the progress line's ETA (None when unknown)
    run_folder: str = ""  # local folder or object-store URI holding the checkpoints
    final_model_dir: str = ""  # where rank 0 exports the final weights
    mlflow_spool_dir: str | None = None  # rank 0 keeps what it logs during an MLflow outage
    # the val split's COCO categories (``eval.every_epochs``): [{"id", "name", ...}]
    eval_categories: list[dict] = Field(default_factory=list)
    start_from: str | None = None  # a checkpoint to branch from (``checkpointing.start_from``)
    class_names: dict[str, str] | None = None  # {id: name} for the contrastive loss, or None

    def for_ray(self) -> dict:
        """The dict Ray Train pickles to the workers (``train_loop_config``)."""
        return self.model_dump(mode="json")
