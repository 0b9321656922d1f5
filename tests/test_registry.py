"""A new mixer plugs in as one module and one YAML file (by import path, or by a registry entry in
one process) and trains, evaluates, resumes and scores through the real entry points; typed configs
check their fields in one place."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir

from conftest import CONF, REPO
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

    def forward(self, x, state=None):  # (B, T, d)
        carried = self.init_state(x.shape[0], x.device, x.dtype) if state is None else state
        ys = []
        for t in range(x.shape[1]):
            y, carried = self.step(x[:, t], carried)
            ys.append(y)
        return torch.stack(ys, dim=1), None if state is None else carried

    def init_state(self, batch, device=None, dtype=None):
        return torch.zeros(batch, self.out.in_features, device=device, dtype=dtype)

    def step(self, x, state):  # (B, d), (B, d)
        state = self.decay * state + x
        return self.out(state), state

    def state_size(self, n_past):
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


TOY_PACKAGE = textwrap.dedent('''
    """A mixer of a user's own package, outside l2m: named by its import path in the preset."""
    from dataclasses import dataclass

    import torch
    import torch.nn as nn

    from l2m.models import MixerConfig


    @dataclass(kw_only=True)
    class DecayConfig(MixerConfig):
        decay: float = 0.9


    class DecayMixer(nn.Module):
        """h_t = decay * h_{t-1} + x_t per channel, y_t = out(h_t): a state of d_model scalars."""

        config_class = DecayConfig

        def __init__(self, config, layer_idx=None):
            super().__init__()
            self.decay, self.out = config.decay, nn.Linear(config.d_model, config.d_model)

        def forward(self, x, state=None):
            powers = self.decay ** torch.arange(1, x.shape[1] + 1, dtype=x.dtype)
            weights = torch.tril(powers[:, None] / powers[None, :])  # (T, T): decay^(t - s) for s <= t
            h = weights @ x  # (B, T, d)
            if state is None:
                return self.out(h), None
            h = h + powers[:, None] * state[:, None]  # the carried state, decayed
            return self.out(h), h[:, -1]

        def init_state(self, batch, device=None, dtype=None):
            return torch.zeros(batch, self.out.in_features, device=device, dtype=dtype)

        def step(self, x, state):
            state = self.decay * state + x
            return self.out(state), state

        def state_size(self, n_past):
            return {"ssm": self.out.in_features}
''')


def test_a_mixer_named_by_import_path_trains_evaluates_resumes_and_scores_from_the_command_line(tmp_path):
    (tmp_path / "toy_mixers").mkdir()
    (tmp_path / "toy_mixers" / "__init__.py").write_text(TOY_PACKAGE)
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "decay-toy.yaml").write_text(
        "name: decay-toy\narch: toy_mixers.DecayMixer\nn_layer: 2\nd_model: 16\ndecay: 0.8\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "L2M_CACHE_DIR": str(tmp_path / "cache")}
    run = tmp_path / "run"
    common = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=text-tiny", "model=decay-toy",
              "logger=none", "data.seq_len=16", "data.batch_size=2", "data.val_size=4", "data.progress=false",
              "+trainer.enable_progress_bar=false", f"hydra.run.dir={run}", "callbacks.checkpoint.every_n_train_steps=2"]

    def cli(*args):
        result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    cli("train.py", *common, "trainer.max_steps=2")
    assert json.loads((run / "summary.json").read_text())["dim_z_half_ssm"] == 2 * 16  # the mixer's declared state
    resumed = cli("train.py", *common, "trainer.max_steps=4")  # the same run, trained on
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert json.loads((run / "summary.json").read_text())["step"] == 4
    ckpt = run / "checkpoints" / "last.ckpt"
    cli("evaluate.py", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["model"] == "decay-toy"
    cli("-m", "l2m.mi", "--corpus", str(REPO / "tests/data/corpus"), "--scorer", str(ckpt), "--max-split", "4",
        "--num-samples", "4", "--count-tokens", "2000", "--max-distance", "4", "--out", str(tmp_path / "mi"))
    assert (tmp_path / "mi" / "mi.json").is_file()
    export = subprocess.run([sys.executable, "-m", "l2m.export", str(ckpt), str(tmp_path / "hf")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 1 and export.stderr.strip() == (
        "error: architecture 'toy_mixers.DecayMixer' has no transformers counterpart; exportable: gpt, mamba, mamba2")


def test_an_arch_that_cannot_be_imported_names_the_two_ways():
    with pytest.raises(ValueError, match=r"model arch must be one of \('gpt', 'mamba', 'mamba2', 'attention', .*\) or the import path .*"
                                         r"cannot import it .* PYTHONPATH"):
        model_config({"arch": "nowhere.Mixer", "n_layer": 1, "d_model": 8})
    with pytest.raises(ValueError, match="torch.nn.Linear has no config_class"):
        model_config({"arch": "torch.nn.Linear", "n_layer": 1, "d_model": 8})


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
