"""The block stack of every architecture: pre-norm residual blocks `Block(mixer, mlp)` and a final norm.

A mixer is any module with (mamba-ssm's and zoology's sequence mixers):

    forward(x (B, T, d_model), state=None) -> (y (B, T, d_model), state)
        without a state: from zeros, returning None for the state (training needs none; fused kernels
        give none); with one (init_state's, or a previous call's): the state after the T tokens, so a
        long sequence read in chunks with the state carried equals one pass
    init_state(batch, device, dtype) -> the state before the first token
    step(x (B, d_model), state) -> (y (B, d_model), state)       one token
    state_size(n_past) -> {part: scalars per sequence}            its history state after n_past tokens

Attention is a mixer like any other (its state, the KV cache, grows with n_past up to its window),
so stacks mix freely: one mixer for all layers (Mamba, Mamba2, linear attention, DeltaNet, GPT) or a
pattern of them (`HybridConfig`). An MLP is optional per block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from l2m.checks import UserError
from l2m.models.config import MixerConfig, call_block

ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # GELU, exact or its tanh approximation (GPT-2's "gelu_new")


def make_norm(kind: str, d_model: int, bias: bool = True) -> nn.Module:
    """The block and final norm: "rms" (RMSNorm) or "layer" (LayerNorm, with or without a bias)."""
    return nn.RMSNorm(d_model, eps=1e-5) if kind == "rms" else nn.LayerNorm(d_model, eps=1e-5, bias=bias)


class MLP(nn.Module):
    """d_model -> d_hidden -> GELU -> d_model (GPT-2's MLP and parameter names)."""

    def __init__(self, d_model: int, d_hidden: int, bias: bool = True, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_hidden, bias=bias)
        self.c_proj = nn.Linear(d_hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.approximate = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm2(x)) where the block has an MLP (mamba-ssm's Block)."""

    def __init__(self, mixer: nn.Module, norm: nn.Module, mlp: nn.Module | None = None, norm2: nn.Module | None = None):
        super().__init__()
        self.norm, self.mixer = norm, mixer
        if mlp is not None:
            self.norm2, self.mlp = norm2, mlp
        else:
            self.norm2 = self.mlp = None

    def _add_mlp(self, x: Tensor) -> Tensor:
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        y, state = self.mixer(self.norm(x), state)
        return self._add_mlp(x + y), state

    def step(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        y, state = self.mixer.step(self.norm(x), state)
        return self._add_mlp(x + y), state


class StackState(NamedTuple):
    """A stack's state: tokens read so far (for learned positions) and one state per layer."""

    position: int
    layers: tuple


class MixerStack(nn.Module):
    """Blocks and a final norm, learned positions optional (mamba-ssm's MixerModel, nanoGPT's GPT)."""

    def __init__(self, config: Any, layers: Sequence[Block], norm_f: nn.Module,
                 positions: nn.Embedding | None = None, dropout: float = 0.0):
        super().__init__()
        self.config = config
        self.wpe = positions
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(layers)
        self.norm_f = norm_f

    @classmethod
    def of_mixers(cls, config: MixerConfig, mixers: Sequence[nn.Module]) -> MixerStack:
        """One block per mixer, each with an MLP of config.d_intermediate
        hidden units where that is > 0, and mamba-ssm's init: linear biases zero (dt_proj's excepted),
        out_proj shrunk by 1/sqrt(n_layer)."""
        d = config.d_model

        def block(mixer: nn.Module) -> Block:
            mlp = MLP(d, config.d_intermediate) if config.d_intermediate else None
            return Block(mixer, make_norm(config.norm, d), mlp, make_norm(config.norm, d) if mlp else None)

        stack = cls(config, [block(mixer) for mixer in mixers], make_norm(config.norm, d))
        for module in stack.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
        for name, p in stack.named_parameters():
            if name.endswith("out_proj.weight"):
                with torch.no_grad():
                    p /= math.sqrt(len(mixers))
        return stack

    @property
    def max_positions(self) -> int | None:
        """The longest sequence it reads: the learned positions' count, else unbounded."""
        return None if self.wpe is None else self.wpe.num_embeddings

    def forward(self, x: Tensor, state: StackState | None = None) -> tuple[Tensor, StackState | None]:
        """x (B, T, d_model) -> (B, T, d_model); with a state, the state after the T tokens."""
        x = self.drop(self._add_positions(x, 0 if state is None else state.position))
        if state is None:
            for layer in self.layers:
                x, _ = call_block(layer, x, checkpointing=self.config.checkpointing)
            return self.norm_f(x), None
        layer_states = []
        for layer, s in zip(self.layers, state.layers, strict=True):
            x, s = layer(x, s)
            layer_states.append(s)
        return self.norm_f(x), StackState(state.position + x.shape[1], tuple(layer_states))

    def init_state(self, batch: int, device=None, dtype=None) -> StackState:
        p = self.norm_f.weight
        device, dtype = device or p.device, dtype or p.dtype
        return StackState(0, tuple(layer.mixer.init_state(batch, device, dtype) for layer in self.layers))

    def step(self, x: Tensor, state: StackState) -> tuple[Tensor, StackState]:
        """One token x (B, d_model) -> (B, d_model), the state after it."""
        x = self.drop(self._add_positions(x[:, None], state.position))[:, 0]
        layer_states = []
        for layer, s in zip(self.layers, state.layers, strict=True):
            x, s = layer.step(x, s)
            layer_states.append(s)
        return self.norm_f(x), StackState(state.position + 1, tuple(layer_states))

    def state_size(self, n_past: int) -> dict[str, int]:
        """The sum of its mixers' history states after n_past tokens, by part."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for key, n in layer.mixer.state_size(n_past).items():
                total[key] = total.get(key, 0) + n
        return total

    def extra_flops_per_token(self, seq_len: int) -> int:
        """Its mixers' forward FLOPs per token besides their linear layers (a mixer with none beside
        them needs no extra_flops_per_token)."""
        return sum(getattr(layer.mixer, "extra_flops_per_token", lambda _: 0)(seq_len) for layer in self.layers)

    def _add_positions(self, x: Tensor, start: int) -> Tensor:
        if self.wpe is None:
            return x
        end = start + x.shape[1]
        if end > self.wpe.num_embeddings:
            raise UserError(
                f"sequence of {end} tokens exceeds max_seq_len={self.wpe.num_embeddings} of the learned positions; "
                "build the model with a larger max_seq_len or use positional='rotary'"
            )
        return x + self.wpe(torch.arange(start, end, device=x.device))
