"""Every config composes (without running), and bad choices give messages that say what exists."""

import functools
import itertools
import math

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from conftest import CONF
from l2m.data.gaussian_datamodule import GaussianDataModule
from l2m.jobs.run import instantiate_data
from l2m.models import build_model
from l2m.models.adapters import gaussian_kl
from l2m.training.module import L2MModule
from l2m.training.schedules import warmup_cosine_multiplier


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_config_is_the_main_job(compose_train):
    cfg = compose_train()
    assert cfg.model.name == "tiny-gpt"
    assert cfg.data.levels == 3 and cfg.data.copies == 64  # L = 64, 64 copies
    assert list(cfg.logger) == ["wandb"] and cfg.trainer.accelerator == "cpu"


@pytest.mark.parametrize("group", ["model", "data", "trainer", "optim", "schedule", "logger", "callbacks"])
def test_every_option_of_every_group_composes(compose_train, group):
    for option in options(group):
        cfg = compose_train(f"{group}={option}")
        assert cfg[group] is not None, option


def test_every_model_preset_builds_for_the_gaussian_task(compose_train):
    io = {"kind": "gaussian", "dim": 64}
    for name in options("model"):
        cfg = compose_train(f"model={name}")
        assert cfg.model.name == name
        with torch.device("meta"):  # shapes only: no memory for the 1.4B-parameter presets
            model = build_model(dict(cfg.model), io, max_seq_len=256)
        assert model.history_state_size(128) > 0


@functools.lru_cache(maxsize=None)
def sweep_jobs(experiment: str) -> list:
    """The composed config of every job of an experiment's `hydra.sweeper.params` sweep."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        params = compose("train", [f"experiment={experiment}"], return_hydra_config=True).hydra.sweeper.params
        keys = list(params or {})
        grid = itertools.product(*(str(params[k]).split(",") for k in keys))
        return [compose("train", [f"experiment={experiment}"] + [f"{k}={v}" for k, v in zip(keys, values)])
                for values in grid]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_and_every_job_of_its_sweep_composes(experiment):
    for cfg in sweep_jobs(experiment):
        assert (CONF / "model" / f"{cfg.model.name}.yaml").is_file()
        if "gaussian" in experiment:
            assert 1 <= cfg.data.levels <= 8


def test_paper_gaussian_sweeps_cover_figure_3():
    def grid(experiment):
        return {(cfg.model.name, 4**cfg.data.levels) for cfg in sweep_jobs(experiment)}

    assert grid("gaussian-gpt2") == {(m, L) for m in ("gpt2", "gpt2-medium", "gpt2-large") for L in (256, 1024, 4096)}
    mamba = grid("gaussian-mamba")
    assert {L for _, L in mamba} == {64, 256, 1024, 4096, 16384} and len(mamba) == 30
    assert {m for m, _ in grid("gaussian-mamba2")} == {"mamba2-130m", "mamba2-370m", "mamba2-790m"}
    cfg = sweep_jobs("gaussian-mamba")[0]  # spec §4 recipe
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.warmup_steps) == (5e-5, 0.01, 2000)
    assert (cfg.trainer.max_steps, cfg.trainer.precision, cfg.data.batch_size) == (500_000, "32-true", 4)


def test_evaluate_config_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=["ckpt_path=x.ckpt", "data.val_size=32"])
    assert cfg.ckpt_path == "x.ckpt" and cfg.data.val_size == 32


def test_unknown_group_option_lists_the_available_ones(compose_train):
    with pytest.raises(MissingConfigException) as error:
        compose_train("model=gpt5")
    assert "tiny-gpt" in str(error.value) and "mamba-130m" in str(error.value)
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as error:
        compose_train("logger=tensorboard")
    assert all(name in str(error.value) for name in ("wandb", "csv", "none"))


def test_gaussian_length_must_be_a_power_of_four(compose_train):
    datamodule = instantiate_data(dict(compose_train("data.seq_len=256").data))
    assert isinstance(datamodule, GaussianDataModule) and datamodule.family.levels == 4 and datamodule.seq_len == 256
    with pytest.raises(ValueError, match=r"data .*seq_len=100 .* 4, 16, 64, 256, 1024, 4096, 16384, 65536"):
        instantiate_data(dict(compose_train("data.seq_len=100").data))


def test_warmup_then_cosine_schedule():
    lr = [warmup_cosine_multiplier(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(120)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # linear warmup
    assert lr[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr[110] == pytest.approx(0.1) and lr[119] == pytest.approx(0.1)  # floor after the end
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))


def test_gaussian_kl_is_exact():
    p = torch.distributions.Normal(torch.tensor([0.3, -1.0]), torch.tensor([0.7, 2.0]))
    q = torch.distributions.Normal(torch.tensor([0.1, 0.5]), torch.tensor([1.1, 0.4]))
    expected = torch.distributions.kl_divergence(p, q)
    assert torch.allclose(gaussian_kl(q.loc, q.scale, p.loc, p.scale), expected, atol=1e-6)
    assert gaussian_kl(p.loc, p.scale, p.loc, p.scale).abs().max() < 1e-7


def test_module_rejects_unknown_token_kind():
    with pytest.raises(ValueError, match="'kind' in .*discrete.*gaussian.*'audio'"):
        L2MModule(model={"name": "t", "arch": "gpt", "n_layer": 1, "d_model": 8, "n_head": 2},
                  io={"kind": "audio", "dim": 4}, seq_len=16, optim={})
    assert math.isfinite(warmup_cosine_multiplier(0, 0, 1, 0.0))
