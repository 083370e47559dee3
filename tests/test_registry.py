"""A model directory logged as an MLflow model and registered, against a real `mlflow server` on
127.0.0.1: the version carries the metrics and the alias; `models:/NAME@ALIAS` and
`models:/NAME/VERSION` load in the Python API, `dinor1 predict` and MLflow's own pyfunc
loader, all giving the detections of the directory itself; unknown names are one line."""

import base64
import json

import mlflow
import pandas as pd
import pytest
import yaml

from dinor1.errors import UserError
from tests.helpers import MlflowServer, tiny_model, write_image


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A training run folder as `dinor1 train` leaves it: final_model, resolved_config.yaml."""
    folder = tmp_path_factory.mktemp("run")
    tiny_model(folder / "final_model")
    (folder / "resolved_config.yaml").write_text(yaml.safe_dump(
        {"data": {"eval_short_side": 96, "eval_max_size": 96}}))
    return folder


@pytest.fixture(scope="module")
def registered(server, run_folder):
    from dinor1.registry import log_model

    client = mlflow.MlflowClient(server)
    experiment = client.create_experiment("registry-test")
    run = client.create_run(experiment, run_name="train")
    client.set_terminated(run.info.run_id)
    lines = []
    out = log_model(str(run_folder / "final_model"), run_id=run.info.run_id,
                    tracking_uri=server, metrics={"eval/bbox_mAP": 0.25},
                    register_as="dinor1-test", alias="champion", log=lines.append)
    assert lines == ["[mlflow] model registered dinor1-test version 1 (@champion)"]
    return run.info.run_id, out


def test_the_version_has_the_metrics_the_alias_and_the_run(server, registered):
    run_id, out = registered
    client = mlflow.MlflowClient(server)
    version = client.get_model_version_by_alias("dinor1-test", "champion")
    assert version.version == out["version"] == "1" and version.run_id == run_id
    assert version.tags["eval/bbox_mAP"] == "0.25"
    assert client.get_logged_model(out["model_id"]).tags["eval/bbox_mAP"] == "0.25"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_registered_model_loads_everywhere_with_the_same_detections(server, registered,
                                                                      run_folder, tmp_path,
                                                                      monkeypatch):
    from dinor1 import Detector
    from dinor1.cli import main

    image = tmp_path / "street.jpg"
    write_image(image, 96, 80, seed=1)
    boxes = ["10,10,40,30:car", "5,40,30,78:person"]
    expected = Detector.from_pretrained(str(run_folder / "final_model"))(str(image), boxes=boxes)
    assert expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    for uri in ("models:/dinor1-test@champion", "models:/dinor1-test/1"):
        detector = Detector.from_pretrained(uri)
        assert (detector.short_side, detector.max_size) == (96, 96)  # the run's resolution
        assert detector(str(image), boxes=boxes) == expected
    out = tmp_path / "p.json"
    assert main(["predict", "--checkpoint", "models:/dinor1-test@champion", "--image",
                 str(image), "--box", boxes[0], "--box", boxes[1], "--json", str(out),
                 "--out", str(tmp_path / "p.png")]) == 0
    assert [d["box_xyxy"] for d in json.loads(out.read_text())["detections"]] == \
        [d["box_xyxy"] for d in expected]
    # MLflow's own loader: one JSON request per row -> one JSON list of detections per row
    model = mlflow.pyfunc.load_model("models:/dinor1-test@champion")
    request = {"image": base64.b64encode(image.read_bytes()).decode(),
               "boxes": [[10, 10, 40, 30, "car"], "5,40,30,78:person"]}
    found = model.predict(pd.DataFrame({"request": [json.dumps(request)]}))
    assert json.loads(found["detections"][0]) == expected


def test_unknown_models_are_one_line(server, registered, monkeypatch):
    from dinor1 import Detector

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    for uri, message in [("models:/dinor1-test@nobody", "not found in the MLflow registry"),
                         ("models:/no-such-model/1", "not found in the MLflow registry"),
                         ("models:/dinor1-test", "give a version or an alias")]:
        with pytest.raises(UserError) as error:
            Detector.from_pretrained(uri)
        assert message in str(error.value) and "\n" not in str(error.value), error.value
