"""``dinor1 cluster local up|status|down``: a multi-node Ray cluster and an MLflow server on this
machine, all on 127.0.0.1.

``up`` starts a Ray head plus N extra Ray nodes (each its own raylet with its own logical CPUs
and a custom resource naming it: ``dinor1_node_head``, ``dinor1_node_1``, ...), and an
``mlflow server`` (sqlite backend, artifacts in a local folder). What it started is recorded in
``STATE_DIR/cluster.json``: the Ray temp dir that every process of this cluster (and only of
this cluster) names on its command line, and the MLflow server's PID. ``down`` stops exactly
those processes, never a machine-wide ``ray stop``, and keeps the MLflow database and artifacts.

Loopback only: every node is started with ``--node-ip-address 127.0.0.1``, the head with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's local-only mode, which also keeps the addresses
Ray derives by itself on 127.0.0.1). The extra nodes need that variable at 1 (Ray refuses to
join nodes in local-only mode), and then ``ray start --address 127.0.0.1:P`` would swap
127.0.0.1 for the machine's network address; so they run Ray's own ``ray start`` with that one
substitution turned off (:data:`NODE_START`). The dashboard, the job API
and MLflow bind 127.0.0.1 (``tests/cluster/test_local_cluster.py`` checks every listening
socket of the cluster).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dinor1.errors import UserError

HOST = "127.0.0.1"
# Ray's switch for Windows/macOS clusters; at 0 it is Ray's local-only mode on Linux too
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
STATE_NAME = "cluster.json"
# the repository's autoscaling cluster (`up --autoscaling`)
AUTOSCALING_CONFIG = Path(__file__).resolve().parents[1] / "cluster" / "local-autoscaling.yaml"
# `ray start` for an extra node, keeping a 127.0.0.1 head address as given (Ray replaces a
# loopback address with the machine's network address when joining nodes)
NODE_START = ("import sys; import ray._private.services as services; "
              "services.resolve_ip_for_localhost = lambda host: host; "
              "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


@dataclass
class LocalCluster:
    """What ``up`` started (the contents of ``STATE_DIR/cluster.json``)."""

    state_dir: str
    ray_temp_dir: str
    port: int
    dashboard_port: int
    nodes: list[dict] = field(default_factory=list)  # name, cpus, resource
    mlflow_port: int | None = None
    mlflow_pid: int | None = None
    started: float = 0.0
    autoscaling_config: str | None = None  # the autoscaler's config (--autoscaling)

    @property
    def gcs_address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def mlflow_uri(self) -> str | None:
        return f"http://{HOST}:{self.mlflow_port}" if self.mlflow_port else None


def _bin(name: str) -> str:
    """The executable from this interpreter's environment (the project's venv) first."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise UserError(f"`{name}` not found next to {sys.executable} or on PATH "
                        "(install the project: make setup)")
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env[LOOPBACK_ENV] = "0"  # every Ray port on 127.0.0.1
    # a loopback-only cluster for one user: no Ray auth token unless the user asks for one
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def loopback_only_ray() -> None:
    """Ray's local-only mode for a Ray that this process starts: every Ray port (and gloo's
    master address) on 127.0.0.1, unless the environment already says otherwise. Never for a
    cluster someone else started. Ray reads the variable when it is imported, so the module
    already imported here is told too (its children read the environment)."""
    os.environ.setdefault(LOOPBACK_ENV, "0")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(LOOPBACK_ENV, True)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _check_port(port: int, flag: str) -> None:
    with socket.socket() as sock:
        # as the servers bind: connections of a cluster just stopped, left in TIME_WAIT for a
        # minute, do not make the port busy (a listening socket still does)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            sock.listen()
        except OSError:
            raise UserError(f"{flag} {port}: port already in use on {HOST} "
                            f"(choose another with {flag})") from None


def wait_http(url: str, seconds: float) -> bool:
    """Poll ``url`` until it answers; False after ``seconds``."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except OSError:
            time.sleep(0.3)
    return False


def _state_path(state_dir: str | Path) -> Path:
    return Path(state_dir).expanduser().resolve() / STATE_NAME


def load_state(state_dir: str | Path) -> LocalCluster | None:
    path = _state_path(state_dir)
    if not path.exists():
        return None
    try:
        return LocalCluster(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"{path}: not a dinor1 local-cluster state file ({exc})") from None


def pids_of_ray(temp_dir: str) -> list[int]:
    """PIDs of the Ray processes started with ``temp_dir``: those naming it on their command
    line (GCS, raylets, dashboard, log monitor) and all their descendants (agents and workers
    rename themselves, e.g. ``ray::DashboardAgent``, so only the process tree finds them)."""
    import psutil

    out = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True)
    found = {int(p) for p in out.stdout.split()} - {os.getpid()}
    for pid in list(found):
        try:
            found.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return sorted(found - {os.getpid()})


def ray_pids(cluster: LocalCluster) -> list[int]:
    """PIDs of this cluster's Ray processes (see :func:`pids_of_ray`)."""
    return pids_of_ray(cluster.ray_temp_dir)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ray_start(args: list[str], env: dict, what: str, node: bool = False) -> None:
    command = [sys.executable, "-c", NODE_START] if node else [_bin("ray")]
    try:
        proc = subprocess.run([*command, "start", *args], env=env, capture_output=True,
                              text=True, timeout=180)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`ray start` for the {what} did not finish within 180 s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"`ray start` for the {what} failed:\n" + "\n".join(tail))


def _node_args(cpus: float, resource: str, object_store_mb: int) -> list[str]:
    # several raylets on one machine: every per-node port distinct (defaults would clash)
    return ["--node-ip-address", HOST, "--num-cpus", str(int(cpus)),
            "--resources", json.dumps({resource: 1}),
            "--object-store-memory", str(object_store_mb * 1024 * 1024),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--disable-usage-stats"]


def alive_nodes(cluster: LocalCluster) -> list[dict]:
    """The cluster's alive nodes as Ray's state API reports them (via the dashboard)."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")],
                       raise_on_missing_output=False)
    return [{"node_id": n.node_id, "is_head": n.is_head_node,
             "resources": dict(n.resources_total)} for n in nodes]


def autoscaling_config(template: str | Path, port: int, out: Path) -> Path:
    """``template`` (an autoscaler config with the fake multi-node provider) with the head's GCS
    address filled in, written to ``out``: the provider's nodes join the GCS at 6379 unless told
    otherwise."""
    import yaml

    template = Path(template)
    if not template.is_file():
        raise UserError(f"--autoscaling: no autoscaler config at {template}")
    config = yaml.safe_load(template.read_text())
    provider = config.get("provider") if isinstance(config, dict) else None
    if not isinstance(provider, dict) or (
            provider.get("type") != "fake_multinode" and
            provider.get("module") != "dinor1.local_autoscaler.LoopbackNodeProvider"):
        raise UserError(f"{template}: provider must be Ray's fake_multinode or "
                        "dinor1.local_autoscaler.LoopbackNodeProvider (nodes on this machine)")
    provider["gcs_address"] = f"{HOST}:{port}"
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def _autoscaling_head(cluster: LocalCluster, template: str | Path, env: dict,
                      log) -> tuple[dict, list[str]]:
    """The head's environment and extra ``ray start`` arguments for Ray's autoscaler with the
    fake multi-node provider; records the config written for it."""
    state = Path(cluster.state_dir)
    cluster.autoscaling_config = str(autoscaling_config(template, cluster.port,
                                                        state / "autoscaling.yaml"))
    log(f"[cluster] autoscaler: node types of {template}, started and stopped on demand "
        f"(config {cluster.autoscaling_config})")
    return (dict(env, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1"),
            ["--autoscaling-config", cluster.autoscaling_config])


def up(state_dir: str | Path = ".dinor1_cluster", *, nodes: int = 1,
       head_cpus: int | None = None,
       node_cpus: int = 2, port: int = 6379, dashboard_port: int = 8265,
       mlflow_port: int | None = 5000, object_store_mb: int = 1024,
       autoscaling: str | Path | None = None, log=print) -> LocalCluster:
    """Start the head, ``nodes`` extra nodes and (unless ``mlflow_port`` is None) MLflow.

    ``autoscaling``: an autoscaler config (``cluster/local-autoscaling.yaml``); the head then
    runs Ray's autoscaler with the fake multi-node provider (``RAY_FAKE_CLUSTER=1``), which
    starts and stops the config's worker nodes as raylets on 127.0.0.1; no fixed extra nodes.
    """
    if autoscaling:
        nodes = 0
    if head_cpus is None:  # an autoscaling head keeps its CPUs for nothing but drivers
        head_cpus = 0 if autoscaling else 2
    if nodes < 0 or head_cpus < 0 or node_cpus < 1:
        raise UserError("--nodes must be >= 0, --head-cpus >= 0 and --node-cpus >= 1")
    state = Path(state_dir).expanduser().resolve()
    existing = load_state(state)
    if existing and (ray_pids(existing) or _alive(existing.mlflow_pid)):
        raise UserError(f"a local cluster from {state} is already running "
                        f"(dashboard {existing.dashboard_url}); stop it with "
                        f"`dinor1 cluster local down --state-dir {state_dir}`")
    _check_port(port, "--port")
    _check_port(dashboard_port, "--dashboard-port")
    if mlflow_port:
        _check_port(mlflow_port, "--mlflow-port")
    state.mkdir(parents=True, exist_ok=True)
    # a short path of its own (Ray puts unix sockets under it, 108-byte limit); every Ray
    # process of this cluster names it (or a folder in it), which is how `down` finds exactly
    # them
    temp_dir = tempfile.mkdtemp(prefix="d1c", dir="/tmp")
    cluster = LocalCluster(str(state), temp_dir, port, dashboard_port, started=time.time())
    env = _env()
    try:
        log(f"[cluster] Ray head on {HOST}:{port} ({head_cpus} CPUs, dashboard "
            f"{cluster.dashboard_url})")
        head_env, extra = _autoscaling_head(cluster, autoscaling, env, log) if autoscaling \
            else (env, [])
        _ray_start(["--head", "--port", str(port), "--dashboard-host", HOST,
                    "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
                    "--temp-dir", temp_dir, "--ray-client-server-port", str(free_port()),
                    *extra, *_node_args(head_cpus, "dinor1_node_head", object_store_mb)],
                   head_env, "head")
        cluster.nodes.append({"name": "head", "cpus": head_cpus, "resource": "dinor1_node_head"})
        _save(cluster)  # from here on `down` can clean up even if the rest fails
        for i in range(1, nodes + 1):
            resource = f"dinor1_node_{i}"
            log(f"[cluster] Ray node {i} ({node_cpus} CPUs, resource {resource})")
            # its own temp dir inside the head's: a node sharing the head's session folder
            # runs a second log monitor over the same log files, and every worker line
            # reached the driver twice
            _ray_start(["--address", cluster.gcs_address, "--temp-dir", f"{temp_dir}/n{i}",
                        *_node_args(node_cpus, resource, object_store_mb)],
                       dict(env, **{LOOPBACK_ENV: "1"}), f"node {i}", node=True)
            cluster.nodes.append({"name": f"node{i}", "cpus": node_cpus, "resource": resource})
            _save(cluster)
        if not wait_http(f"{cluster.dashboard_url}/api/version", 60):
            raise RuntimeError(f"the Ray dashboard did not answer at {cluster.dashboard_url}")
        deadline = time.time() + 60
        while (alive := len(alive_nodes(cluster))) < nodes + 1:
            if time.time() > deadline:
                raise RuntimeError(f"only {alive} of {nodes + 1} Ray nodes registered within 60 s")
            time.sleep(0.5)
        if mlflow_port:
            log(f"[cluster] MLflow server on http://{HOST}:{mlflow_port} (sqlite "
                f"{state / 'mlflow.db'}, artifacts {state / 'mlflow-artifacts'})")
            log_file = open(state / "mlflow-server.log", "ab")  # noqa: SIM115 (owned by Popen)
            proc = subprocess.Popen(
                [_bin("mlflow"), "server", "--host", HOST, "--port", str(mlflow_port),
                 "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
                 "--artifacts-destination", str(state / "mlflow-artifacts"),
                 "--workers", "1"],
                env=env, stdout=log_file, stderr=log_file, start_new_session=True)
            log_file.close()
            cluster.mlflow_port, cluster.mlflow_pid = mlflow_port, proc.pid
            _save(cluster)
            if not wait_http(f"{cluster.mlflow_uri}/health", 90):
                raise RuntimeError(f"MLflow did not answer at {cluster.mlflow_uri}/health "
                                   f"(log: {state / 'mlflow-server.log'})")
    except BaseException:
        down(state, log=lambda *_: None)
        raise
    return cluster


def _save(cluster: LocalCluster) -> None:
    _state_path(cluster.state_dir).write_text(json.dumps(asdict(cluster), indent=1))


def _terminate(pids: list[int], grace: float) -> int:
    """SIGTERM, then SIGKILL whatever is still alive after ``grace`` seconds."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # a SIGKILLed process is gone only once the kernel has run its exit (on a busy machine
    # not at once): return when none is left but zombies (their parent, if any, reaps them)
    deadline = time.time() + 10
    while time.time() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    return len(pids)


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def down(state_dir: str | Path = ".dinor1_cluster", *, log=print) -> bool:
    """Stop what ``up`` started from this state dir; keeps MLflow's database and artifacts."""
    cluster = load_state(state_dir)
    if cluster is None:
        log(f"[cluster] no local cluster recorded in {Path(state_dir).resolve()}")
        return False
    if _alive(cluster.mlflow_pid):
        try:  # the server's own session: SIGTERM to the parent stops its workers
            os.killpg(cluster.mlflow_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + 20
        while time.time() < deadline and _alive(cluster.mlflow_pid):
            time.sleep(0.2)
        try:
            os.killpg(cluster.mlflow_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log(f"[cluster] stopped MLflow (pid {cluster.mlflow_pid}); runs kept in "
            f"{Path(cluster.state_dir) / 'mlflow.db'}")
    # Ray: twice, in case a worker process was being spawned during the first pass
    stopped = _terminate(ray_pids(cluster), 10)
    stopped += _terminate(ray_pids(cluster), 5)
    log(f"[cluster] stopped {stopped} Ray processes of {cluster.ray_temp_dir}")
    shutil.rmtree(cluster.ray_temp_dir, ignore_errors=True)
    _state_path(state_dir).unlink(missing_ok=True)
    return True


def status(state_dir: str | Path = ".dinor1_cluster") -> dict:
    """What is running: Ray processes, alive nodes, dashboard and MLflow health."""
    cluster = load_state(state_dir)
    if cluster is None:
        return {"running": False, "state_dir": str(Path(state_dir).resolve())}
    pids = ray_pids(cluster)
    dashboard = wait_http(f"{cluster.dashboard_url}/api/version", 2) if pids else False
    nodes = alive_nodes(cluster) if dashboard else []
    mlflow_ok = bool(cluster.mlflow_uri) and wait_http(f"{cluster.mlflow_uri}/health", 2)
    return {"running": bool(pids), "state_dir": cluster.state_dir,
            "gcs_address": cluster.gcs_address, "dashboard": cluster.dashboard_url,
            "dashboard_ok": dashboard, "ray_processes": len(pids), "nodes": nodes,
            "expected_nodes": len(cluster.nodes), "mlflow": cluster.mlflow_uri,
            "mlflow_ok": mlflow_ok}


def usage_lines(cluster: LocalCluster) -> list[str]:
    tracking = f" mlflow.tracking_uri={cluster.mlflow_uri}" if cluster.mlflow_uri else ""
    if cluster.autoscaling_config:  # workers ask for the node type's resource
        tracking += " 'scaling.resources_per_worker={trainer: 1}'"
    lines = [f"Ray: {cluster.gcs_address} ({len(cluster.nodes)} nodes), dashboard "
             f"{cluster.dashboard_url}",
             f"submit:  dinor1 submit jobs/demo.yaml --address {cluster.dashboard_url} "
             f"--wait{tracking}",
             f"direct:  dinor1 train jobs/demo.yaml --address {cluster.gcs_address}{tracking}"]
    if cluster.mlflow_uri:
        lines.append(f"MLflow:  {cluster.mlflow_uri}")
    lines.append(f"stop:    dinor1 cluster local down --state-dir {cluster.state_dir}")
    return lines


def add_cluster_parser(sub) -> None:
    cluster = sub.add_parser("cluster", help="clusters: a local multi-node Ray + MLflow")
    csub = cluster.add_subparsers(dest="cluster_kind", required=True, metavar="KIND")
    local = csub.add_parser("local", help="a Ray head + N Ray nodes + an MLflow server, all "
                            "on 127.0.0.1 on this machine")
    lsub = local.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    start = lsub.add_parser("up", help="start the cluster")
    start.add_argument("--nodes", type=int, default=1,
                       help="extra Ray nodes beside the head (none with --autoscaling)")
    start.add_argument("--head-cpus", type=int, default=None,
                       help="logical CPUs of the head (default 2; 0 with --autoscaling)")
    start.add_argument("--node-cpus", type=int, default=2, help="logical CPUs of each node")
    start.add_argument("--port", type=int, default=6379, help="Ray GCS port")
    start.add_argument("--dashboard-port", type=int, default=8265,
                       help="dashboard and job API port")
    start.add_argument("--mlflow-port", type=int, default=5000)
    start.add_argument("--no-mlflow", action="store_true", help="do not start an MLflow server")
    start.add_argument("--object-store-mb", type=int, default=1024,
                       help="object store size per node (MiB)")
    start.add_argument("--autoscaling", nargs="?", const=str(AUTOSCALING_CONFIG), default=None,
                       metavar="CONFIG",
                       help="Ray's autoscaler instead of fixed nodes: worker nodes started and "
                            "stopped on demand as the config's node types say (default "
                            "cluster/local-autoscaling.yaml; the head gets --head-cpus, "
                            "0 recommended)")
    for parser in (start, lsub.add_parser("status", help="what is running"),
                   lsub.add_parser("down", help="stop exactly what `up` started")):
        parser.add_argument("--state-dir", default=".dinor1_cluster",
                            help="where up records what it started (and MLflow keeps its data)")


def cmd_cluster(args) -> int:
    if args.cluster_command == "up":
        cluster = up(args.state_dir, nodes=args.nodes, head_cpus=args.head_cpus,
                     node_cpus=args.node_cpus, port=args.port,
                     dashboard_port=args.dashboard_port,
                     mlflow_port=None if args.no_mlflow else args.mlflow_port,
                     object_store_mb=args.object_store_mb, autoscaling=args.autoscaling)
        print("\n".join(usage_lines(cluster)))
        return 0
    if args.cluster_command == "down":
        down(args.state_dir)
        return 0
    report = status(args.state_dir)
    if not report["running"] and "gcs_address" not in report:
        print(f"no local cluster recorded in {report['state_dir']}")
        return 1
    print(json.dumps(report, indent=1))
    healthy = (report["running"] and report["dashboard_ok"]
               and len(report["nodes"]) == report["expected_nodes"]
               and (report["mlflow"] is None or report["mlflow_ok"]))
    return 0 if healthy else 1
