"""Shared fixtures. Environment first: loopback-only Ray, no auth tokens for the throwaway local
clusters tests start, no MLflow telemetry, a faster Ray Train health check, and, under
pytest-xdist (one test process per core, pyproject.toml), a Ray temp folder per test process."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller polls its workers every 2 s by default, so each short training run of
# the tests waited up to 2 s after its last step before fit() returned; inherited by the Ray
# clusters and CLIs the tests start
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# one machine: no preemption watcher actor (a Ray worker process per training run)
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# one torch thread per test process (set before torch is imported): the test processes share
# the cores with each other and with Ray's workers, and torch's OpenMP threads wait for each
# other at every parallel region, spinning while a sibling is preempted (a test taking 3 s
# alone took 37 s beside two busy processes). Ray's workers get 1 thread per CPU anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the S3 stand-in's (moto's) credentials, in the environment of every process of the shared Ray
# cluster as instance roles would give them on a cloud cluster (tests/train/test_object_storage.py)
for _key, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(_key, _value)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # each test process its own Ray world: sessions, sockets and the "current cluster" file that
    # `ray start` leaves (so a CLI started by one test process never joins the head another
    # one's test started); short, Ray's unix socket paths are limited to 107 bytes
    os.environ.setdefault("RAY_TMPDIR", f"/tmp/dinor1-{os.environ['PYTEST_XDIST_WORKER']}")
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="torch device for tests that take the `device` fixture: cpu (default) "
                          "or cuda (on a GPU machine: pytest --device cuda)")


def pytest_configure(config):
    name = config.getoption("--device")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device must be cpu or cuda[:N], got {name!r}")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError(f"--device {name}: torch.cuda.is_available() is False here "
                                    f"(torch {torch.__version__}); run without --device or on a "
                                    "GPU machine")


def pytest_collection_modifyitems(config, items):
    """Modules with the most ``slow`` tests first (each module's tests stay together and in
    order) in a run without pytest-xdist. Under ``-n auto --dist loadfile`` (pyproject.toml)
    xdist orders the modules itself (by test count); measured 2026-12-04: ordering them by
    their recorded seconds instead balanced the 2 test processes no better (within 6 s of
    ~780 s each) and the run was not faster. On ``--device cuda`` only the tests that take the ``device`` fixture run
    (the rest has nothing device-specific, and a bare GPU machine lacks Ray, DeepSpeed and
    MLflow)."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.nodeid.split("::")[0]] = slow.get(item.nodeid.split("::")[0], 0) + (
            item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.nodeid.split("::")[0]])  # (stable)
    if config.getoption("--device") == "cpu":
        return
    selected = [item for item in items if "device" in getattr(item, "fixturenames", ())]
    config.hook.pytest_deselected(items=[item for item in items if item not in selected])
    items[:] = selected


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml): one test process per core, at most 4 (each may start a Ray
    cluster and a 2-worker training run); ``-n 0`` runs the tests in this process."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_report_header(config):
    return f"device: {config.getoption('--device')}"


@pytest.fixture(scope="session")
def device(pytestconfig):
    """The torch.device unit tests run on: ``--device`` (default cpu)."""
    import torch

    return torch.device(pytestconfig.getoption("--device"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (4 logical CPUs so Ray Data keeps CPU budget beside 2 trainer
    workers on this 2-core machine), stopped at the end of the session."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    _wait_for_ray_data_threads()
    ray.shutdown()


def _wait_for_ray_data_threads(seconds: float = 10.0) -> None:
    """Before ``ray.shutdown()``: a thread of this process still inside a Ray call when the core
    worker shuts down makes Ray end the process, and pytest-xdist then waits forever for the
    test process it lost. Drop abandoned iterators (their executors stop) and give Ray Data's
    threads a moment to end; name any left, so that a test leaving one can be found."""
    import gc
    import sys
    import threading
    import time

    def busy() -> list[str]:
        return [t.name for t in threading.enumerate()
                if t.name == "iter_threaded" or t.name.startswith("StreamingExecutor-")]

    gc.collect()
    deadline = time.monotonic() + seconds
    while busy() and time.monotonic() < deadline:
        time.sleep(0.1)
    if busy():
        print(f"\nRay Data threads still running at ray.shutdown(): {busy()}", file=sys.__stderr__)


@pytest.fixture
def ray_address(ray_cluster) -> str:
    """The shared cluster's address, for a ``dinor1`` command run as a subprocess
    (``--address``): it joins that cluster rather than starting a Ray of its own."""
    return ray_cluster.get_runtime_context().gcs_address


@pytest.fixture
def s3_server():
    """A real S3-compatible server (moto's) on 127.0.0.1, standing in for the cloud object store
    that cannot exist here; yields its port. Stopped by PID."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import free_port, wait_http

    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/", seconds=20)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
