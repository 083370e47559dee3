"""The demo's comparison flow at toy size: a real SFT prefix, two real branches started from its
checkpoint (Ray Train + DeepSpeed ZeRO-2), each evaluated (Ray Data + pycocotools), compared
from the real MLflow sqlite store."""

import mlflow
import pytest

from dinor1.compare import compare_runs
from dinor1.data.prepare import synthesize
from dinor1.demo import run_recipes


@pytest.mark.ray
@pytest.mark.slow
def test_branches_continue_from_the_shared_prefix(ray_cluster, tmp_path):
    shards = synthesize(str(tmp_path / "data"), image_size=96, num_train=64, num_val=12,
                        num_support=24, workers=2)
    runs = run_recipes(shards, tmp_path / "runs", seed=0, prefix_epochs=1, branch_epochs=1,
                       overrides=("stages.max_steps_per_epoch=3", "data.train_short_sides=[96]",
                                  "data.train_max_size=96", "data.eval_short_side=96",
                                  "data.eval_max_size=96", "eval.prompts_per_class=2",
                                  "eval.grid_images=0", "mlflow.log_every_steps=1",
                                  "schedule.warmup_steps=0"))
    client = mlflow.MlflowClient(runs.tracking_uri)
    experiment = client.get_experiment_by_name(runs.experiment).experiment_id
    by_name = {r.info.run_name: r for r in client.search_runs([experiment])}
    assert {"sft-prefix-s0", "sft-s0", "grqo-s0"} <= set(by_name)

    def steps(name, metric="loss/total"):
        return sorted(m.step for m in client.get_metric_history(by_name[name].info.run_id,
                                                                metric))

    assert steps("sft-prefix-s0") == [1, 2, 3]
    # both branches restored step 3 (weights + optimiser) and trained steps 4..6
    assert steps("sft-s0") == steps("grqo-s0") == [4, 5, 6]
    assert steps("sft-s0", "resume/step") == steps("grqo-s0", "resume/step") == [3]
    sums = {n: client.get_metric_history(by_name[n].info.run_id, "resume/weights_checksum")[0]
            .value for n in ("sft-s0", "grqo-s0")}
    assert sums["sft-s0"] == sums["grqo-s0"]  # the same starting weights
    assert steps("grqo-s0", "loss/grqo") == [4, 5, 6] and not steps("sft-s0", "loss/grqo")
    for recipe in ("sft", "grqo"):
        assert 0.0 <= runs.metrics[recipe]["eval/generic/AP50"] <= 1.0
    table = compare_runs(runs.experiment, tracking_uri=runs.tracking_uri,
                         runs=list(runs.run_names.values()), out_dir=tmp_path / "cmp").table
    assert list(table["recipe"]) == ["SFT 2", "SFT 1 + GRQO 1"] or \
        sorted(table["recipe"]) == ["SFT 1 + GRQO 1", "SFT 2"]
    assert "eval/generic/AP50" in table.columns
