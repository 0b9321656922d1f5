"""Checkpoints written by earlier l2m versions keep loading and evaluating to the same numbers.

tests/data/checkpoints/<name>.ckpt were trained with commit b780bac (5 steps, tiny sizes; see the
README there) and <name>.json is what `evaluate.py` of that commit wrote for them.
"""

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, REPO
from l2m.data import with_current_target
from l2m.data.gaussian import GaussianDataModule
from l2m.jobs.resume import with_defaults
from l2m.jobs.run import evaluate, instantiate_data
from l2m.models import read_checkpoint

FIXTURES = REPO / "tests" / "data" / "checkpoints"


# Data overrides that do not change the held-out set: DataLoader workers, and `encoding`, an
# argument TextDataModule gained after the checkpoint was written (its data config lacks it).
SAME_HELDOUT_SET = {"mamba-text": ["data.num_workers=2", "data.encoding=utf-8", "data.progress=false"]}


@pytest.mark.parametrize("name", ["gpt", "mamba", "mamba2", "mamba-text"])
def test_a_checkpoint_of_an_earlier_version_evaluates_to_its_recorded_numbers(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the text fixture's corpus path is relative to the repository
    monkeypatch.setenv("L2M_CACHE_DIR", str(tmp_path / "cache"))
    expected = json.loads((FIXTURES / f"{name}.json").read_text())
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt_path={FIXTURES / name}.ckpt", *SAME_HELDOUT_SET.get(name, [])])
    summary = evaluate(cfg, run_dir=tmp_path / "eval")
    assert json.loads(Path(tmp_path / "eval" / "summary.json").read_text())["step"] == 5
    for key, value in expected.items():
        if isinstance(value, float):
            assert summary[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
            assert math.isfinite(summary[key])
        elif isinstance(value, int) or value is None:
            assert summary[key] == value, key


def test_the_data_of_an_earlier_checkpoint_is_the_same_data_here(compose_train):
    """gpt.ckpt names its data module by the path it had then (l2m.data.gaussian_datamodule): resuming it
    under the config that trained it finds no difference, and evaluate builds today's module."""
    saved = read_checkpoint(FIXTURES / "gpt.ckpt")["hyper_parameters"]["data"]
    assert saved["_target_"] == "l2m.data.gaussian_datamodule.GaussianDataModule"
    cfg = compose_train("data.levels=2", "data.copies=4", "data.batch_size=4", "data.val_size=8")
    here = OmegaConf.to_container(cfg.data, resolve=True)
    assert with_defaults("data", saved) == with_defaults("data", here)
    assert type(instantiate_data(with_current_target(saved))) is GaussianDataModule
