"""Every job YAML is a valid instance of the config schema."""

from pathlib import Path

import pytest

from dinor1.config import load_train_config

JOBS = sorted((Path(__file__).parents[2] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS, ids=[j.name for j in JOBS])
def test_job_yaml_validates(job):
    cfg = load_train_config(job)
    assert cfg.stages.sft_epochs + cfg.stages.grqo_epochs > 0


def test_paper_recipes():
    names = {j.name for j in JOBS}
    assert {"demo.yaml", "sft.yaml", "grqo.yaml"} <= names
    grqo = load_train_config(Path(JOBS[0]).parent / "grqo.yaml")
    sft = load_train_config(Path(JOBS[0]).parent / "sft.yaml")
    assert (grqo.stages.sft_epochs, grqo.stages.grqo_epochs) == (1, 5)
    assert sft.stages.sft_epochs == 6 and sft.stages.grqo_epochs == 0
    assert grqo.model.init == sft.model.init == "swin-t"
