"""One registry of architectures: `arch` -> (typed config, module).

    model = build_model({"arch": "mamba", "n_layer": 2, "d_model": 64}, io={"kind": "gaussian", "dim": 64})

`arch` is a registered name (gpt, mamba, mamba2, attention, linear_attention, deltanet, hybrid) or the import path of a module class that names
its typed config in `config_class` (`arch: my_package.mixers.MyMixer`, as zoology names mixers and
Hydra names `_target_`s): such an architecture trains, evaluates, resumes and is scored from the
command line in any process, since checkpoints record the path. A config that subclasses
`MixerConfig` names a mixer, which `MixerStack` stacks n_layer times; any other config names a
whole backbone built as `module(config)`. A `HybridConfig` stacks a pattern of mixers, each
configured as its own architecture.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from l2m.checks import UserError
from l2m.models.adapters import build_io
from l2m.models.attention import AttentionConfig, CausalSelfAttention
from l2m.models.config import MixerConfig, ModelConfig
from l2m.models.deltanet import DeltaNet, DeltaNetConfig
from l2m.models.gpt import GPT, GPTConfig
from l2m.models.linear_attention import LinearAttention, LinearAttentionConfig
from l2m.models.mamba import Mamba, MambaConfig
from l2m.models.mamba2 import Mamba2, Mamba2Config
from l2m.models.mixer_stack import MixerStack
from l2m.models.sequence_model import SequenceModel


@dataclass(frozen=True)
class Architecture:
    config: type[ModelConfig]
    module: type[nn.Module]  # a mixer (config, layer_idx) for MixerConfig, else a backbone (config)

    def backbone(self, config: ModelConfig) -> nn.Module:
        if isinstance(config, HybridConfig):
            layers = config.layer_configs()
            return MixerStack.of_mixers(config, [architecture(c.arch).module(c, layer_idx=i) for i, c in enumerate(layers)])
        if isinstance(config, MixerConfig):
            return MixerStack.of_mixers(config, [self.module(config, layer_idx=i) for i in range(config.n_layer)])
        return self.module(config)


# Fields a hybrid's layers take from the hybrid itself, not from their `mixers` options.
_STACK_FIELDS = tuple(f.name for f in dataclasses.fields(MixerConfig) if f.name != "arch")


@dataclass(kw_only=True)
class HybridConfig(MixerConfig):
    """A stack of different mixers: `layers` names a pattern of mixer architectures, repeated to
    n_layer (Jamba's and Samba's interleaving), and `mixers` holds each one's options. Its history
    state is the sum of its layers'."""

    arch: str = "hybrid"
    layers: list[str] = field(default_factory=lambda: ["mamba2", "attention"])
    mixers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def _check(self) -> None:
        super()._check()
        if not self.layers or not all(isinstance(name, str) for name in self.layers):
            raise UserError(f"model layers must be a non-empty list of mixer names, e.g. [mamba2, mamba2, attention], "
                            f"got {self.layers!r}")
        if self.n_layer % len(self.layers):
            raise UserError(f"model n_layer={self.n_layer} must be a multiple of the pattern's length "
                            f"{len(self.layers)} (layers={list(self.layers)}): the pattern repeats to fill the stack")
        self.layer_configs()
        unused = sorted(set(self.mixers) - set(self.layers))
        if unused:
            raise UserError(f"model mixers has options for {unused}, which model layers={list(self.layers)} does not use")

    @property
    def family(self) -> str:
        """"hybrid" and its layers' families, each once, e.g. "hybrid mamba2+swa" for [mamba2, mamba2, swa]."""
        return "hybrid " + "+".join(dict.fromkeys(config.family for config in self.layer_configs()))

    def layer_configs(self) -> list[MixerConfig]:
        """One checked config per layer: its mixer's options, with d_model and n_layer of the stack."""
        configs = {}
        for name in dict.fromkeys(self.layers):
            options = dict(self.mixers.get(name) or {})
            shared = sorted(set(options) & set(_STACK_FIELDS))
            if shared:
                raise UserError(f"model mixers.{name} sets {shared}: those belong to the whole stack, set model.<key>")
            mixers = [a for a, m in ARCHITECTURES.items() if issubclass(m.config, MixerConfig) and a != "hybrid"]
            hint = f"choose among {mixers} (attention is the transformer's mixer) or a mixer's import path"
            if name not in ARCHITECTURES and "." not in name:
                raise UserError(f"model layers names {name!r}, which is no architecture; {hint}")
            mixer = architecture(name)
            if not issubclass(mixer.config, MixerConfig) or issubclass(mixer.config, HybridConfig):
                raise UserError(f"model layers names {name!r}, which is not a mixer; {hint}")
            try:
                configs[name] = model_config({**options, "arch": name, "n_layer": self.n_layer, "d_model": self.d_model})
            except UserError as error:
                raise UserError(f"model mixers.{name} (a layer of the hybrid): {error}") from None
        return [configs[self.layers[i % len(self.layers)]] for i in range(self.n_layer)]


ARCHITECTURES: dict[str, Architecture] = {
    "gpt": Architecture(GPTConfig, GPT),
    "mamba": Architecture(MambaConfig, Mamba),
    "mamba2": Architecture(Mamba2Config, Mamba2),
    "attention": Architecture(AttentionConfig, CausalSelfAttention),
    "linear_attention": Architecture(LinearAttentionConfig, LinearAttention),
    "deltanet": Architecture(DeltaNetConfig, DeltaNet),
    "hybrid": Architecture(HybridConfig, MixerStack),
}


def _checked_config(arch: str, config: object) -> type[ModelConfig]:
    if not (isinstance(config, type) and issubclass(config, ModelConfig)):
        raise TypeError(f"config of architecture {arch!r} must be a ModelConfig subclass, got {config!r}")
    return config


def register_architecture(arch: str, config: type[ModelConfig], module: type[nn.Module]) -> None:
    """Make `arch` buildable by `build_model` and by `model.arch=<arch>` in this process (an import
    path as `arch` works in every process)."""
    ARCHITECTURES[arch] = Architecture(_checked_config(arch, config), module)


def architecture(arch: object) -> Architecture:
    """The architecture `arch` names: a registered name, or `package.module.Class`, a module class
    whose `config_class` is its ModelConfig subclass."""
    if isinstance(arch, str) and arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    hint = (f"model arch must be one of {tuple(ARCHITECTURES)} or the import path of a module class with a "
            f"config_class (package.module.MyMixer), got {arch!r}")
    if not isinstance(arch, str) or "." not in arch:
        raise UserError(hint)
    module_name, _, class_name = arch.rpartition(".")
    try:
        module = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise UserError(f"{hint}: cannot import it ({error}); is its package installed or on PYTHONPATH?") from error
    if not hasattr(module, "config_class"):
        raise UserError(f"{hint}: {arch} has no config_class, the ModelConfig subclass that holds its options")
    return Architecture(_checked_config(arch, module.config_class), module)


def model_config(cfg: Mapping | ModelConfig) -> ModelConfig:
    """The typed, checked config of a flat mapping such as a conf/model/*.yaml preset."""
    if isinstance(cfg, ModelConfig):
        return cfg
    arch = cfg.get("arch")
    config = architecture(arch).config
    allowed = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise UserError(f"unknown model config key(s) {unknown} for arch {arch!r}; allowed: {sorted(allowed)}")
    missing = sorted(f.name for f in dataclasses.fields(config) if f.name not in cfg and _required(f))
    if missing:
        raise UserError(f"model config for arch {arch!r} lacks {missing}")
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
    model = SequenceModel(encoder, architecture(config.arch).backbone(config), decoder, name=config.name,
                          family=config.family)
    model.io = dict(io)  # the token kind it reads and writes
    return model
