"""Typed model configs: the fields every architecture shares, checked in one place.

Each architecture subclasses `ModelConfig` beside its module (gpt.py, mamba.py, mamba2.py) with
its own fields, defaults and checks (`_check`); `l2m.models.registry` maps the `arch` string of a
flat YAML preset to (config class, module). Errors name the key and say what to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from l2m.checks import UserError, check_int

NORMS = ("rms", "layer")


def call_block(block: nn.Module, *args: Tensor, checkpointing: bool) -> Any:
    """block(*args); with `checkpointing` while gradients are on, its activations are not kept but
    recomputed in the backward pass (the same numbers: the RNG state is replayed)."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


@dataclass(kw_only=True)
class ModelConfig:
    """Fields of every architecture. `positive_ints` lists the fields checked as ints >= 1."""

    positive_ints: ClassVar[tuple[str, ...]] = ("n_layer", "d_model", "pad_vocab_size_multiple")
    discrete_only: ClassVar[tuple[str, ...]] = ("pad_vocab_size_multiple", "tie_embeddings")  # what other tokens ignore

    arch: str
    n_layer: int
    d_model: int
    name: str | None = None
    pad_vocab_size_multiple: int = 1  # discrete io: embedding rows rounded up to a multiple (speed)
    tie_embeddings: bool = True  # discrete io: LM head shares the embedding matrix
    # Init std of the token embedding (discrete io) and of learned positions. 0.02 is GPT-2's and
    # mamba-ssm's; tiny models learn associative recall far sooner with 1.0 (nn.Embedding's default).
    embedding_std: float = 0.02
    checkpointing: bool = False  # training: recompute each block's activations in the backward pass (less memory)

    def __post_init__(self) -> None:
        for cls in type(self).__mro__:
            for key in vars(cls).get("positive_ints", ()):
                check_int(f"model {key}", getattr(self, key))
        self._check()

    def _check(self) -> None:
        """Architecture-specific checks, after the positive ints; subclasses extend it."""
        self.positive_number("embedding_std", "0.02: GPT-2's init")

    def positive_number(self, key: str, hint: str) -> None:
        """ValueError unless `key` holds a number > 0."""
        value = getattr(self, key)
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
            raise UserError(f"model {key} must be a number > 0 ({hint}), got {value!r}")

    def choice(self, key: str, options: tuple) -> None:
        """ValueError unless `key` holds one of `options`."""
        if getattr(self, key) not in options:
            raise UserError(f"model {key} for {self.arch} must be one of {options}, got {getattr(self, key)!r}")

    @property
    def family(self) -> str:
        """The family reports group runs of different sizes by (the recall frontier): the arch, unless a
        field changes the mechanism (a window, a decay)."""
        return self.arch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class MixerConfig(ModelConfig):
    """A stack of pre-norm residual blocks around one mixer each (mamba-ssm's MixerModel).

    The registry stacks the mixer module of any config of this kind with `MixerStack`; the mixer
    takes (config, layer_idx) and declares its history state in `state_size(n_past)`.
    """

    norm: str = "rms"  # block and final norm: rms | layer
    d_intermediate: int = 0  # hidden units of a GELU MLP after each mixer (mamba-ssm's name); 0: none

    def _check(self) -> None:
        super()._check()
        self.choice("norm", NORMS)
        check_int("model d_intermediate", self.d_intermediate, 0)
