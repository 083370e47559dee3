"""`dinor1 submit` before anything is sent: the runtime env from the job file, the entrypoint,
relative paths made absolute, one-line errors. (The submission itself, to a real Ray head, is
in tests/train/test_job_submit.py.)"""

import json
import shlex
from pathlib import Path

import pytest

from dinor1.cli import main
from dinor1.errors import UserError
from dinor1.submit import build_submission

ROOT = Path(__file__).parents[2]


def test_demo_job_entrypoint_and_runtime_env(monkeypatch):
    monkeypatch.chdir(ROOT)
    sub = build_submission("jobs/demo.yaml", ["stages.sft_epochs=1", "data.batch_size=2"])
    assert sub.entrypoint[:5] == ["python", "-m", "dinor1.cli", "train", "jobs/demo.yaml"]
    args = sub.entrypoint[5:]
    assert "stages.sft_epochs=1" in args and "data.batch_size=2" in args
    # the job runs in a copy of the working dir that Ray deletes: local paths become absolute
    assert f"data.train_shards={ROOT / 'demo_output/shards/train'}" in args
    assert f"checkpointing.storage_path={ROOT / 'demo_output/runs'}" in args
    assert f"eval.support_shards={ROOT / 'demo_output/shards/support'}" in args
    assert not any(a.startswith("model.init=") for a in args)  # a preset name, not a path
    assert sub.runtime_env["working_dir"] == str(ROOT)
    assert sub.runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1"


def test_overridden_paths_once_absolute_and_uris_kept(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    sub = build_submission("jobs/demo.yaml", ["data.train_shards=[a/x, s3://b/y]",
                                              "checkpointing.storage_path=s3://bucket/runs",
                                              "mlflow.tracking_uri=http://127.0.0.1:5000"])
    args = sub.entrypoint[5:]
    shards = [a for a in args if a.startswith("data.train_shards=")]
    assert shards == [f"data.train_shards={json.dumps([str(ROOT / 'a/x'), 's3://b/y'])}"]
    assert [a for a in args if a.startswith("checkpointing.storage_path=")] == \
        ["checkpointing.storage_path=s3://bucket/runs"]


def test_dry_run_prints_the_equivalent_ray_job_submit(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["submit", "jobs/demo.yaml", "--dry-run", "--address",
                 "http://127.0.0.1:8265", "stages.sft_epochs=1"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[:5] == ["ray", "job", "submit", "--address", "http://127.0.0.1:8265"]
    env = json.loads(words[words.index("--runtime-env-json") + 1])
    assert env["working_dir"] == str(ROOT) and env["env_vars"] == {"PYTHONUNBUFFERED": "1"}
    assert words[words.index("--") + 1:][:5] == ["python", "-m", "dinor1.cli", "train",
                                                 "jobs/demo.yaml"]


def _job(tmp_path, runtime_env: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(f"runtime_env:\n{runtime_env}\ndata:\n  train_shards: shards\n")
    return job


@pytest.mark.parametrize("runtime_env, message", [
    ("  workdir: .", "runtime_env.workdir: not a Ray runtime-environment key"),
    ("  env_vars:\n    RAY_AUTH_MODE: token", "runtime_env.env_vars.RAY_AUTH_MODE: set by the "
                                               "cluster"),
    ("  env_vars: [A]", "runtime_env.env_vars must be a mapping"),
    ("  working_dir: nowhere", "runtime_env.working_dir: no folder"),
])
def test_bad_runtime_env_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys,
                                                    runtime_env, message):
    monkeypatch.chdir(tmp_path)
    assert main(["submit", str(_job(tmp_path, runtime_env)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_job_outside_the_working_dir_is_refused(tmp_path, monkeypatch):
    (tmp_path / "code").mkdir()
    monkeypatch.chdir(tmp_path / "code")
    with pytest.raises(UserError, match="not inside runtime_env.working_dir"):
        build_submission(str(_job(tmp_path, "  working_dir: .")), [])


def test_config_errors_fail_before_submitting(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["submit", "jobs/demo.yaml", "--dry-run", "data.batch_size=four"]) == 2
    assert "'data.batch_size'" in capsys.readouterr().err


def test_train_ignores_the_runtime_env_section(capsys):
    assert main(["train", str(ROOT / "jobs" / "grqo.yaml"), "--check"]) == 0
    assert "runtime_env" not in capsys.readouterr().out


def test_resources_per_worker_takes_custom_resources_only():
    from dinor1.config import load_train_config

    job = ROOT / "jobs" / "demo.yaml"
    cfg = load_train_config(job, ["scaling.resources_per_worker={trainer: 1}"])
    assert cfg.scaling.resources_per_worker == {"trainer": 1.0}
    with pytest.raises(UserError, match="'scaling.resources_per_worker': 'CPU': set it with"):
        load_train_config(job, ["scaling.resources_per_worker={CPU: 1}"])
    with pytest.raises(UserError, match="'trainer': must be > 0"):
        load_train_config(job, ["scaling.resources_per_worker={trainer: 0}"])
