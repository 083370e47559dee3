"""Re-running a run name: a run folder keeps the settings it was started with
(``resolved_config.yaml``); new settings or a finished run are refused in one line before
anything starts, unless ``checkpointing.resume=true``."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dinor1.config import load_train_config
from dinor1.errors import UserError
from dinor1.train.launch import FINISHED, check_rerun, config_changes
from tests.helpers import subprocess_env, synthetic_train_shards

ROOT = Path(__file__).parents[2]
JOB = ROOT / "jobs" / "demo.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return synthetic_train_shards(tmp_path_factory.mktemp("synth"), 8, 8)


def _config(shards, storage, *overrides):
    return load_train_config(JOB, [f"data.train_shards={shards}",
                                   f"checkpointing.storage_path={storage}", *overrides])


def _stored_run(shards, storage, *overrides, finished=False):
    """A run folder as ``dinor1 train`` leaves it (its config, MLflow run id, maybe done)."""
    folder = storage / "demo"
    folder.mkdir(parents=True)
    cfg = _config(shards, storage, *overrides)
    (folder / "resolved_config.yaml").write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (folder / "mlflow_run_id").write_text("0123abcd")
    if finished:
        (folder / FINISHED).write_text("0123abcd\n")
    return folder


def test_changed_settings_are_refused_naming_them(shards, tmp_path):
    _stored_run(shards, tmp_path)
    cfg = _config(shards, tmp_path, "optimizer.lr=1e-5", "data.batch_size=2")
    with pytest.raises(UserError) as caught:
        check_rerun(cfg, tmp_path, "demo")
    message = str(caught.value)
    assert message.startswith(f"run demo exists in {tmp_path} with other settings (")
    assert "data.batch_size: 4 -> 2" in message and "optimizer.lr: 0.0004 -> 1e-05" in message
    assert "checkpointing.resume=true" in message and "\n" not in message


def test_finished_run_is_not_re_entered(shards, tmp_path):
    _stored_run(shards, tmp_path, finished=True)
    with pytest.raises(UserError, match=r"run demo in .* is finished; set "
                                        r"checkpointing.resume=true to continue it"):
        check_rerun(_config(shards, tmp_path), tmp_path, "demo")


def test_an_interrupted_run_resumes_and_resume_true_continues_with_changes(shards, tmp_path):
    _stored_run(shards, tmp_path)  # no final model: it stopped before the end
    assert check_rerun(_config(shards, tmp_path), tmp_path, "demo") == []
    assert check_rerun(_config(shards, tmp_path, "checkpointing.resume=true"), tmp_path,
                       "demo") == []  # resume itself is no change of settings
    changed = _config(shards, tmp_path, "checkpointing.resume=true", "optimizer.lr=1e-5")
    assert check_rerun(changed, tmp_path, "demo") == ["optimizer.lr: 0.0004 -> 1e-05"]
    (tmp_path / "demo" / FINISHED).write_text("done\n")
    assert check_rerun(changed, tmp_path, "demo") == ["optimizer.lr: 0.0004 -> 1e-05"]
    # a new name is a new run
    assert check_rerun(_config(shards, tmp_path, "optimizer.lr=1e-5", "checkpointing.name=b"),
                       tmp_path, "b") == []


def test_config_changes_names_added_and_removed_keys():
    assert config_changes({"a": {"b": 1, "c": [1, 2]}, "gone": 1},
                          {"a": {"b": 1, "c": [1, 3]}, "new": "x"}) == [
        "a.c: [1, 2] -> [1, 3]", "gone: 1 -> (unset)", "new: (unset) -> x"]


def test_a_key_added_since_the_run_was_stored_is_unchanged_at_its_default():
    # a run folder written before objectives.focal_alpha existed resumes with the default
    stored = {"objectives": {"bbox_weight": 5.0}}
    defaults = {"objectives": {"bbox_weight": 5.0, "focal_alpha": 0.25}}
    assert config_changes(stored, defaults, defaults) == []
    assert config_changes(stored, {"objectives": {"bbox_weight": 5.0, "focal_alpha": 0.5}},
                          defaults) == ["objectives.focal_alpha: (unset) -> 0.5"]


@pytest.mark.parametrize("finished, overrides, message", [
    (False, ["optimizer.lr=1e-5"], "with other settings (optimizer.lr: 0.0004 -> 1e-05)"),
    (True, [], "is finished; set checkpointing.resume=true"),
])
def test_cli_refuses_in_one_line_before_starting_anything(shards, tmp_path, finished, overrides,
                                                          message):
    """The issue's case: after a finished run, the same command with optimizer.lr=1e-5 exited 0
    having trained nothing, and MLflow kept the old lr."""
    folder = _stored_run(shards, tmp_path, finished=finished)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dinor1"), "train", str(JOB),
         f"data.train_shards={shards}", f"checkpointing.storage_path={tmp_path}", *overrides],
        env=subprocess_env(RAY_ADDRESS="127.0.0.1:1"),  # nothing there: Ray must not be reached
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dinor1: error: run demo ") and message in last, last
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["mlflow_run_id", "resolved_config.yaml", *([FINISHED] if finished else [])])
    assert not (tmp_path / "mlflow.db").exists()
