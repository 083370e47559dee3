"""Ray's real autoscaler on this machine (`dinor1 cluster local up --autoscaling`,
cluster/local-autoscaling.yaml): a training job submitted with `dinor1 submit` asks for the
`trainer` resource, the autoscaler starts 2 trainer nodes (real raylets on 127.0.0.1), one of
them is killed by PID mid-run, the autoscaler replaces it, Ray Train restarts the worker group
from the newest checkpoint into the same MLflow run, and after the idle timeout the nodes are
gone. One cluster for the module, stopped by `down`, by PID."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

from dinor1 import local_cluster
from tests.helpers import free_port, left_running, subprocess_env, synthetic_train_shards

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


def _trainer_nodes(cluster) -> list[str]:
    return [n["node_id"] for n in local_cluster.alive_nodes(cluster)
            if n["resources"].get("trainer")]


def _trainer_raylets(cluster) -> list[psutil.Process]:
    """The raylets the autoscaler started (children of its monitor process)."""
    raylets = []
    for pid in local_cluster.ray_pids(cluster):
        try:
            proc = psutil.Process(pid)
            if proc.name() == "raylet" and "monitor.py" in " ".join(proc.parent().cmdline()):
                raylets.append(proc)
        except (psutil.NoSuchProcess, AttributeError):
            pass
    return raylets


class NodeWatch(threading.Thread):
    """Polls Ray's node table every second: most trainer nodes alive at once, all seen."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        self.cluster, self.most, self.seen = cluster, 0, set()
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                nodes = _trainer_nodes(self.cluster)
            except Exception:  # (the dashboard busy for a moment)
                nodes = []
            self.most = max(self.most, len(nodes))
            self.seen.update(nodes)
            self.halt.wait(1.0)


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory):
    state = tmp_path_factory.mktemp("autoscaling") / "state"
    up = subprocess.run(
        [str(BIN / "dinor1"), "cluster", "local", "up", "--autoscaling", "--no-mlflow",
         "--state-dir", str(state), "--port", str(free_port()), "--dashboard-port",
         str(free_port()), "--object-store-mb", "256"],
        env=subprocess_env(), capture_output=True, text=True, timeout=180, cwd=ROOT)
    cluster = local_cluster.load_state(state)
    try:
        assert up.returncode == 0, up.stdout + up.stderr[-3000:]
        yield cluster
    finally:
        pids = local_cluster.ray_pids(cluster) if cluster else []
        down = subprocess.run([str(BIN / "dinor1"), "cluster", "local", "down", "--state-dir",
                               str(state)], env=subprocess_env(), capture_output=True,
                              text=True, timeout=120, cwd=ROOT)
    assert down.returncode == 0, down.stderr[-2000:]
    assert not left_running(pids)


def _train_and_lose_a_node(cluster, tmp_path, name: str, *overrides: str, samples: int = 240,
                           after_kill=None):
    """Submit a demo job (1 SFT + 1 GRQO epoch over ``samples`` images, 20 steps each at 2
    workers unless ``overrides`` say otherwise) needing 2 trainer nodes; right after its first
    complete checkpoint (step 5) kill one trainer node's raylet, call ``after_kill(lines, job)``
    (the job's output so far, growing; its process); wait for the job. Returns the job's output and the run
    folder."""
    from ray.util.state import list_placement_groups

    assert _trainer_nodes(cluster) == []  # nothing but the head until work asks
    synthetic_train_shards(tmp_path, samples, 40)
    watch = NodeWatch(cluster)
    watch.start()
    runs = tmp_path / "runs"
    submitted = time.monotonic()
    job = subprocess.Popen(
        [str(BIN / "dinor1"), "submit", "jobs/demo.yaml", "--address", cluster.dashboard_url,
         "--wait", "--submission-id", name,
         f"data.train_shards={tmp_path / 'shards'}", "data.train_short_sides=[96]",
         "data.train_max_size=96", "stages.max_steps_per_epoch=20", "stages.sft_epochs=1",
         "stages.grqo_epochs=1", "checkpointing.every_steps=5",
         "checkpointing.max_failures=2", f"checkpointing.storage_path={runs}",
         "mlflow.log_every_steps=1", "scaling.resources_per_worker={trainer: 1}", *overrides],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=ROOT)
    lines, first_step = [], []

    def read():
        for line in job.stdout:
            lines.append(line)
            if not first_step and line.startswith("[train demo] step "):
                first_step.append(time.monotonic() - submitted)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not list((runs / "demo").glob("checkpoint_*/complete.json")):
            assert job.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s:\n" + \
                "".join(lines)[-3000:]
            time.sleep(0.2)
        raylets = _trainer_raylets(cluster)
        assert len(raylets) == 2, raylets
        assert len(_trainer_nodes(cluster)) == 2  # 0 -> 2 nodes, as Ray's node table says
        bundles = [b["unit_resources"] for g in list_placement_groups(
            address=cluster.dashboard_url, filters=[("state", "=", "CREATED")], detail=True)
            for b in g.bundles]
        # each worker's bundle asks for the node type's resource (scaling.resources_per_worker)
        assert bundles == [{"CPU": 0.5, "trainer": 1.0}] * 2, bundles
        os.kill(raylets[0].pid, signal.SIGKILL)
        if after_kill:
            after_kill(lines, job)
        assert job.wait(timeout=420) == 0, "".join(lines)[-4000:]
    finally:
        watch.halt.set()
        if job.poll() is None:
            job.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    assert out.rstrip().endswith(f"[submit] job {name}: SUCCEEDED"), out[-3000:]
    # the lost node was replaced by a new one (Ray's table lists the lost one as alive for a
    # few seconds more: 3 at most at once)
    assert len(watch.seen) >= 3 and watch.most <= 3, (watch.seen, watch.most)
    assert (runs / "demo" / "final_model" / "model.safetensors").is_file()
    print(f"\n[{name}] submit -> first step: {first_step[0]:.1f} s")
    return out, runs


def _wait_for_idle_removal(cluster) -> None:
    deadline = time.monotonic() + 120  # idle_timeout_minutes: 0.25
    while _trainer_nodes(cluster):
        assert time.monotonic() < deadline, "trainer nodes still up after 120 s"
        time.sleep(1)


def _history(runs):
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    run_id = (runs / "demo" / "mlflow_run_id").read_text().strip()
    return client, run_id


@pytest.mark.ray
@pytest.mark.slow
def test_fixed_workers_survive_losing_a_node(autoscaling, tmp_path):
    _, runs = _train_and_lose_a_node(autoscaling, tmp_path, "fixed")
    client, run_id = _history(runs)
    restored = [m.value for m in client.get_metric_history(run_id, "resume/step")]
    assert restored and all(v >= 5 for v in restored)  # from a checkpoint, not from scratch
    history = client.get_metric_history(run_id, "loss/total")
    steps = {m.step for m in history}
    assert steps == set(range(1, 41))  # one run, every step
    print(f"restored from step {restored}; steps trained twice (after the checkpoint, "
          f"before the loss): {len(history) - len(steps)}")
    _wait_for_idle_removal(autoscaling)


def _set_capacity(cluster, nodes: int) -> None:
    """How many trainer nodes the "cloud" can give: the node type's max_workers in the
    autoscaler's config, which Ray's autoscaler reads again at each update (every 5 s): a cloud
    out of spot capacity, then back."""
    path = Path(cluster.autoscaling_config)
    config = yaml.safe_load(path.read_text())
    config["max_workers"] = config["available_node_types"]["trainer"]["max_workers"] = nodes
    new = path.with_suffix(".new")
    new.write_text(yaml.safe_dump(config, sort_keys=False))
    new.replace(path)


def _wait_for_line(lines: list[str], job, text: str, seconds: float) -> float:
    """Seconds until the job printed ``text``."""
    started = time.monotonic()
    while not any(text in line for line in lines):
        assert job.poll() is None and time.monotonic() < started + seconds, \
            f"no {text!r} within {seconds:.0f} s:\n" + "".join(lines)[-3000:]
        time.sleep(0.5)
    return time.monotonic() - started


@pytest.mark.ray
@pytest.mark.slow
def test_elastic_zero2_run_shrinks_and_grows_back(autoscaling, tmp_path):
    """min 1 / max 2 workers, ZeRO-2: a node is lost while the cloud has no capacity to replace
    it; Ray Train goes on with 1 worker from the newest checkpoint (converted to a universal
    checkpoint); capacity returns, the autoscaler launches a node, Ray Train grows the group
    back to 2 from the newest checkpoint, and the run finishes in the same MLflow run."""
    waited = []

    def cloud_without_capacity(lines, job):
        _set_capacity(autoscaling, 1)  # (right after the kill: no replacement for now)
        waited.append(_wait_for_line(lines, job, "on 1 worker (was 2)", 180))
        _set_capacity(autoscaling, 2)
        waited.append(_wait_for_line(lines, job, "on 2 workers (was 1)", 180))

    try:
        out, runs = _train_and_lose_a_node(
            autoscaling, tmp_path, "elastic", "scaling.min_workers=1", "scaling.max_workers=2",
            "scaling.resize_check_seconds=5", "scaling.start_timeout_seconds=10",
            "stages.max_steps_per_epoch=null", "deepspeed.zero_stage=2",
            # 30 steps an epoch at 2 workers, 60 at 1: over a minute at 1 worker at the least
            "faults.min_step_seconds=0.75", after_kill=cloud_without_capacity)
    finally:
        _set_capacity(autoscaling, 2)
    resumes = [line.strip() for line in out.splitlines() if "] resumed at step " in line]
    print("\n".join(resumes) + f"\nnode lost -> on 1 worker: {waited[0]:.1f} s, capacity back "
          f"-> on 2 workers: {waited[1]:.1f} s")
    client, run_id = _history(runs)
    before = sorted((m.step, m.value) for m in
                    client.get_metric_history(run_id, "resume/world_size_before"))
    after = sorted((m.step, m.value) for m in client.get_metric_history(run_id,
                                                                           "resume/world_size"))
    sizes = [2.0] + [v for _, v in after]
    assert [v for _, v in before] == sizes[:-1]  # each resume knew the size it came from
    assert 1.0 in sizes[1:-1] and sizes[-1] == 2.0, (before, after)  # 2 -> ... 1 ... -> 2

    def at(name, step):
        values = [m.value for m in client.get_metric_history(run_id, name) if m.step == step]
        assert values, (name, step)
        return values[-1]

    for step, _ in before:  # weights and every AdamW moment as saved, at each resize
        for part in ("weights", "moments"):
            assert at(f"resume/{part}_checksum", step) == pytest.approx(
                at(f"checkpoint/{part}_checksum", step), rel=1e-9), (part, step)
    history = client.get_metric_history(run_id, "loss/total")
    steps = sorted({m.step for m in history})
    assert steps == list(range(1, steps[-1] + 1))  # one run, no step missing
    assert client.get_run(run_id).data.tags["dinor1.resized"].startswith("1 -> 2 workers")
    print(f"steps {steps[-1]}, trained twice (lost at a resize): {len(history) - len(steps)}")
    _wait_for_idle_removal(autoscaling)
