"""L2MModel (input adapter -> backbone -> output adapter) and the SSM block stack.

A backbone maps (B, T, d_model) -> (B, T, d_model) including its final norm, and offers
init_state / step / state_breakdown(n_past); both GPT and MixerStack do.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor

NORMS = ("rms", "layer")


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

    def __init__(self, make_mixer: Callable[[int], nn.Module], n_layer: int, d_model: int, norm: str = "rms"):
        super().__init__()
        norm_cls = nn.RMSNorm if norm == "rms" else nn.LayerNorm
        self.layers = nn.ModuleList(MixerBlock(make_mixer(i), norm_cls(d_model, eps=1e-5)) for i in range(n_layer))
        self.norm_f = norm_cls(d_model, eps=1e-5)
        # mamba-ssm's init: linear biases zero (dt_proj's excepted), out_proj shrunk by 1/sqrt(n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight"):
                with torch.no_grad():
                    p /= math.sqrt(n_layer)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm_f(x)

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


class L2MModel(nn.Module):
    """Token model: ``encoder`` (io adapter) -> ``backbone`` -> ``decoder`` (io adapter).

    forward(x): ids (B, T) -> logits (B, T, V), or Gaussian tokens (B, T, D) -> (mean, std).
    step(x_t, state): the same for one token (B,) / (B, D), carrying the backbone's state.
    """

    def __init__(self, encoder: nn.Module, backbone: nn.Module, decoder: nn.Module, name: str | None = None):
        super().__init__()
        self.name = name
        self.encoder, self.backbone, self.decoder = encoder, backbone, decoder

    def forward(self, x: Tensor):
        return self.decoder(self.backbone(self.encoder(x)))

    def init_state(self, batch: int, device=None, dtype=None):
        p = next(self.parameters())
        return self.backbone.init_state(batch, device or p.device, dtype or p.dtype)

    def step(self, x: Tensor, state):
        h, state = self.backbone.step(self.encoder(x), state)
        return self.decoder(h), state

    def history_state_breakdown(self, n_past: int) -> dict[str, int]:
        """Scalars of history state per sequence after reading n_past tokens, by part
        ("kv" for attention, "ssm" and "conv" for SSMs)."""
        if isinstance(n_past, bool) or not isinstance(n_past, int) or n_past < 0:
            raise ValueError(f"n_past must be an int >= 0, got {n_past!r}")
        return self.backbone.state_breakdown(n_past)

    def history_state_size(self, n_past: int) -> int:
        """dim(z): total scalars the step state holds after n_past tokens (batch 1)."""
        return sum(self.history_state_breakdown(n_past).values())

    def num_params(self) -> int:
        """Trainable parameters, tied weights counted once."""
        return sum(p.numel() for p in self.parameters())
