"""`ray job submit` and `dinor1 submit` of jobs/demo.yaml to one real Ray head on 127.0.0.1,
tracked by a real `mlflow server` on 127.0.0.1 (the first) and MLflow on sqlite (the second).
Everything started here is stopped here, by PID."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from dinor1.local_cluster import pids_of_ray
from tests.helpers import (
    MlflowServer,
    free_port,
    subprocess_env,
    synthetic_train_shards,
    wait_http,
    write_image,
)

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent




@pytest.fixture(scope="module")
def ray_head():
    # a short path of its own: Ray puts unix sockets under it (108-byte limit) and every Ray
    # process of this head names it or descends from one that does: how the fixture finds the
    # PIDs to stop
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    port, dashboard = free_port(), free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
                    "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                    str(dashboard), "--dashboard-agent-listen-port", str(free_port()),
                    "--num-cpus", "4", "--temp-dir", str(temp_dir),
                    "--include-dashboard", "true", "--disable-usage-stats"],
                   env=subprocess_env(), check=True, capture_output=True, timeout=120)
    try:
        wait_http(f"http://127.0.0.1:{dashboard}/api/version")
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        for pid in pids_of_ray(str(temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_demo_job(ray_head, mlflow_server, tmp_path):
    synthetic_train_shards(tmp_path, 80, 20)
    # the documented command (README "Running on a Ray cluster"), with small overrides
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1"}, "working_dir": str(ROOT)}
    command = [
        str(BIN / "ray"), "job", "submit", "--address", ray_head,
        "--runtime-env-json", json.dumps(runtime_env), "--submission-id", "dinor1-test-job", "--",
        "python", "-m", "dinor1.cli", "train", "jobs/demo.yaml",
        f"data.train_shards={tmp_path / 'shards'}",
        "data.train_short_sides=[96]", "data.train_max_size=96",
        "stages.max_steps_per_epoch=2", "stages.sft_epochs=1", "stages.grqo_epochs=1",
        f"checkpointing.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri={mlflow_server}", "mlflow.log_every_steps=1",
        "mlflow.register_model=dinor1-demo", "mlflow.register_alias=champion",
    ]
    for _ in range(10):  # a fresh head's job agent takes a few seconds to register
        proc = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                              timeout=540, cwd=ROOT)
        if "No available agent" not in proc.stderr:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(ray_head).get_job_status("dinor1-test-job") == JobStatus.SUCCEEDED

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("dinor1-demo")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["scaling.num_workers"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "loss/total")) == 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "final_model" in artifacts
    assert json.loads(json.dumps(run.data.tags))["world_size"] == "2"
    # the final model, registered: the version of the training run, loadable by its alias
    version = client.get_model_version_by_alias("dinor1-demo", "champion")
    assert version.version == "1" and version.run_id == run.info.run_id
    from dinor1 import Detector

    detector = Detector.from_pretrained("models:/dinor1-demo@champion",
                                        tracking_uri=mlflow_server)
    image = tmp_path / "image.jpg"
    write_image(image, 96, 80, seed=3)
    assert detector(str(image), text="circle . square")


@pytest.mark.ray
@pytest.mark.slow
def test_dinor1_submit_waits_for_the_job_and_writes_the_final_model(ray_head, tmp_path):
    """`dinor1 submit jobs/demo.yaml --wait`: the job file's runtime_env as the job's, the
    job's logs followed here, exit status 0 once it SUCCEEDED; relative paths were resolved
    here (the run folder is not inside the job's temporary copy of the working dir)."""
    synthetic_train_shards(tmp_path, 80, 20)
    proc = subprocess.run(
        [str(BIN / "dinor1"), "submit", "jobs/demo.yaml", "--address", ray_head, "--wait",
         "--submission-id", "dinor1-submit-test",
         f"data.train_shards={tmp_path / 'shards'}", "data.train_short_sides=[96]",
         "data.train_max_size=96", "stages.max_steps_per_epoch=2", "stages.sft_epochs=1",
         "stages.grqo_epochs=0", f"checkpointing.storage_path={tmp_path / 'runs'}"],
        env=subprocess_env(), capture_output=True, text=True, timeout=540, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[submit] job dinor1-submit-test submitted to" in out
    assert "[train demo] step 2/2" in out  # the job's own progress lines, followed live
    assert out.rstrip().endswith("[submit] job dinor1-submit-test: SUCCEEDED")
    assert "Uploading package" not in out + proc.stderr  # Ray's client chatter: --verbose only
    assert (tmp_path / "runs" / "demo" / "final_model" / "model.safetensors").is_file()
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(ray_head).get_job_info("dinor1-submit-test")
    assert info.runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1"
