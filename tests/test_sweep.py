"""``dinor1 sweep``: the sweep file, the trials' configs, the sweep tables, and a real 2-trial
sweep (Ray Tune trials running Ray Train + DeepSpeed, scored with dinor1 eval, nested MLflow
runs) whose driver is killed mid-way and resumed, then ``dinor1 compare --sweep``."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from dinor1.compare import _sweep_groups, compare_sweep
from dinor1.errors import UserError
from dinor1.sweep import (
    ROLE_TAG,
    SWEEP_TAG,
    SweepPlan,
    load_sweep,
    trial_config,
    trial_label,
)


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _plan(spec_path: Path, tmp_path: Path, **extra) -> SweepPlan:
    spec = load_sweep(spec_path)
    return SweepPlan(spec=spec.model_dump(mode="json"), job_path="jobs/demo.yaml",
                     storage=str(tmp_path / "s"), tracking_uri="sqlite:///x.db",
                     experiment="e", parent_run_id="p", **extra)


@pytest.mark.parametrize("change, message", [
    ({"name": "a b"}, "name"),
    ({"baseline": "nope"}, "baseline 'nope' is not one of the variants"),
    ({"space": {"grqo.beta": {"normal": [0, 1]}}}, "grqo.beta: one of grid"),
    ({"space": {"grqo.beta": {"uniform": [0]}}}, "uniform takes [low, high]"),
    ({"space": {"seed": {"grid": [1, 2]}}}, "seeds are the 'seeds' list"),
    ({"seeds": [1, 1]}, "seeds must be distinct"),
    ({"search": {"scheduler": "pbt"}}, "search.scheduler"),
    ({"bogus": 1}, "bogus"),
])
def test_a_bad_sweep_file_is_refused_in_one_line_naming_the_key(tmp_path, change, message):
    spec = {"name": "s", "job": "demo", "variants": {"sft": {}, "grqo": {}}, **change}
    with pytest.raises(UserError) as err:
        load_sweep(_write(tmp_path / "s.yaml", spec))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path / "s.yaml") in str(err.value)


def test_trial_configs_layer_sweep_variant_swept_keys_seed_and_branch_point(tmp_path):
    path = _write(tmp_path / "s.yaml", {
        "name": "s", "job": "demo", "seeds": [3], "prefix_sft_epochs": 2,
        "overrides": {"grqo.beta": 0.5, "data.train_short_sides": [96],
                      "data.train_shards": "somewhere"},
        "variants": {"sft": {"stages.sft_epochs": 4, "stages.grqo_epochs": 0},
                     "never": {"grqo.ref_refresh": "never", "grqo.beta": 0.1}},
        "space": {"grqo.alpha": {"grid": [0.02, 0.05]}}})
    plan = _plan(path, tmp_path, prefixes={3: "/ckpt/s3"})
    cfg, label = trial_config(plan, "never", 3, {"grqo.alpha": 0.05})
    assert label == "never-alpha=0.05-s3"
    assert cfg.grqo.ref_refresh == "never" and cfg.grqo.beta == 0.1  # the variant wins
    assert cfg.grqo.alpha == 0.05 and cfg.data.train_short_sides == [96]
    assert cfg.seed == cfg.data.seed == 3
    assert cfg.checkpointing.start_from == "/ckpt/s3"
    assert cfg.checkpointing.storage_path == f"{tmp_path}/s/trials"
    assert cfg.mlflow.run_name == "s-never-alpha=0.05-s3"
    assert cfg.mlflow.experiment == "e" and cfg.eval.every_epochs == 0
    sft, _ = trial_config(plan, "sft", 3, {"grqo.alpha": 0.02})
    assert (sft.stages.sft_epochs, sft.stages.grqo_epochs) == (4, 0)
    # a variant shorter than the prefix cannot branch from it
    path = _write(tmp_path / "t.yaml", {"name": "t", "job": "demo", "prefix_sft_epochs": 5,
                                        "overrides": {"data.train_shards": "x"}})
    with pytest.raises(UserError, match="less than prefix_sft_epochs=5"):
        trial_config(_plan(path, tmp_path), "default", 0, {})
    # asha: the trials evaluate every epoch
    ok = _write(tmp_path / "u.yaml", {"name": "u", "job": "demo",
                                      "overrides": {"data.train_shards": "x"}})
    assert trial_config(_plan(ok, tmp_path, asha=True), "default", 0, {})[0] \
        .eval.every_epochs == 1


def test_trial_labels_are_readable_and_folder_safe():
    assert trial_label("grqo", 0, {}) == "grqo-s0"
    assert trial_label("g", 2, {"grqo.beta": 0.0400001, "grqo.ref_refresh": "steps:50"}) == \
        "g-beta=0.04-ref_refresh=steps_50-s2"


def test_paired_differences_match_by_seed_and_flag_two_std():
    rows = []
    for seed, (sft, grqo, other) in enumerate([(0.30, 0.35, 0.31), (0.20, 0.26, 0.18),
                                               (0.25, 0.29, 0.27)]):
        rows += [{"trial": f"sft-s{seed}", "variant": "sft", "seed": seed, "params": "",
                  "status": "complete", "eval/generic/AP": sft},
                 {"trial": f"grqo-s{seed}", "variant": "grqo", "seed": seed, "params": "",
                  "status": "complete", "eval/generic/AP": grqo},
                 {"trial": f"o-s{seed}", "variant": "o", "seed": seed, "params": "",
                  "status": "complete", "eval/generic/AP": other}]
    rows.append({"trial": "x", "variant": "o", "seed": 9, "params": "", "status": "stopped",
                 "eval/generic/AP": 0.9})  # not complete: left out
    means, paired, stats = _sweep_groups(pd.DataFrame(rows), ["eval/generic/AP"], "sft")
    assert list(means["group"]) == ["sft", "grqo", "o"] and list(means["n"]) == [3, 3, 3]
    assert means.iloc[0]["eval AP"] == "0.250 ± 0.050"
    by_group = dict(zip(paired["group"], paired["eval AP"]))
    # grqo - sft per seed: 0.05, 0.06, 0.04 -> mean 0.05, std 0.01: beyond 2 std
    assert by_group["grqo"] == "+0.050 ± 0.010 (3)*"
    # o - sft: 0.01, -0.02, 0.02 -> mean 0.0033, std 0.0208: not
    assert by_group["o"] == "+0.003 ± 0.021 (3)"
    assert stats[1]["diff"]["eval/generic/AP"] == pytest.approx(0.05)


def _sweep_file(tmp_path: Path, shards: dict) -> Path:
    return _write(tmp_path / "tiny.yaml", {
        "name": "tiny", "job": "demo", "storage_path": str(tmp_path / "runs"),
        "overrides": {
            "data.train_shards": str(shards["train"]), "data.val_shards": str(shards["val"]),
            "eval.support_shards": str(shards["support"]), "stages.max_steps_per_epoch": 3,
            "data.train_short_sides": [96], "data.train_max_size": 96,
            "data.eval_short_side": 96, "data.eval_max_size": 96,
            "checkpointing.every_steps": 3, "mlflow.log_model": False,
            "mlflow.log_every_steps": 1, "schedule.warmup_steps": 0,
            "eval.prompts_per_class": 2, "eval.grid_images": 0,
            "faults.min_step_seconds": 1.0},
        "seeds": [0], "prefix_sft_epochs": 1,
        "variants": {"sft": {"stages.sft_epochs": 3, "stages.grqo_epochs": 0},
                     "grqo": {"stages.sft_epochs": 1, "stages.grqo_epochs": 2}},
        "baseline": "sft", "eval_splits": {"test": str(shards["test"])},
        # ASHA at every epoch, on a metric equal in both trials (the val split's image count)
        # so that it stops neither: what it decides on reached Tune, and the runs are complete.
        # Trials at a time: as many as the cluster fits (the shared one's 4 CPUs: 2)
        "search": {"scheduler": "asha", "grace_period": 1, "metric": "eval/images"}})


def _dinor1(*args: str, log=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dinor1.cli", *args], stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.ray
@pytest.mark.slow
def test_two_trial_sweep_survives_a_killed_driver_into_mlflow_and_compare(ray_address,
                                                                          tmp_path):
    from dinor1.data.prepare import synthesize

    shards = synthesize(str(tmp_path / "data"), image_size=96, num_train=48, num_val=12,
                        num_support=16, num_test=12, long_tail=2.0, workers=2, progress=False)
    sweep = _sweep_file(tmp_path, shards)
    folder = tmp_path / "runs" / "tiny"
    # 1. the driver is killed once the first trial saved a checkpoint of its own
    log = tmp_path / "first.log"
    first = _dinor1("sweep", str(sweep), "--address", ray_address, log=log.open("w"))
    deadline = time.monotonic() + 420
    while not list((folder / "trials").glob("tiny-*/checkpoint_00000006_*")):
        assert first.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no trial checkpoint within 420 s"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    assert "2 trials, 2 at a time" in log.read_text()
    # 2. the same command resumes it: Tune's restore, the trial's run from its checkpoint
    second = _dinor1("sweep", str(sweep), "--address", ray_address)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out
    assert "SFT prefix tiny-sft-prefix-s0 done already" in out
    assert "resuming the sweep" in out or "2 trials, 2 at a time" in out
    assert "paired difference to the baseline" in out

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("dinor1-demo").experiment_id
    runs = client.search_runs([experiment], f"tags.`{SWEEP_TAG}` = 'tiny'")
    roles = sorted(r.data.tags[ROLE_TAG] for r in runs)
    assert roles == ["prefix", "sweep", "trial", "trial"]  # one MLflow run per trial: resumed
    parent = next(r for r in runs if r.data.tags[ROLE_TAG] == "sweep")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/trials_complete"] == 2
    for run in runs:
        if run.data.tags[ROLE_TAG] != "sweep":
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    trials = {r.info.run_name: r for r in runs if r.data.tags[ROLE_TAG] == "trial"}
    assert set(trials) == {"tiny-sft-s0", "tiny-grqo-s0"}
    for run in trials.values():
        assert run.info.status == "FINISHED"
        for split in ("eval", "test"):  # scored at the end on val and the test split
            assert 0.0 <= run.data.metrics[f"{split}/generic/AP"] <= 1.0
            assert f"{split}/generic/APr" in run.data.metrics  # long-tailed: r/c/f groups
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
        assert sorted(set(steps)) == [4, 5, 6, 7, 8, 9]  # branched from the prefix's step 3
    # one trial was interrupted after its step-6 checkpoint and resumed from it
    resumed = [json.dumps([m.value for m in client.get_metric_history(r.info.run_id,
                                                                      "resume/step")])
               for r in trials.values()]
    assert any("6.0" in r for r in resumed), resumed
    # Tune saw every epoch's val AP (ASHA's input), then the final result
    progress = pd.concat(pd.read_csv(p) for p in (folder / "tune").glob("*/progress.csv"))
    # (epochs counted from the run's start: the prefix trained epoch 1, the trials 2 and 3)
    assert set(progress["train/epochs_done"].dropna()) == {2.0, 3.0}
    assert progress["eval/images"].eq(12).all() and progress["eval/generic/AP"].notna().all()

    table = compare_sweep("dinor1-demo", "tiny", tracking_uri=uri, out_dir=tmp_path / "cmp")
    assert list(table.trials["status"]) == ["complete", "complete"]
    assert list(table.means["group"]) == ["sft", "grqo"]
    assert list(table.paired["group"]) == ["grqo"]
    assert table.paired.iloc[0]["test AP"].endswith("(1)")
    assert table.png.stat().st_size > 10_000 and table.markdown.is_file()
    cli = subprocess.run([sys.executable, "-m", "dinor1.cli", "compare", "--experiment",
                          "dinor1-demo", "--sweep", "tiny", "--tracking-uri", uri, "--out",
                          str(tmp_path / "cmp2")], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "mean ± std over seeds" in cli.stdout and "tiny-grqo-s0" in cli.stdout


def test_compare_sweep_names_a_missing_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("x")
    with pytest.raises(UserError, match="no trials of sweep 'nope'"):
        compare_sweep("x", "nope", tracking_uri=uri, out_dir=tmp_path)
