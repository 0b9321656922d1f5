"""The block stack of every mixer architecture (Mamba, Mamba2, or one you register).

A mixer module takes (config, layer_idx) and offers forward (B, T, d_model) -> (B, T, d_model),
init_state(batch, device, dtype), step(x (B, d_model), state) -> (y, new state), and
state_breakdown() -> {part: scalars per sequence}, its recurrent state, constant in time.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from l2m.models.config import MixerConfig, call_block


class MixerBlock(nn.Module):
    """Pre-norm residual block around one mixer: x + mixer(norm(x)) (mamba-ssm's Block)."""

    def __init__(self, mixer: nn.Module, norm: nn.Module):
        super().__init__()
        self.norm, self.mixer = norm, mixer

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mixer(self.norm(x))

    def step(self, x: Tensor, state):
        y, state = self.mixer.step(self.norm(x), state)
        return x + y, state


class MixerStack(nn.Module):
    """n_layer mixer blocks and a final norm, like mamba-ssm's MixerModel minus the embedding."""

    def __init__(self, config: MixerConfig, mixer: type[nn.Module]):
        super().__init__()
        self.config = config
        norm_cls = nn.RMSNorm if config.norm == "rms" else nn.LayerNorm
        self.layers = nn.ModuleList(
            MixerBlock(mixer(config, layer_idx=i), norm_cls(config.d_model, eps=1e-5)) for i in range(config.n_layer)
        )
        self.norm_f = norm_cls(config.d_model, eps=1e-5)
        # mamba-ssm's init: linear biases zero (dt_proj's excepted), out_proj shrunk by 1/sqrt(n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight"):
                with torch.no_grad():
                    p /= math.sqrt(config.n_layer)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = call_block(layer, x, checkpointing=self.config.checkpointing)
        return self.norm_f(x)

    def extra_flops_per_token(self, seq_len: int) -> int:
        """Its mixers' forward FLOPs per token besides their linear layers (a mixer with none beside
        them needs no extra_flops_per_token)."""
        return sum(getattr(layer.mixer, "extra_flops_per_token", lambda _: 0)(seq_len) for layer in self.layers)

    def init_state(self, batch: int, device=None, dtype=None) -> tuple:
        return tuple(layer.mixer.init_state(batch, device, dtype) for layer in self.layers)

    def step(self, x: Tensor, state: tuple) -> tuple[Tensor, tuple]:
        new_state = []
        for layer, s in zip(self.layers, state):
            x, s = layer.step(x, s)
            new_state.append(s)
        return self.norm_f(x), tuple(new_state)

    def state_breakdown(self, n_past: int) -> dict[str, int]:
        """Sum of the mixers' recurrent states; independent of n_past."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for key, n in layer.mixer.state_breakdown().items():
                total[key] = total.get(key, 0) + n
        return total
