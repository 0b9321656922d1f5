"""Every config composes (without running), and bad choices give messages that say what exists."""

import functools
import itertools
import math
import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.base import UnionNode
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

from conftest import CONF, REPO
from l2m.data.gaussian import GaussianDataModule
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


def _another_value(cfg: DictConfig, key: str) -> tuple[str, object]:
    """(override text, composed value) of a value of cfg[key]'s type that differs from its own."""
    node, value = cfg._get_node(key), cfg[key]
    if isinstance(node, ListConfig):
        if node._metadata.element_type is str:  # a hybrid's layers
            return "[mamba,mamba2]", ["mamba", "mamba2"]
        return "[0.5,0.25]", [0.5, 0.25]
    if isinstance(node, BooleanNode):
        return str(not value).lower(), not value
    if isinstance(node, UnionNode):  # the schemas' unions all take an int (trainer.limit_train_batches: int | float)
        return "7", 7
    if isinstance(node, IntegerNode):
        return str((value or 0) + 3), (value or 0) + 3
    if isinstance(node, FloatNode):
        return str((value or 0.0) + 0.125), (value or 0.0) + 0.125
    if isinstance(node, StringNode) or value is None or isinstance(value, str):
        return "overridden", "overridden"
    return str(value + 3), value + 3  # Any holding a number (trainer.devices)


# Fields that are not options of the group (its _target_, the arch a model preset is of), and a
# hybrid's per-mixer options, a mapping overridden key by key (test_a_hybrids_pattern_and_mixer_options_...).
NOT_OPTIONS = {"arch", "mixers"}


@pytest.mark.parametrize("group", ["model", "data", "optim", "schedule", "trainer"])
def test_every_field_of_every_preset_is_an_override_of_its_type(compose_train, group):
    """README-documented overrides (model.checkpointing=true, model.init_std, ...) and every other
    field of the chosen class are plain `group.field=value` overrides, composed with its type."""
    for option in options(group):
        cfg = compose_train(f"{group}={option}")[group]
        fields = [k for k in cfg if not str(k).startswith("_") and k not in NOT_OPTIONS]
        assert len(fields) >= 3, (option, fields)
        overrides = {key: _another_value(cfg, key) for key in fields}
        overridden = compose_train(f"{group}={option}", *(f"{group}.{k}={text}" for k, (text, _) in overrides.items()))
        composed = {k: list(v) if isinstance(v, ListConfig) else v for k, v in overridden[group].items()}
        assert {k: composed[k] for k in fields} == {k: v for k, (_, v) in overrides.items()}, option


def test_the_readme_model_overrides_compose_and_build(compose_train):
    io = {"kind": "discrete", "vocab_size": 10}
    cfg = compose_train("model.checkpointing=true", "model.embedding_std=1.0", "model.tie_embeddings=false",
                        "model.init_std=0.08", "model.activation=gelu_tanh", "model.bias=false")
    gpt = build_model(dict(cfg.model), io=io, max_seq_len=16).backbone.config
    assert (gpt.checkpointing, gpt.embedding_std, gpt.tie_embeddings, gpt.init_std, gpt.activation, gpt.bias) == (
        True, 1.0, False, 0.08, "gelu_tanh", False)
    mamba = build_model(dict(compose_train("model=tiny-mamba", "model.norm=layer").model), io=io)
    assert mamba.backbone.config.norm == "layer" and isinstance(mamba.backbone.norm_f, torch.nn.LayerNorm)


def test_a_hybrids_pattern_and_mixer_options_are_overrides(compose_train):
    cfg = compose_train("model=tiny-hybrid", "model.layers=[mamba,attention,attention,mamba2]", "model.n_layer=4",
                        "+model.mixers.attention.window=8", "+model.mixers.mamba={d_state:4}")
    model = build_model(OmegaConf.to_container(cfg.model), io={"kind": "gaussian", "dim": 3}, max_seq_len=16)
    mixers = [type(layer.mixer).__name__ for layer in model.backbone.layers]
    assert mixers == ["Mamba", "CausalSelfAttention", "CausalSelfAttention", "Mamba2"]
    assert model.backbone.layers[0].mixer.config.d_state == 4 and model.backbone.layers[1].mixer.window == 8
    assert model.receptive_field is None and model.backbone.layers[2].mixer.n_head == 4
    assert model.family == "hybrid mamba+swa+mamba2"  # each layer's family once, in the pattern's order


def train_py(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *overrides], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, message", [
    ("model.nonsense=1", "error: model.nonsense is not a key of model (GPTConfig); the keys there: arch, n_layer, "
                         "d_model, name, pad_vocab_size_multiple, tie_embeddings, embedding_std, checkpointing, n_head"),
    ("model.n_layer=two", "error: model.n_layer=two: Value 'two' of type 'str' could not be converted to Integer; "
                          "model.n_layer takes int"),
    ("optim.momentum=0.9", "error: optim.momentum is not a key of optim (AdamW); the keys there: lr, betas, eps"),
    ("data.num_paris=8", "error: data.num_paris is not a key of data (GaussianDataModule); the keys there: levels"),
    ("model=gpt5", "error: model/gpt5 is not a config: the options of model are deltanet-130m, fig3-gpt, fig3-mamba"),
    ("run_id=../../escape", "error: run_id='../../escape' is not a name: a run id names outputs/<run_id> (a sweep: "
                            "multirun/<run_id>), without '/' or '..'; to put a run elsewhere, give hydra.run.dir=<path>"),
])
def test_a_wrong_override_is_one_line_naming_the_key_and_the_allowed_ones(override, message):
    result = train_py(override)
    assert result.returncode == 1 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_override_hydra_cannot_parse_is_one_line_saying_how_to_quote_it():
    result = train_py("seed=1", "run_id=it's")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: run_id=it's: Hydra cannot parse this override (LexerNoViableAltException: "
                                    "run_id=it's); quote a value that holds spaces or any of"), result.stderr
    assert result.stderr.strip().endswith("""the shell's quotes around Hydra's: 'run_id="it's"'""")


def test_a_model_option_the_task_ignores_is_said_to_have_no_effect(compose_train, caplog):
    gaussian, discrete = {"kind": "gaussian", "dim": 3}, {"kind": "discrete", "vocab_size": 11}
    untied = OmegaConf.to_container(compose_train("model.tie_embeddings=false").model)
    build_model(untied, io=discrete, max_seq_len=16)
    build_model(OmegaConf.to_container(compose_train().model), io=gaussian, max_seq_len=16)
    assert "no effect" not in caplog.text  # used by discrete tokens; the default says nothing
    build_model(untied, io=gaussian, max_seq_len=16)
    assert ("model.tie_embeddings=False has no effect on Gaussian tokens (vectors: no embedding matrix to tie or "
            "pad); it applies to discrete tokens (text, recall)") in caplog.text


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


def test_window_cpu_spends_at_most_1024_tokens_a_step():
    batches = {cfg.data.seq_len: cfg.data.batch_size for cfg in sweep_jobs("window-cpu")}
    assert batches == {16: 32, 64: 16, 256: 4}


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
