"""`checkpointing.storage_path` on an object store (s3://): Ray Train's checkpoints, the run-id
file, the resolved config and the final weights land in the bucket; a new run branches from the
bucket's newest checkpoint; `dinor1 eval`'s checkpoint resolver loads the weights from there.

The bucket is a real S3-compatible server (moto's, on 127.0.0.1) standing in for the cloud;
credentials come from the environment, as on a cluster with instance roles."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pyarrow.fs as pafs
import pytest

from dinor1 import storage
from dinor1.config import load_train_config, resolve_paths
from dinor1.errors import UserError
from tests.helpers import subprocess_env, synthetic_train_shards

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


def test_object_store_storage_needs_a_tracking_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_train_config(ROOT / "jobs" / "demo.yaml",
                            ["checkpointing.storage_path=s3://bucket/runs"])
    with pytest.raises(UserError, match="mlflow.tracking_uri"):
        resolve_paths(cfg)
    cfg = load_train_config(ROOT / "jobs" / "demo.yaml", [
        "checkpointing.storage_path=s3://bucket/runs?endpoint_override=h:1",
        "mlflow.tracking_uri=http://127.0.0.1:5000", "mlflow.run_name=r"])
    location, name, uri = resolve_paths(cfg)
    assert storage.join(location, name, "x") == "s3://bucket/runs/r/x?endpoint_override=h:1"


def _train(tmp_path, address: str, location: str, tracking: str, *extra: str):
    env = subprocess_env(**CREDENTIALS)
    return subprocess.run(
        [str(BIN / "dinor1"), "train", "jobs/demo.yaml", "--address", address,
         f"data.train_shards={tmp_path / 'shards'}",
         "data.train_short_sides=[96]", "data.train_max_size=96", "stages.max_steps_per_epoch=2",
         "stages.grqo_epochs=0", "checkpointing.every_steps=2",
         f"checkpointing.storage_path={location}", f"mlflow.tracking_uri={tracking}",
         "mlflow.log_every_steps=1", *extra],
        env=env, capture_output=True, text=True, timeout=540, cwd=ROOT)


@pytest.mark.ray
@pytest.mark.slow
def test_training_checkpoints_to_s3_and_branches_from_there(tmp_path, s3_server, monkeypatch,
                                                           ray_address):
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DINOR1_CACHE", str(tmp_path / "cache"))
    query = f"endpoint_override=127.0.0.1:{s3_server}&scheme=http"
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{s3_server}", scheme="http",
                      allow_bucket_creation=True).create_dir("bucket")
    synthetic_train_shards(tmp_path, 32, 8)
    location = f"s3://bucket/runs?{query}"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"

    first = _train(tmp_path, ray_address, location, tracking, "stages.sft_epochs=2", "mlflow.run_name=first")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    run_folder = storage.join(location, "first")
    run_id = storage.read_text(storage.join(run_folder, "mlflow_run_id")).strip()
    assert storage.exists(storage.join(run_folder, "resolved_config.yaml"))
    assert storage.exists(storage.join(run_folder, "final_model", "config.json"))
    checkpoints = storage.subfolders(run_folder, "checkpoint_")
    assert len(checkpoints) == 2  # steps 2 and 4 (num_to_keep 2)
    assert not (tmp_path / "runs").exists() and not (ROOT / "bucket").exists()

    branch = _train(tmp_path, ray_address, location, tracking, "stages.sft_epochs=3",
                    "mlflow.run_name=branch", f"checkpointing.start_from={run_folder}")
    assert branch.returncode == 0, branch.stdout[-2000:] + branch.stderr[-4000:]
    client = mlflow.MlflowClient(tracking)
    branch_id = storage.read_text(storage.join(location, "branch", "mlflow_run_id")).strip()
    assert [m.value for m in client.get_metric_history(branch_id, "resume/step")] == [4.0]
    steps = [m.step for m in client.get_metric_history(branch_id, "loss/total")]
    assert steps == [5, 6]
    assert json.loads(client.get_run(run_id).data.tags["dinor1.workers"])[0]["steps"] == 4

    from dinor1.eval.evaluate import load_model, resolve_checkpoint

    source = resolve_checkpoint(run_folder)
    assert source.train_run_id == run_id and source.path.startswith("s3://bucket/runs/first/")
    assert sum(p.numel() for p in load_model(source).parameters()) > 0
    # one local copy per final model, downloaded once: each run's (logged to MLflow from it at
    # the end of training), and load_model's of the first run reused it
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 2 and all((c / "config.json").is_file() for c in cached)
    with pytest.raises(UserError, match="no config.json"):
        resolve_checkpoint(storage.join(location, "missing"))
