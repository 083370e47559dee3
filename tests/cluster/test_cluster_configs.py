"""Cluster configs under cluster/: offline checks, no Ray started and no cloud reached.

- cluster/aws.yaml, cluster/gcp.yaml: Ray's own cluster-config JSON schema, then Ray's defaults
  filling and checks (what `ray up` does before calling the cloud), then this project's rules.
- cluster/kuberay/*.yaml: KubeRay RayCluster / RayJob structure, the RayJob's entrypoint against
  dinor1's config schema and its capacity against the job's scaling section.
- No credentials in any file under cluster/.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from dinor1.config import RUNTIME_ENV_KEYS, load_train_config, load_yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
CLOUD = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
KUBERAY = CLUSTER / "kuberay"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB = KUBERAY / "rayjob-grqo.yaml"
OBJECT_STORE = {"aws": "s3://", "gcp": "gs://"}


# ---------------------------------------------------------------- helpers

def ray_schema() -> dict:
    import ray.autoscaler

    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(path) as f:
        return json.load(f)


def cloud_config(name: str) -> dict:
    return yaml.safe_load(CLOUD[name].read_text())


def header_commands(path: Path) -> list[str]:
    """Shell commands written in the file's leading comment block (`\\` continuations joined)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    commands, current = [], ""
    for line in lines:
        current += line
        if current.endswith("\\"):
            current = current[:-1] + " "
        else:
            commands.append(current)
            current = ""
    return commands


def train_commands(path: Path) -> list[str]:
    """The header's commands that run `dinor1 train CONFIG ...`."""
    return [c for c in header_commands(path) if re.search(r"\bdinor1 train \S", c)]


def train_invocation(command: str) -> tuple[str, list[str]]:
    """(config path, overrides) of the `dinor1 train CONFIG key=value ...` inside ``command``."""
    argv = shlex.split(command, comments=True)
    i = argv.index("dinor1")
    assert argv[i + 1] == "train", command
    return argv[i + 2], argv[i + 3:]


def quantity(value) -> float:
    """A Kubernetes CPU / count quantity: 16, "16", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def k8s_docs(path: Path) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), f"{path}: one object per kind expected, got {kinds}"
    return {d["kind"]: d for d in docs}


SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),                                  # AWS access key id
    re.compile(r"(?i)aws_secret_access_key|aws_session_token"),
    re.compile(r"BEGIN .*PRIVATE KEY"),
    re.compile(r"(?i)[\"']?\bprivate_key(_id)?[\"']?\s*[:=]\s*\S"),   # service-account JSON
    re.compile(r"(?i)\bpassword[\"']?\s*[:=]\s*[^\s{]"),              # password: value
    re.compile(r"(?i)\b(secret|token)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9+/_-]{20,}"),
    re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"),                         # GitHub tokens
    re.compile(r"AIza[0-9A-Za-z_-]{35}"),                              # Google API key
]
# user:password@host in a URI (YAML files only: mlflow.md shows the form as a placeholder)
URI_CREDENTIALS = re.compile(r"[a-z+]+://[^/\s:@]+:[^/\s@]+@")


def find_secrets(text: str, *, uris: bool = True) -> list[str]:
    patterns = SECRET_PATTERNS + ([URI_CREDENTIALS] if uris else [])
    return [m.group(0) for p in patterns for m in p.finditer(text)]


# ---------------------------------------------------------------- cloud launcher configs

@pytest.mark.parametrize("name", sorted(CLOUD))
def test_cloud_config_matches_ray_schema(name):
    jsonschema.validate(cloud_config(name), ray_schema())


@pytest.mark.parametrize("name", sorted(CLOUD))
def test_cloud_config_survives_ray_defaults_and_checks(name):
    """What `ray up` does before any cloud call: merge the provider's defaults.yaml, fill
    per-type worker bounds, validate again (schema + Ray's cross-field checks)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:  # pragma: no cover - depends on the Ray build
        pytest.skip(f"Ray's cluster-launcher helpers not importable: {exc}")
    config = cloud_config(name)
    validate_config(config)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["provider"]["type"] == name
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    # our node types survive the merge unchanged (defaults must not add node types)
    assert prepared["available_node_types"].keys() == config["available_node_types"].keys()


def test_schema_rejects_bad_configs():
    """The schema check is real: a misspelt key, a wrong type or an unknown node-type field fail."""
    schema = ray_schema()
    good = cloud_config("aws")
    misspelt = copy.deepcopy(good)
    misspelt["max_worker"] = misspelt.pop("max_workers")
    wrong_type = copy.deepcopy(good)
    wrong_type["idle_timeout_minutes"] = "ten"
    bad_node_field = copy.deepcopy(good)
    node = next(iter(bad_node_field["available_node_types"].values()))
    node["min_worker"] = node.pop("min_workers")
    fractional = copy.deepcopy(good)
    fractional["available_node_types"]["head"]["resources"] = {"CPU": 0.5}
    for bad in (misspelt, wrong_type, bad_node_field, fractional):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    jsonschema.validate(good, schema)


def test_ray_checks_reject_inconsistent_bounds():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = cloud_config("aws")
    for node in config["available_node_types"].values():
        node["min_workers"] = node.get("max_workers", 0)
    config["max_workers"] = 1  # fewer than the sum of the per-type minimums
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(config))


def gpu_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in config["available_node_types"].items()
            if v["resources"].get("GPU", 0) > 0}


def is_spot(name: str, node_config: dict) -> bool:
    if name == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    if isinstance(scheduling, list):  # Ray's own examples use a one-item list
        scheduling = {k: v for item in scheduling for k, v in item.items()}
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


@pytest.mark.parametrize("name", sorted(CLOUD))
def test_cloud_config_project_rules(name):
    config = cloud_config(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]

    # the head takes no work: 0 CPUs advertised, and `ray start --head --num-cpus 0`
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert head.get("max_workers", 0) == 0
    head_starts = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(head_starts) == 1
    assert re.search(r"--num-cpus[= ]0\b", head_starts[0])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_starts[0]

    # GPU types: one 8-GPU (H100 class), one 1-GPU; all scale from zero
    gpus = gpu_types(config)
    assert sorted(t["resources"]["GPU"] for t in gpus.values()) == [1, 8]
    for t in gpus.values():
        assert t.get("min_workers", 0) == 0 and t["max_workers"] >= 1
        assert t["max_workers"] <= config["max_workers"]
    expected = {"aws": "p5.48xlarge", "gcp": "a3-highgpu-8g"}[name]
    eight = next(t for t in gpus.values() if t["resources"]["GPU"] == 8)
    assert eight["node_config"].get("InstanceType", eight["node_config"].get("machineType")) \
        == expected

    # spot / preemptible for at least one GPU type, on-demand for at least one
    spot = [is_spot(name, t["node_config"]) for t in gpus.values()]
    assert any(spot) and not all(spot)
    if name == "gcp":  # GPU VMs cannot live-migrate
        for t in gpus.values():
            assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"

    # autoscaling back down
    assert config["idle_timeout_minutes"] > 0

    # workers reach the object store through a role, not keys
    for t in gpus.values():
        node = t["node_config"]
        if name == "aws":
            assert node["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
        else:
            assert node["serviceAccounts"][0]["email"].endswith(".iam.gserviceaccount.com")
    assert "gcp_credentials" not in config["provider"]

    # the dashboard / job API stays on the head's loopback; no extra ports opened
    for cmd in config["head_start_ray_commands"]:
        if "ray start" in cmd:
            assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", cmd), cmd
        assert "0.0.0.0" not in cmd, cmd
    if name == "aws":
        assert not config["provider"].get("security_group", {}).get("IpPermissions")
    for cmd in config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "--address=$RAY_HEAD_IP:6379" in cmd

    # the nodes get the project: a clone and `make setup` (or a pip install of it)
    setup = "\n".join(config.get("setup_commands", []))
    assert "git clone" in setup
    assert "make setup" in setup or re.search(r"pip install (-e )?\.", setup)


@pytest.mark.parametrize("name", sorted(CLOUD))
def test_cloud_node_types_hold_the_grqo_job(name):
    """jobs/grqo.yaml's workers (each: cpus_per_worker CPUs, 1 GPU, any custom resources) fit
    the autoscaler's node types: all of them on one 8-GPU node (the 1-GPU type is for
    evaluation and small runs), and the 1-GPU type holds one worker."""
    cfg = load_train_config(ROOT / "jobs" / "grqo.yaml")
    need = {"CPU": cfg.scaling.cpus_per_worker, "GPU": 1.0, **cfg.scaling.resources_per_worker}
    config = cloud_config(name)

    def fits(resources: dict) -> int:
        return int(min(resources.get(k, 0) // v for k, v in need.items()))

    gpus = gpu_types(config)
    eight = next(t for t in gpus.values() if t["resources"]["GPU"] == 8)
    assert fits(eight["resources"]) >= cfg.scaling.num_workers
    assert all(fits(t["resources"]) >= 1 for t in gpus.values())


@pytest.mark.parametrize("name", sorted(CLOUD))
def test_cloud_config_documented_job_is_valid(name):
    """The `ray job submit ... dinor1 train ...` in the header loads with dinor1's config schema
    and keeps shards and checkpoints in the provider's object store."""
    commands = train_commands(CLOUD[name])
    assert commands and all("ray job submit --address http://127.0.0.1:8265" in c
                            for c in commands)
    for command in commands:
        path, overrides = train_invocation(command)
        cfg = load_train_config(ROOT / path, overrides)
        assert cfg.data.train_shards.startswith(OBJECT_STORE[name])
        assert cfg.checkpointing.storage_path.startswith(OBJECT_STORE[name])
    headers = "\n".join(header_commands(CLOUD[name]))
    for verb in (f"ray up cluster/{name}.yaml", f"ray down cluster/{name}.yaml",
                 f"ray dashboard cluster/{name}.yaml"):
        assert verb in headers


# ---------------------------------------------------------------- KubeRay

def cluster_spec_checks(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["version"] == "v2"
    assert options["upscalingMode"] in {"Default", "Aggressive", "Conservative"}
    assert isinstance(options["idleTimeoutSeconds"], int) and options["idleTimeoutSeconds"] > 0

    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert params["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    head_pod = head["template"]["spec"]
    head_container = head_pod["containers"][0]
    assert head_container["image"]
    # KubeRay >= 1.4 rejects autoscalerOptions.version together with this env var
    assert "RAY_enable_autoscaler_v2" not in {e["name"] for e in head_container.get("env", [])}

    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    images = {head_container["image"]}
    for group in groups:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["image"]
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
        params = {**params, **group["rayStartParams"]}
    for pod in [head_pod] + [g["template"]["spec"] for g in groups]:
        assert pod.get("restartPolicy", "Never") == "Never"  # required by autoscaler v2
        assert pod.get("serviceAccountName")
    # CRD: rayStartParams is map[string]string
    assert all(isinstance(v, str) for v in params.values())
    assert len(images) == 1, f"head and workers should run one image: {images}"

    gpu = [g for g in groups if quantity(
        g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))]
    assert gpu, "no worker group with nvidia.com/gpu limits"
    for group in gpu:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
        shm = {v["name"] for v in pod.get("volumes", [])
               if v.get("emptyDir", {}).get("medium") == "Memory"}
        assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm
                   for m in container.get("volumeMounts", []))


def test_raycluster_manifest():
    docs = k8s_docs(RAYCLUSTER)
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["metadata"]["name"]
    cluster_spec_checks(cluster["spec"])
    import ray

    version = cluster["spec"]["rayVersion"]
    assert version.split(".")[:2] == ray.__version__.split(".")[:2], \
        f"rayVersion {version} vs the project's Ray {ray.__version__}"
    account = docs["ServiceAccount"]
    assert account["metadata"]["name"] == cluster["spec"]["headGroupSpec"]["template"]["spec"][
        "serviceAccountName"]
    assert any(k in account["metadata"].get("annotations", {}) for k in
               ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"))


def test_raycluster_documented_job_is_valid():
    commands = train_commands(RAYCLUSTER)
    assert commands
    for command in commands:
        assert "--address http://127.0.0.1:8265" in command  # through kubectl port-forward
        path, overrides = train_invocation(command)
        cfg = load_train_config(ROOT / path, overrides)
        assert cfg.checkpointing.storage_path.startswith(("s3://", "gs://"))
    assert any("kubectl port-forward svc/" in c and "8265" in c
               for c in header_commands(RAYCLUSTER))


def rayjob_config():
    job = k8s_docs(RAYJOB)["RayJob"]
    entrypoint = job["spec"]["entrypoint"]
    assert entrypoint.startswith("dinor1 train jobs/grqo.yaml ")
    path, overrides = train_invocation(entrypoint)
    return job, load_train_config(ROOT / path, overrides), path


def test_rayjob_manifest():
    job, cfg, _ = rayjob_config()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    cluster_spec_checks(spec["rayClusterSpec"])
    # shards and checkpoints in an object store, MLflow on the in-cluster Service
    assert cfg.data.train_shards.startswith(("s3://", "gs://"))
    assert cfg.checkpointing.storage_path.startswith(("s3://", "gs://"))
    assert cfg.mlflow.tracking_uri == "http://mlflow.mlflow.svc:5000"


def test_rayjob_capacity_holds_the_job():
    """The GPU group can hold scaling.num_workers workers (max_workers if elastic) and each
    pod has CPUs left beside a worker for Ray Data."""
    job, cfg, _ = rayjob_config()
    sc = cfg.scaling
    assert sc.use_gpu
    workers = sc.max_workers or sc.num_workers
    gpus_per_worker = sc.gpus_per_worker or 1
    fits = 0
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus, cpus = quantity(limits.get("nvidia.com/gpu", 0)), quantity(limits["cpu"])
        if gpus < gpus_per_worker:
            continue
        per_pod = min(int(gpus // gpus_per_worker), int(cpus // sc.cpus_per_worker))
        assert per_pod >= 1, f"group {group['groupName']}: a worker does not fit one pod"
        assert cpus > per_pod * sc.cpus_per_worker, "no CPU left for Ray Data in the pod"
        fits += per_pod * group["maxReplicas"]
    assert fits >= workers, f"GPU groups hold {fits} workers, the job needs {workers}"


def test_rayjob_runtime_env_matches_job_yaml():
    job, _, path = rayjob_config()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert set(runtime_env) <= set(RUNTIME_ENV_KEYS), set(runtime_env) - set(RUNTIME_ENV_KEYS)
    env_vars = runtime_env.get("env_vars", {})
    assert all(isinstance(v, str) for v in env_vars.values())  # Ray wants strings
    assert env_vars.get("MLFLOW_DISABLE_TELEMETRY") == "true"
    assert "RAY_AUTH_MODE" not in env_vars  # in a job's env_vars it leaves the job PENDING
    # the job YAML's runtime_env: section (what `dinor1 submit` sends) is carried over, but
    # for the working_dir (the image's copy of the repository)
    job_yaml = load_yaml(ROOT / path)
    section = job_yaml["runtime_env"]
    assert {k: str(v) for k, v in section["env_vars"].items()}.items() <= env_vars.items()
    assert set(section) - {"working_dir", "env_vars"} <= set(runtime_env)
    # runtime-env keys at the top of the job YAML are carried over too (env_vars: a superset)
    for key in RUNTIME_ENV_KEYS:
        if key not in job_yaml:
            continue
        if key == "env_vars":
            assert {k: str(v) for k, v in job_yaml[key].items()}.items() <= env_vars.items()
        else:
            assert runtime_env.get(key) == job_yaml[key], key


def test_rayjob_cluster_spec_equals_raycluster():
    """One cluster definition in two files: they must not drift."""
    job = k8s_docs(RAYJOB)
    cluster = k8s_docs(RAYCLUSTER)
    assert job["RayJob"]["spec"]["rayClusterSpec"] == cluster["RayCluster"]["spec"]
    assert job["ServiceAccount"] == cluster["ServiceAccount"]


# ---------------------------------------------------------------- secrets and docs

def cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*")
                  if p.is_file() and p.suffix in {".yaml", ".yml", ".md", ".sh", ".json"})


def test_no_secrets_in_cluster_files():
    files = cluster_files()
    assert {CLOUD["aws"], CLOUD["gcp"], RAYCLUSTER, RAYJOB} <= set(files)
    for path in files:
        found = find_secrets(path.read_text(), uris=path.suffix != ".md")
        assert not found, f"{path.relative_to(ROOT)}: looks like a credential: {found}"


def test_secret_scanner_catches_credentials():
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    samples = [
        f"aws_access_key_id: {key_id}",
        "aws_secret_access_key: abc",
        "-----BEGIN RSA PRIVATE KEY-----",
        '"private_key": "-----BEGIN',
        "password: hunter2",
        "backend: postgresql://mlflow:s3cret@db:5432/mlflow",
        "token: " + "x" * 32,
    ]
    for text in samples:
        assert find_secrets(text), text
    for text in ("# set ssh_private_key to a path", "password: {{ from a Secret }}",
                 "--backend-store-uri postgresql://...", "MLFLOW_BACKEND_STORE_URI"):
        assert not find_secrets(text), text


def test_cluster_readme_lists_the_files():
    readme = (CLUSTER / "README.md").read_text()
    for name in ("aws.yaml", "gcp.yaml", "kuberay/", "local/", "raycluster.yaml",
                 "rayjob-grqo.yaml", "mlflow.md"):
        assert name in readme, name


def test_cluster_files_leave_rays_loopback_switch_alone():
    """Loopback-only Ray is dinor1's choice for a Ray it starts itself; a cluster runs with
    Ray's defaults, so its files neither set Ray's switch nor undo one set by dinor1."""
    for path in sorted(CLUSTER.rglob("*.yaml")):
        assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in path.read_text(), path
