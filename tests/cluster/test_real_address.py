"""Which Ray is loopback-only: only one that dinor1 starts itself. A Ray cluster whose node
address is not 127.0.0.1 (here a head on 127.0.0.2, another loopback address on Linux,
started with Ray's defaults) is joined as it is: ``dinor1 train`` run on that node with no
address, as on a cloud cluster's head, trains there and leaves Ray's settings alone."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest

from dinor1.local_cluster import LOOPBACK_ENV, pids_of_ray
from tests.helpers import free_port, subprocess_env, synthetic_train_shards

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
NODE_IP = "127.0.0.2"


def _plain_env(ray_tmpdir: Path) -> dict:
    """A user's shell on the node: no loopback switch (conftest sets one for in-process Ray);
    RAY_TMPDIR makes this machine's "current cluster" file the test head's."""
    env = subprocess_env(RAY_TMPDIR=str(ray_tmpdir))
    env.pop(LOOPBACK_ENV)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def head_on_other_address():
    base = Path(tempfile.mkdtemp(prefix="ra", dir="/tmp"))  # short: Ray's unix sockets
    temp_dir = base / "ray"
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", NODE_IP,
                        "--port", str(free_port()), "--dashboard-host", NODE_IP,
                        "--include-dashboard", "false", "--num-cpus", "4",
                        "--temp-dir", str(temp_dir), "--disable-usage-stats"],
                       env=_plain_env(base), check=True, capture_output=True, timeout=180)
        yield base
    finally:  # this head's processes only (they name its temp dir or descend from one)
        for pid in pids_of_ray(str(temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_train_on_a_cluster_node_keeps_its_address(head_on_other_address, tmp_path):
    shards = synthetic_train_shards(tmp_path, 32, 16)
    proc = subprocess.run(
        [str(BIN / "dinor1"), "train", "jobs/demo.yaml", f"data.train_shards={shards}",
         "data.train_short_sides=[96]", "data.train_max_size=96", "stages.max_steps_per_epoch=2",
         "stages.sft_epochs=1", "stages.grqo_epochs=0", "scaling.cpus_per_worker=0.5",
         f"checkpointing.storage_path={tmp_path / 'runs'}"],
        env=_plain_env(head_on_other_address), capture_output=True, text=True, timeout=540,
        cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_folder = tmp_path / "runs" / "demo"
    assert (run_folder / "final_model").is_dir() and (run_folder / "finished").exists()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    tags = client.get_run((run_folder / "mlflow_run_id").read_text().strip()).data.tags
    ray_info = json.loads(tags["dinor1.ray"])
    assert ray_info["gcs_address"].startswith(f"{NODE_IP}:"), ray_info
    assert ray_info["driver_node_ip"] == NODE_IP
    assert not ray_info["started_here"] and not ray_info["loopback_only"], ray_info
    workers = json.loads(tags["dinor1.workers"])
    assert [w["node_ip"] for w in workers] == [NODE_IP, NODE_IP]


@pytest.mark.ray
def test_a_ray_started_here_is_loopback_only():
    """No address and no cluster on the machine: dinor1 starts Ray on 127.0.0.1 only, even
    when ray was imported before (as `dinor1 train` does) and the shell has no switch set."""
    script = ("import ray, psutil\n"
              "from dinor1.local_cluster import pids_of_ray\n"
              "from dinor1.train.launch import start_or_join_ray\n"
              "started = start_or_join_ray(None)\n"
              "node = ray._private.worker._global_node\n"
              "ours = set(pids_of_ray(node.get_session_dir_path()))\n"
              "ips = {c.laddr.ip for c in psutil.net_connections('inet')\n"
              "       if c.status == psutil.CONN_LISTEN and c.pid in ours}\n"
              "print(started, ray.util.get_node_ip_address(), sorted(ips))\n"
              "ray.shutdown()\n")
    empty = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))  # no cluster recorded there
    try:
        proc = subprocess.run([sys.executable, "-c", script], env=_plain_env(empty),
                              capture_output=True, text=True, timeout=180, cwd=ROOT)
    finally:
        shutil.rmtree(empty, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    started, node_ip, ips = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    assert (started, node_ip) == ("True", "127.0.0.1")
    assert {ip.removeprefix("::ffff:") for ip in eval(ips)} == {"127.0.0.1"}, ips  # noqa: S307
