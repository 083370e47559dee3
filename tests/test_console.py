"""What a command prints: quiet by default, the libraries' output with --verbose, and the
training progress line (often enough, never twice)."""

import io
import logging
import os
import subprocess
import sys
import warnings

import pytest

from dinor1 import console
from dinor1.cli import build_parser
from dinor1.train.progress import ProgressLine


@pytest.fixture
def restored():
    """configure() changes this process's environment, warning filters and logger levels."""
    env = dict(os.environ)
    names = ("mlflow", "transformers", "ray._private.authentication.authentication_token_setup")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        yield
    os.environ.clear()
    os.environ.update(env)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_quiet_by_default_and_verbose_leaves_the_libraries_alone(restored, monkeypatch):
    for key in (*console.quiet_env(), console.VERBOSE_ENV, console.PRINT_PATCH_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHONWARNINGS", "error::UserWarning")
    console.configure(verbose=True)
    assert console.is_verbose()
    assert "RAY_DATA_DISABLE_PROGRESS_BARS" not in os.environ
    assert os.environ["PYTHONWARNINGS"] == "error::UserWarning"
    assert console.worker_env() == {console.VERBOSE_ENV: "1", console.PRINT_PATCH_ENV: "0"}

    console.configure(verbose=False)
    console.configure(verbose=False)  # (the tests call main() many times: no growth)
    assert not console.is_verbose()
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    assert os.environ["RAY_DISABLE_WORKER_LOG_PREFIX"] == "1"
    filters = os.environ["PYTHONWARNINGS"].split(",")
    assert filters[-1] == "error::UserWarning"  # the user's own filters still win
    assert len(filters) == len(console.NOISY_WARNINGS) + 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        console.ignore_noisy_warnings()
        for message, category in console.NOISY_WARNINGS:
            warnings.warn(f"{message} and will be removed", category, stacklevel=1)
        warnings.warn("something else is deprecated", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    workers = console.worker_env()
    assert workers[console.VERBOSE_ENV] == "0" and workers["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    assert "RAY_DATA_LOGGING_CONFIG" not in workers  # (a file of this machine)


def test_ray_data_console_shows_errors_only_and_its_log_file_everything(tmp_path):
    config = console.quiet_env()["RAY_DATA_LOGGING_CONFIG"]
    code = ("import logging, ray.data\n"
            "handlers = {h.name: h.level for h in logging.getLogger('ray.data').handlers}\n"
            "print(handlers['console'] == logging.ERROR, 'file' in handlers,\n"
            "      logging.getLogger('ray.data').level == logging.DEBUG)\n")
    env = {**os.environ, "RAY_DATA_LOGGING_CONFIG": config}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["True", "True", "True"], out.stderr


@pytest.mark.parametrize("argv", [["--verbose", "demo"], ["demo", "--verbose"],
                                  ["train", "demo", "--verbose", "seed=1"],
                                  ["predict", "--verbose", "--checkpoint", "c", "--image", "i"]])
def test_verbose_before_or_after_the_command(argv):
    assert build_parser().parse_known_args(argv)[0].verbose is True
    without = [a for a in argv if a != "--verbose"]
    assert build_parser().parse_known_args(without)[0].verbose is False


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _run(line: ProgressLine, clock: _Clock, first: int, last: int, seconds_per_step: float):
    for step in range(first, last + 1):
        clock.now += seconds_per_step
        line.step({"loss/total": 1.0 / step, "train/samples_per_s": 8.0,
                   "train/step_seconds": seconds_per_step}, step, epoch=0, stage="sft")


def test_progress_line_about_ten_times_a_short_run_never_twice():
    clock, out = _Clock(), io.StringIO()
    line = ProgressLine("sft-s0", 1250, every_steps=10, verbose=False, clock=clock, out=out)
    _run(line, clock, 751, 1250, 0.25)  # a branch: 500 steps, ~2 min
    lines = out.getvalue().splitlines()
    assert lines[0] == "[train sft-s0] step 751/1250 (60%) epoch 0 sft loss 0.0013"
    assert lines[-1].startswith("[train sft-s0] step 1250/1250 (100%)")
    assert 8 <= len(lines) <= 13 and len(set(lines)) == len(lines)
    steps = [int(x.split()[3].split("/")[0]) for x in lines]
    gaps = [b - a for a, b in zip(steps[1:], steps[2:])]  # (after the first line)
    assert min(gaps) * 0.25 >= ProgressLine.MIN_SECONDS
    assert (1250 - steps[-2]) * 0.25 >= ProgressLine.MIN_SECONDS / 2  # none just before the end
    assert all(" 8.0 samples/s eta " in x for x in lines[1:])


def test_progress_line_once_a_minute_for_a_long_run_and_each_n_steps_verbose():
    clock, out = _Clock(), io.StringIO()
    line = ProgressLine("big", 100_000, verbose=False, clock=clock, out=out)
    _run(line, clock, 1, 2400, 0.5)  # 20 minutes of a ~14 hour run
    assert 19 <= len(out.getvalue().splitlines()) <= 22
    eta = float(out.getvalue().splitlines()[-1].split("eta ")[1].split()[0])
    assert eta == pytest.approx((100_000 - 2400) * 0.5 / 60, rel=0.01)
    clock, out = _Clock(), io.StringIO()
    line = ProgressLine("v", 100, every_steps=10, verbose=True, clock=clock, out=out)
    _run(line, clock, 1, 100, 60.0)
    assert [int(x.split()[3].split("/")[0]) for x in out.getvalue().splitlines()] == [
        1, *range(10, 101, 10)]
