"""`dinor1 cluster local`: a Ray head plus a second Ray node and an MLflow server, all on
127.0.0.1, then a short training whose 2 workers are placed on different nodes
(STRICT_SPREAD) and checkpoint to a shared local path. Everything is stopped by `down`."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import psutil
import pytest

from dinor1 import local_cluster
from dinor1.errors import UserError
from tests.helpers import free_port, left_running, subprocess_env, synthetic_train_shards

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


def _dinor1(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dinor1"), *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_up_refuses_a_busy_port_and_down_without_state(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        busy = sock.getsockname()[1]
        with pytest.raises(UserError, match=f"--dashboard-port {busy}"):
            local_cluster.up(tmp_path / "state", port=free_port(), dashboard_port=busy,
                             mlflow_port=None)
    assert not (tmp_path / "state" / local_cluster.STATE_NAME).exists()
    assert local_cluster.down(tmp_path / "state", log=lambda *_: None) is False
    proc = _dinor1("cluster", "local", "status", "--state-dir", str(tmp_path / "none"))
    assert proc.returncode == 1 and "no local cluster" in proc.stdout


@pytest.mark.ray
@pytest.mark.slow
def test_two_node_cluster_spreads_training_workers(tmp_path):
    synthetic_train_shards(tmp_path, 48, 12)
    state = tmp_path / "state"
    ports = {"port": free_port(), "dashboard": free_port(), "mlflow": free_port()}
    up = _dinor1("cluster", "local", "up", "--state-dir", str(state), "--nodes", "1",
                 "--head-cpus", "2", "--node-cpus", "2", "--port", str(ports["port"]),
                 "--dashboard-port", str(ports["dashboard"]), "--mlflow-port",
                 str(ports["mlflow"]), "--object-store-mb", "512")
    cluster = local_cluster.load_state(state)
    try:
        assert up.returncode == 0, up.stdout + up.stderr[-3000:]
        assert cluster is not None and len(local_cluster.ray_pids(cluster)) > 0
        status = _dinor1("cluster", "local", "status", "--state-dir", str(state))
        assert status.returncode == 0, status.stdout + status.stderr[-2000:]
        report = json.loads(status.stdout)
        assert report["mlflow_ok"] and report["dashboard_ok"]
        nodes = {n["node_id"]: n for n in report["nodes"]}
        assert len(nodes) == 2
        assert {r for n in nodes.values() for r in n["resources"] if r.startswith("dinor1_")} \
            == {"dinor1_node_head", "dinor1_node_1"}
        # every socket the cluster listens on (both Ray nodes and MLflow) is on 127.0.0.1
        ours = set(local_cluster.ray_pids(cluster))
        ours |= {p.pid for p in psutil.Process(cluster.mlflow_pid).children(recursive=True)}
        ours.add(cluster.mlflow_pid)
        listening = [c for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in ours]
        assert len(listening) > 10
        assert {c.laddr.ip.removeprefix("::ffff:") for c in listening} == {"127.0.0.1"}, listening

        steps = 4
        train = _dinor1(
            "train", "jobs/demo.yaml", "--address", cluster.gcs_address,
            f"data.train_shards={tmp_path / 'shards'}",
            "data.train_short_sides=[96]", "data.train_max_size=96",
            f"stages.max_steps_per_epoch={steps}", "stages.sft_epochs=1",
            "stages.grqo_epochs=0", "scaling.num_workers=2",
            "scaling.placement_strategy=STRICT_SPREAD", "checkpointing.every_steps=2",
            f"checkpointing.storage_path={tmp_path / 'runs'}", "mlflow.run_name=spread",
            f"mlflow.tracking_uri={cluster.mlflow_uri}", "mlflow.log_every_steps=1",
            timeout=540)
        assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-4000:]
        # each node its own log monitor over its own files: every worker line once
        progress = [ln for ln in train.stdout.splitlines() if ln.startswith("[train spread] step")]
        assert progress and len(progress) == len(set(progress)), train.stdout[-2000:]

        client = mlflow.MlflowClient(cluster.mlflow_uri)
        run = client.search_runs(
            [client.get_experiment_by_name("dinor1-demo").experiment_id])[0]
        workers = json.loads(run.data.tags["dinor1.workers"])
        # one worker on each node, and each did every step
        assert sorted(w["rank"] for w in workers) == [0, 1]
        assert {w["node_id"] for w in workers} == set(nodes)
        assert [w["steps"] for w in workers] == [steps, steps]
        assert len(client.get_metric_history(run.info.run_id, "loss/total")) == steps
        # the shared checkpoint holds both ranks' ZeRO-2 optimiser partitions
        checkpoints = sorted(p for p in (tmp_path / "runs" / "spread").glob("checkpoint_*")
                             if p.is_dir())
        assert checkpoints, list((tmp_path / "runs").rglob("*"))[:20]
        names = {p.name for p in checkpoints[-1].rglob("*optim_states.pt")}
        assert any("rank_0" in n for n in names) and any("rank_1" in n for n in names), names
    finally:
        pids = local_cluster.ray_pids(cluster) if cluster else []  # incl. agents and workers
        down = _dinor1("cluster", "local", "down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr[-2000:]
    assert local_cluster.ray_pids(cluster) == []
    assert not left_running(pids)
    assert not local_cluster._alive(cluster.mlflow_pid)
    assert not (state / local_cluster.STATE_NAME).exists()
    assert (state / "mlflow.db").exists()  # the runs are kept

