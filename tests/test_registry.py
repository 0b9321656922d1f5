"""A new mixer plugs in as one module, one registry entry and one YAML file, and trains through
the real entry points; typed configs check their fields in one place."""

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir

from conftest import CONF
from l2m.jobs.run import train
from l2m.models import ARCHITECTURES, GPTConfig, Mamba2Config, MambaConfig, MixerConfig, model_config
from l2m.models import register_architecture


@dataclass(kw_only=True)
class DecayConfig(MixerConfig):
    arch: str = "decay"
    decay: float = 0.9


class DecayMixer(nn.Module):
    """h_t = decay * h_{t-1} + x_t per channel, y_t = out(h_t): a recurrent state of d_model scalars."""

    def __init__(self, config: DecayConfig, layer_idx: int | None = None):
        super().__init__()
        self.decay = config.decay
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x):  # (B, T, d)
        state = self.init_state(x.shape[0], x.device, x.dtype)
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, dim=1)

    def init_state(self, batch, device=None, dtype=None):
        return torch.zeros(batch, self.out.in_features, device=device, dtype=dtype)

    def step(self, x, state):  # (B, d), (B, d)
        state = self.decay * state + x
        return self.out(state), state

    def state_breakdown(self):
        return {"ssm": self.out.in_features}


@pytest.fixture
def decay_registered():
    register_architecture("decay", DecayConfig, DecayMixer)
    yield
    del ARCHITECTURES["decay"]


def test_a_registered_mixer_trains_from_its_yaml_file(decay_registered, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "decay-toy.yaml").write_text("name: decay-toy\narch: decay\nn_layer: 2\nd_model: 16\n")
    overrides = [
        f"hydra.searchpath=[file://{tmp_path}]", "model=decay-toy", "logger=none", "data.levels=2", "data.copies=4",
        "data.batch_size=2", "data.val_size=4", "trainer.max_steps=1", "+trainer.enable_progress_bar=false",
        "threads=2",
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    threads = torch.get_num_threads()
    try:
        summary = train(cfg, run_dir=tmp_path / "run")
        assert torch.get_num_threads() == 2  # the run's `threads` setting
    finally:
        torch.set_num_threads(threads)
    assert summary["model"] == "decay-toy" and summary["step"] == 1
    assert summary["dim_z_half"] == summary["dim_z_half_ssm"] == 2 * 16  # the mixer's declared state, per layer
    assert math.isfinite(summary["avg_kl"]) and summary["avg_kl"] != summary["initial_avg_kl"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_typed_configs_fill_defaults_and_check_in_one_place():
    config = model_config({"arch": "mamba", "n_layer": 2, "d_model": 64})
    assert isinstance(config, MambaConfig) and (config.d_state, config.d_conv, config.expand) == (16, 4, 2)
    assert config.d_inner == 128 and config.resolved_dt_rank == 4
    assert Mamba2Config(n_layer=1, d_model=64, headdim=16).nheads == 8
    assert GPTConfig(n_layer=1, d_model=64, n_head=4).head_dim == 16
    # every YAML key is a field: a preset round-trips through its typed config
    assert dataclasses.asdict(config) == {**{f.name: f.default for f in dataclasses.fields(MambaConfig)
                                             if f.default is not dataclasses.MISSING},
                                          "arch": "mamba", "n_layer": 2, "d_model": 64}
    with pytest.raises(ValueError, match="model n_layer must be an int >= 1, got 0"):
        MambaConfig(n_layer=0, d_model=64)
    with pytest.raises(ValueError, match="model expand must be an int >= 1, got True"):
        Mamba2Config(n_layer=1, d_model=64, expand=True)
    with pytest.raises(ValueError, match="model config for arch 'gpt' lacks \\['n_head'\\]"):
        model_config({"arch": "gpt", "n_layer": 1, "d_model": 8})
    with pytest.raises(TypeError, match="ModelConfig subclass"):
        register_architecture("bad", dict, nn.Linear)
