"""`dinor1 eval` end to end: real Ray Data actors over synthetic shards, real pycocotools, a real
MLflow sqlite store; and evaluation inside a real Ray Train + DeepSpeed run."""

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dinor1.cli import main
from dinor1.config import load_train_config
from dinor1.data_pipelines.converters import load_coco
from dinor1.data_pipelines.shard_writer import write_shards
from dinor1.data_pipelines.synthetic import SyntheticConfig, generate_synthetic_coco
from dinor1.eval.inference import ground_truth_of
from tests.helpers import write_tar

ROOT = Path(__file__).parents[2]
SIZE = ["data.train_short_sides=[96]", "data.train_max_size=96", "data.eval_short_side=96",
        "data.eval_max_size=96"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Synthetic train/val/support shards; val also holds one shard with a corrupt sample."""
    out = tmp_path_factory.mktemp("synth")
    splits = generate_synthetic_coco(out / "coco", SyntheticConfig(
        image_size=96, num_train=160, num_val=23, num_support=32))
    for split, ann in splits.items():
        write_shards(load_coco(ann, out / "coco" / "images" / split, split=split),
                     out / "shards" / split, samples_per_shard=40, progress=False)
    write_tar(out / "shards" / "val" / "shard-000099.tar", [
        ("000000999999.jpg", b"not a jpeg"),
        ("000000999999.json", json.dumps({"image_id": 999999, "annotations": []}).encode())])
    return out / "shards"


def _config(dataset, tmp_path, *extra):
    return load_train_config(ROOT / "jobs" / "demo.yaml", [
        f"data.train_shards={dataset / 'train'}", f"data.val_shards={dataset / 'val'}",
        f"eval.support_shards={dataset / 'support'}", f"checkpointing.storage_path={tmp_path}",
        *SIZE, *extra])


class GroundTruthPredictor:
    """Stands in for the model: answers each image with its own ground truth (score 1)."""

    def __init__(self, **_):
        pass

    def __call__(self, rows):
        out = {"image_id": [], "error": [], "detections": [], "image": [], "annotations": []}
        for i, error in enumerate(str(e) for e in rows["error"]):
            image, annotations = ({}, []) if error else ground_truth_of(rows, i)
            out["image_id"].append(int(rows["image_id"][i]))
            out["error"].append(error)
            out["detections"].append(json.dumps([
                {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                 "score": 1.0} for a in annotations]))
            out["image"].append(json.dumps(image))
            out["annotations"].append(json.dumps(annotations))
        return {k: np.array(v) for k, v in out.items()}


@pytest.mark.ray
def test_ground_truth_as_predictions_scores_one(ray_cluster, dataset, tmp_path):
    from dinor1.data.pipeline import open_shard_set
    from dinor1.eval.evaluate import ModelSource, dataset_categories, predict_shards, score_rows

    cfg = _config(dataset, tmp_path, "eval.num_actors=2", "eval.cpus_per_actor=0.5")
    categories = dataset_categories(open_shard_set(dataset / "val").manifest)
    rows = predict_shards(cfg, ModelSource("tiny-cpu"), "generic", prompts_path=None,
                          classes={}, predictor=GroundTruthPredictor)
    score, gt, detections, errors = score_rows(rows, categories, "coco", "pycocotools")
    assert len(gt["images"]) == 23 and len(errors) == 1 and "999999" in errors[0]
    assert score.metrics["AP"] == pytest.approx(1.0) and score.metrics["AP50"] == 1.0
    assert score.metrics["novel/AP"] == pytest.approx(1.0)  # synthetic marks 2 classes novel
    # the same numbers from pycocotools run directly on the saved JSON files
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(detections))
    coco = COCO(str(tmp_path / "gt.json"))
    direct = COCOeval(coco, coco.loadRes(str(tmp_path / "dt.json")), "bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    assert score.metrics["AP"] == pytest.approx(direct.stats[0])
    assert score.metrics["AP50"] == pytest.approx(direct.stats[1])


@pytest.mark.ray
@pytest.mark.slow
def test_trained_model_evaluates_end_to_end(ray_cluster, dataset, tmp_path, capsys):
    from dinor1.model.prompts import GenericPrompts
    from dinor1.train.launch import run_training

    cfg = _config(dataset, tmp_path, "stages.sft_epochs=1", "stages.grqo_epochs=0",
                  "stages.max_steps_per_epoch=8", "eval.every_epochs=1",
                  "mlflow.log_every_steps=1", "optimizer.lr=1e-3")
    assert run_training(cfg).error is None
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    train_run = (tmp_path / "demo" / "mlflow_run_id").read_text().strip()
    during = client.get_metric_history(train_run, "eval/generic/AP50")
    assert len(during) == 1 and during[0].step == 8 and 0.0 <= during[0].value <= 1.0
    assert client.get_metric_history(train_run, "eval/images")[0].value == 23
    assert client.get_metric_history(train_run, "eval/skipped_samples")[0].value == 1
    assert client.get_metric_history(train_run, "eval/skipped/bad_image")[0].value == 1

    job = ROOT / "jobs" / "demo.yaml"
    code = main(["eval", str(job), f"checkpoint={tmp_path / 'demo'}",
                 f"data.val_shards={dataset / 'val'}", f"eval.support_shards={dataset / 'support'}",
                 f"checkpointing.storage_path={tmp_path}", *SIZE,
                 "eval.prompt_modes=[generic,interactive,text]", "eval.num_actors=2",
                 "eval.cpus_per_actor=0.5", "eval.prompts_per_class=4", "eval.grid_images=4",
                 "mlflow.register_model=demo-detector", "mlflow.register_alias=champion"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "== generic prompts: 23 images, 1 skipped ==" in printed
    assert "== interactive prompts" in printed and "== text prompts" in printed
    out_dir = tmp_path / "demo" / "eval"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for mode in ("generic", "interactive", "text"):
        assert 0.0 <= metrics[f"eval/{mode}/AP"] <= 1.0
        assert f"eval/{mode}/novel/AP50" in metrics and f"eval/{mode}/seen/AP50" in metrics
    prompts = GenericPrompts.load(out_dir / "generic_prompts.safetensors")
    assert len(prompts.category_ids) == 8 and max(prompts.counts) == 4

    eval_runs = client.search_runs(
        [client.get_experiment_by_name("dinor1-demo").experiment_id],
        "tags.`dinor1.run_kind` = 'eval'")
    assert len(eval_runs) == 1
    run = eval_runs[0]
    assert run.data.tags["dinor1.train_run_id"] == train_run
    assert run.data.metrics["eval/generic/AP"] == pytest.approx(metrics["eval/generic/AP"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/pr_curve_generic.png", "eval/predictions_generic.png",
            "eval/per_category_generic.csv", "eval/detections_text.json"} <= logged
    assert [a.path for a in client.list_artifacts(run.info.run_id, "prompts")] == [
        "prompts/generic_prompts.safetensors"]

    # the training run logged its final model with the metrics of its last evaluation
    trained = client.search_logged_models([run.info.experiment_id],
                                          filter_string=f"source_run_id = '{train_run}'")
    assert len(trained) == 1
    assert float(trained[0].tags["eval/generic/AP50"]) == pytest.approx(during[0].value,
                                                                         rel=1e-5)
    # the eval registered the model it scored: a version of the eval run with its metrics on
    # it, and the generic prompts it built, which the MLflow model then uses
    version = client.get_model_version_by_alias("demo-detector", "champion")
    assert version.run_id == run.info.run_id
    assert float(version.tags["eval/generic/AP"]) == pytest.approx(metrics["eval/generic/AP"],
                                                                   abs=1e-6)
    import base64

    import pandas as pd

    from dinor1.registry import fluent_tracking_uri

    with fluent_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        model = mlflow.pyfunc.load_model(f"models:/demo-detector/{version.version}")
    image = sorted((dataset.parent / "coco" / "images" / "val").iterdir())[0]
    request = {"image": base64.b64encode(image.read_bytes()).decode(), "prompts": "generic",
               "threshold": 0.0, "top_k": 5}
    found = json.loads(model.predict(pd.DataFrame({"request": [json.dumps(request)]}))
                       ["detections"][0])
    assert len(found) == 5 and {d["label"] for d in found} <= set(prompts.names)


def test_eval_needs_a_checkpoint(dataset, tmp_path, capsys):
    code = main(["eval", str(ROOT / "jobs" / "demo.yaml"), f"data.val_shards={dataset / 'val'}",
                 f"checkpointing.storage_path={tmp_path}"])
    assert code == 2
    assert "eval.checkpoint" in capsys.readouterr().err


@pytest.mark.ray
def test_odinw_tree_scored_per_dataset(ray_cluster, tmp_path):
    """Two ODinW datasets (converted-tree layout), each with its own classes and its own train
    split for prompts: AP per dataset, and the ODinW-13 mean over the two found."""
    root = tmp_path / "odinw_shards"
    for seed, dataset in enumerate(["Aquarium", "pothole"]):
        coco = tmp_path / "coco" / dataset
        splits = generate_synthetic_coco(coco, SyntheticConfig(
            image_size=64, num_train=12, num_val=6, num_support=1, num_categories=3 + seed,
            num_novel=0, seed=seed))
        for split, folder in (("train", "train"), ("val", "valid")):
            write_shards(load_coco(splits[split], coco / "images" / split, split=folder,
                                   dataset=f"odinw/{dataset}"),
                         root / dataset / folder, samples_per_shard=20, progress=False)
    code = main(["eval", str(ROOT / "jobs" / "demo.yaml"), "checkpoint=tiny-cpu",
                 "eval.scorer=odinw", f"eval.shards={root}", "eval.grid_images=0",
                 "eval.prompts_per_class=2", f"checkpointing.storage_path={tmp_path}",
                 "data.eval_short_side=64", "data.eval_max_size=64"])
    assert code == 0
    metrics = json.loads((tmp_path / "demo" / "eval" / "metrics.json").read_text())
    aps = [metrics["eval/generic/odinw/Aquarium/AP"], metrics["eval/generic/odinw/pothole/AP"]]
    assert metrics["eval/generic/odinw13/found"] == 2 and metrics["eval/images"] == 12
    assert metrics["eval/generic/odinw13/mAP"] == pytest.approx(sum(aps) / 2)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("dinor1-demo").experiment_id])[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "prompts")} == {
        "prompts/Aquarium", "prompts/pothole"}


@pytest.mark.ray
def test_eval_on_fuzzed_shards_counts_every_bad_input(ray_cluster, tmp_path, capsys):
    """A tiny untrained model over shards holding every kind of bad input: the job completes,
    scores exactly the good images against the cleaned ground truth, and the MLflow run and
    ``skipped_samples.txt`` carry the counts by kind and rule."""
    from tests.fuzz_shards import build_fuzzed_shards, expected_metrics

    shards, expected = build_fuzzed_shards(tmp_path / "fuzz")
    code = main(["eval", str(ROOT / "jobs" / "demo.yaml"), "checkpoint=tiny-cpu",
                 f"data.val_shards={shards}", f"eval.support_shards={shards}",
                 f"checkpointing.storage_path={tmp_path}", "data.eval_short_side=64",
                 "data.eval_max_size=96", "eval.prompts_per_class=2", "eval.grid_images=0",
                 "eval.cpus_per_actor=0.5"])
    assert code == 0
    out_dir = tmp_path / "demo" / "eval"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    want = expected_metrics(expected, "eval/")
    assert {k: metrics[k] for k in want} == want
    assert metrics["eval/images"] == len(expected["good_image_ids"])
    with open(out_dir / "per_category_generic.csv") as f:  # the cleaned boxes, no more
        assert sum(int(row["num_gt"]) for row in csv.DictReader(f)) == expected["kept_boxes"]
    lines = (out_dir / "skipped_samples.txt").read_text().splitlines()
    assert len(lines) == expected["skipped_samples"]
    for kind, keys in expected["skipped_keys"].items():
        for key in keys:
            assert sum(line.startswith(f"{kind}: ") and key in line for line in lines) == 1, key
    assert "scored against the cleaned ground truth" in capsys.readouterr().err

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("dinor1-demo").experiment_id],
                             "tags.`dinor1.run_kind` = 'eval'")[0]
    assert {k: run.data.metrics[k] for k in want} == want
    assert "eval/skipped_samples.txt" in {a.path for a in client.list_artifacts(run.info.run_id,
                                                                               "eval")}
