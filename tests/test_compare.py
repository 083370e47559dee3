"""``dinor1 compare`` against a real MLflow sqlite store (and, once, a real ``mlflow server`` on
127.0.0.1): two training runs, one scored by a separate eval run, compared in a table and a PNG."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from PIL import Image

from dinor1.compare import add_compare_parser, cmd_compare, compare_runs
from dinor1.errors import UserError
from tests.helpers import free_port, wait_http

EXPERIMENT = "compare-test"
T0 = 1_700_000_000_000  # ms; runs start one second apart, in this order


def _params(sft: int, grqo: int) -> dict[str, str]:
    return {"stages.sft_epochs": str(sft), "stages.grqo_epochs": str(grqo),
            "model.init": "tiny-cpu", "data.batch_size": "4", "optimizer.lr": "0.0001",
            "scaling.num_workers": "2", "deepspeed.zero_stage": "2", "grqo.form": "release",
            "grqo.alpha": "0.01", "grqo.beta": "0.04"}


def _log(client, run_id: str, params: dict[str, str], metrics: list[tuple[str, float, int]]):
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(k, v, T0, step) for k, v, step in metrics])


def populate(uri: str, artifact_location: str | None) -> dict[str, str]:
    """The experiment the tests compare; returns run name -> run id.

    sft-only: SFT 2, loss/total at steps 5..20, eval metrics logged on the run itself, finished
    after 90 s. sft1-grqo1: SFT 1 + GRQO 1, steps 5..30, still running, scored by two eval runs
    of which the later one must win.
    """
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
    ids = {}
    sft = client.create_run(exp, run_name="sft-only", start_time=T0).info.run_id
    _log(client, sft, _params(2, 0),
         [("loss/total", 4.0 - i, 5 * (i + 1)) for i in range(4)]
         + [("eval/generic/AP50", 0.25, 20), ("eval/generic/AP", 0.1, 20),
            ("train/samples_per_s", 11.0, 20)])
    client.set_terminated(sft, end_time=T0 + 90_000)
    grqo = client.create_run(exp, run_name="sft1-grqo1", start_time=T0 + 1000).info.run_id
    _log(client, grqo, _params(1, 1),
         [("loss/total", 6.0 - i, 5 * (i + 1)) for i in range(6)]
         + [("train/samples_per_s", 9.0, 30)])
    for n, (ap50, ap) in enumerate([(0.1, 0.05), (0.5, 0.3)]):
        tags = {"dinor1.run_kind": "eval", "dinor1.train_run_id": grqo}
        ev = client.create_run(exp, run_name=f"eval-{n}", start_time=T0 + 2000 + 1000 * n,
                               tags=tags).info.run_id
        _log(client, ev, {}, [("eval/generic/AP50", ap50, 0), ("eval/generic/AP", ap, 0)])
        client.set_terminated(ev, end_time=T0 + 2500 + 1000 * n)
        ids[f"eval-{n}"] = ev
    ids.update({"sft-only": sft, "sft1-grqo1": grqo})
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating its schema is the slow part)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ids = populate(uri, (root / "artifacts").as_uri())
        yield uri, ids


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _row(table: pd.DataFrame, name: str) -> pd.Series:
    return table.set_index("run").loc[name]


def test_table_merges_eval_runs_and_writes_files(store, tmp_path):
    uri, ids = store
    result = compare_runs(EXPERIMENT, tracking_uri=uri, out_dir=tmp_path / "out")
    table = result.table
    assert list(table["run"]) == ["sft-only", "sft1-grqo1"]  # eval runs folded in, not rows
    assert list(table["run_id"]) == [ids["sft-only"][:8], ids["sft1-grqo1"][:8]]
    assert list(table["status"]) == ["FINISHED", "RUNNING"]
    sft, grqo = _row(table, "sft-only"), _row(table, "sft1-grqo1")
    assert sft["recipe"] == "SFT 2" and grqo["recipe"] == "SFT 1 + GRQO 1"
    assert sft["eval/generic/AP50"] == 0.25 and sft["eval/generic/AP"] == 0.1
    assert grqo["eval/generic/AP50"] == 0.5 and grqo["eval/generic/AP"] == 0.3  # latest wins
    assert [c for c in table.columns if c.startswith(("eval/", "train/"))] == [
        "eval/generic/AP", "eval/generic/AP50"]
    assert list(table["steps"]) == [20, 30]
    assert sft["wall"] == "1.5 min" and grqo["wall"] == "running"
    assert sft["grqo.form"] == "" and grqo["grqo.form"] == "release" and grqo["grqo.beta"] == "0.04"
    assert grqo["model.init"] == "tiny-cpu" and grqo["deepspeed.zero_stage"] == "2"

    assert result.png == tmp_path / "out" / "compare.png"
    with Image.open(result.png) as image:
        image.verify()
        assert image.size[0] > 800
    assert len(pd.read_csv(result.csv)) == 2
    markdown = result.markdown.read_text()
    assert "| run | run_id |" in markdown and "sft-only" in markdown and "sft1-grqo1" in markdown
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the global URI is put back


def test_metric_and_runs_select_columns_and_rows(store, tmp_path):
    uri, ids = store
    table = compare_runs(EXPERIMENT, tracking_uri=uri, runs=["sft1-grqo1"],
                         metrics=["train/samples_per_s", "eval/generic/AP50"],
                         out_dir=tmp_path).table
    assert list(table["run"]) == ["sft1-grqo1"]
    assert list(table.columns[table.columns.get_loc("train/samples_per_s"):]) == [
        "train/samples_per_s", "eval/generic/AP50", "steps", "wall"]
    assert table["eval/generic/AP50"].iloc[0] == 0.5
    # a short id picks its run; an eval run's id picks the training run it scored
    table = compare_runs(EXPERIMENT, tracking_uri=uri, out_dir=tmp_path,
                         runs=[ids["sft-only"][:8], ids["eval-0"]]).table
    assert list(table["run"]) == ["sft-only", "sft1-grqo1"]


def test_errors_name_what_is_missing(store, tmp_path):
    uri, _ = store
    with pytest.raises(UserError, match="no-such-run"):
        compare_runs(EXPERIMENT, tracking_uri=uri, runs=["no-such-run"], out_dir=tmp_path)
    with pytest.raises(UserError, match="no-such-experiment"):
        compare_runs("no-such-experiment", tracking_uri=uri, out_dir=tmp_path)
    with pytest.raises(UserError, match="eval/generic/AP75"):
        compare_runs(EXPERIMENT, tracking_uri=uri, metrics=["eval/generic/AP75"],
                     out_dir=tmp_path)
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI"):
        compare_runs(EXPERIMENT, out_dir=tmp_path)
    with pytest.raises(UserError, match="missing.db"):
        compare_runs(EXPERIMENT, tracking_uri=f"sqlite:///{tmp_path}/missing.db")
    assert not (tmp_path / "missing.db").exists()


def test_cli_prints_table_and_paths(store, tmp_path, capsys, monkeypatch):
    uri, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the default when --tracking-uri is absent
    parser = argparse.ArgumentParser(prog="dinor1")
    add_compare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--experiment", EXPERIMENT,
                              "--out", str(tmp_path / "cli")])
    assert cmd_compare(args) == 0
    out = capsys.readouterr().out
    assert "sft-only" in out and "sft1-grqo1" in out and "SFT 1 + GRQO 1" in out
    assert str(tmp_path / "cli" / "compare.png") in out
    assert (tmp_path / "cli" / "compare.csv").is_file()




def test_against_mlflow_server(tmp_path):
    port = free_port()
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health")
        populate(uri, None)
        table = compare_runs(EXPERIMENT, tracking_uri=uri, out_dir=tmp_path / "out").table
        assert list(table["recipe"]) == ["SFT 2", "SFT 1 + GRQO 1"]
        assert _row(table, "sft1-grqo1")["eval/generic/AP50"] == 0.5
        assert (tmp_path / "out" / "compare.png").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)  # the parent stops its workers
        proc.wait(timeout=30)
