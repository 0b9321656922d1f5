"""One registry of architectures: `arch` string -> (typed config, module).

    model = build_model({"arch": "mamba", "n_layer": 2, "d_model": 64}, io={"kind": "gaussian", "dim": 64})

A config that subclasses `MixerConfig` names a mixer, which `MixerStack` stacks n_layer times;
any other config names a whole backbone built as `module(config)`. A new architecture is one
module (with its config) plus one `register_architecture` call, and a YAML preset in conf/model/.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch.nn as nn

from l2m.models.adapters import build_io
from l2m.models.config import MixerConfig, ModelConfig
from l2m.models.gpt import GPT, GPTConfig
from l2m.models.mamba import Mamba, MambaConfig
from l2m.models.mamba2 import Mamba2, Mamba2Config
from l2m.models.mixer_stack import MixerStack
from l2m.models.sequence_model import SequenceModel


@dataclass(frozen=True)
class Architecture:
    config: type[ModelConfig]
    module: type[nn.Module]  # a mixer (config, layer_idx) for MixerConfig, else a backbone (config)

    def backbone(self, config: ModelConfig) -> nn.Module:
        if isinstance(config, MixerConfig):
            return MixerStack(config, self.module)
        return self.module(config)


ARCHITECTURES: dict[str, Architecture] = {
    "gpt": Architecture(GPTConfig, GPT),
    "mamba": Architecture(MambaConfig, Mamba),
    "mamba2": Architecture(Mamba2Config, Mamba2),
}


def register_architecture(arch: str, config: type[ModelConfig], module: type[nn.Module]) -> None:
    """Make `arch` buildable by `build_model` and by `model.arch=<arch>` in the configs."""
    if not (isinstance(config, type) and issubclass(config, ModelConfig)):
        raise TypeError(f"config of architecture {arch!r} must be a ModelConfig subclass, got {config!r}")
    ARCHITECTURES[arch] = Architecture(config, module)


def model_config(cfg: Mapping | ModelConfig) -> ModelConfig:
    """The typed, checked config of a flat mapping such as a conf/model/*.yaml preset."""
    if isinstance(cfg, ModelConfig):
        return cfg
    arch = cfg.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"model arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    config = ARCHITECTURES[arch].config
    allowed = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown} for arch {arch!r}; allowed: {sorted(allowed)}")
    missing = sorted(f.name for f in dataclasses.fields(config) if f.name not in cfg and _required(f))
    if missing:
        raise ValueError(f"model config for arch {arch!r} lacks {missing}")
    return config(**cfg)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def build_model(cfg: Mapping | ModelConfig, io: Mapping, max_seq_len: int | None = None) -> SequenceModel:
    """A SequenceModel from a model config and an io config.

    io: {"kind": "discrete", "vocab_size": V} or {"kind": "gaussian", "dim": D} (l2m.models.adapters).
    max_seq_len: the run's context length; sizes a config's `max_seq_len` (GPT's learned positions).
    """
    config = model_config(cfg)
    if max_seq_len is not None and hasattr(config, "max_seq_len"):
        config = dataclasses.replace(config, max_seq_len=max_seq_len)
    encoder, decoder = build_io(io, config)
    model = SequenceModel(encoder, ARCHITECTURES[config.arch].backbone(config), decoder, name=config.name)
    model.io = dict(io)  # the token kind it reads and writes
    return model
