"""The installed `dinor1` console script: help, one-line errors, convert + inspect."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_coco

DINOR1 = str(Path(sys.executable).parent / "dinor1")


def run(*args, check_rc=None):
    proc = subprocess.run([DINOR1, *args], capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("cmd", [[], ["data"], ["data", "synth"], ["data", "convert"],
                                 ["data", "inspect"], ["bench", "data"], ["bench", "model"],
                                 ["bench", "overhead"], ["bench", "memory"], ["bench", "eval"],
                                 ["mlflow", "sync"], ["demo"]])
def test_help(cmd):
    out = run(*cmd, "--help", check_rc=0).stdout
    assert "usage: dinor1" in out


def test_errors_are_one_line_without_traceback(tmp_path):
    proc = run("data", "inspect", str(tmp_path / "missing"), check_rc=2)
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("dinor1: error:") and "missing" in proc.stderr
    proc = run("data", "convert", "coco", "--out", str(tmp_path / "o"), check_rc=2)
    assert "--annotations" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("--debug", "data", "inspect", str(tmp_path / "missing"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_convert_then_inspect_verifies_checksums(tmp_path):
    ann, images, _ = make_coco(tmp_path / "src", num_images=6)
    out = tmp_path / "shards"
    run("data", "convert", "coco", "--annotations", str(ann), "--images", str(images),
        "--out", str(out), "--samples-per-shard", "4", "--workers", "1", check_rc=0)
    proc = run("data", "inspect", str(out), check_rc=0)
    assert "6 samples" in proc.stdout and "2/2 match" in proc.stdout
    assert "cat" in proc.stdout and (out / "inspect_grid.png").stat().st_size > 0
    again = run("data", "convert", "coco", "--annotations", str(ann), "--images", str(images),
                "--out", str(out), "--samples-per-shard", "4", "--workers", "1", check_rc=0)
    assert "0 of 2 shards to write" in again.stderr
    with open(out / "shard-000001.tar", "r+b") as f:
        f.seek(700)
        f.write(b"XXXX")
    proc = run("data", "inspect", str(out), check_rc=1)
    assert "MISMATCH" in proc.stdout and "shard-000001.tar" in proc.stdout


def test_overrides_may_follow_options(capsys):
    from dinor1.cli import main

    job = str(Path(__file__).parents[1] / "jobs" / "demo.yaml")
    assert main(["train", job, "--check", "data.batch_size=3", "scaling.num_workers=1"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 3" in out and "num_workers: 1" in out
    with pytest.raises(SystemExit):
        main(["train", job, "--check", "--bogus"])
    with pytest.raises(SystemExit):
        main(["train", job, "--check", "not-an-override"])


def test_packaged_job_by_name(tmp_path, monkeypatch, capsys):
    """`dinor1 train grqo` / `demo.yaml` name the packaged jobs (the files of jobs/) from any
    folder; a file of that name in the current folder wins."""
    from dinor1.cli import main
    from dinor1.jobs_index import packaged_job, packaged_jobs

    jobs = Path(__file__).parents[1] / "jobs"
    assert packaged_jobs() == sorted(p.stem for p in jobs.glob("*.yaml"))
    assert packaged_job("grqo").read_bytes() == (jobs / "grqo.yaml").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "grqo", "--check"]) == 0
    assert "train_shards: shards/o365/train" in capsys.readouterr().out
    assert main(["train", "demo.yaml", "--check", "data.batch_size=3"]) == 0
    assert "batch_size: 3" in capsys.readouterr().out
    (tmp_path / "demo.yaml").write_text("data:\n  train_shards: mine\n")
    assert main(["train", "demo.yaml", "--check"]) == 0
    assert "train_shards: mine" in capsys.readouterr().out


@pytest.mark.parametrize("job", ["nosuchjob", "jobs/nosuchjob.yaml"])
def test_unknown_job_is_one_line_listing_packaged_jobs(job, tmp_path, monkeypatch, capsys):
    from dinor1.cli import main
    from dinor1.jobs_index import packaged_jobs

    monkeypatch.chdir(tmp_path)
    assert main(["train", job, "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dinor1: error:") and job in err
    assert {"demo", "grqo", "sft"} <= set(packaged_jobs())
    assert f"packaged jobs: {', '.join(packaged_jobs())})" in err
