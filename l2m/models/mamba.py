"""Mamba-1 mixer (selective SSM) with mamba-ssm's parameter names, shapes and initialisation.

A state dict of ``mamba_ssm.modules.mamba_simple.Mamba`` loads into this module unchanged, so
weights move between our PyTorch path and the CUDA kernels. Backends: l2m.models.kernels
("compiled" runs the conv and the scan as the compiled CPU loops of l2m.models.compiled, which
"auto" takes on a CPU where they build; "reference" is the sequential per-token scan, for tests and
benchmarks).

History state per sequence (spec §3): ssm = d_inner·d_state, conv = d_inner·(d_conv−1).
Step mode carries exactly those tensors; the SSM state in at least float32 (see `init_state`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from l2m.checks import UserError, is_int
from l2m.models.compiled import (
    compiled_causal_conv1d_silu,
    compiled_selective_scan_channels_last,
    require_compiled,
    use_compiled,
)
from l2m.models.config import MixerConfig
from l2m.models.kernels import causal_conv1d, causal_conv1d_carry, kernels_available, load_kernels, require_kernels, use_kernels
from l2m.models.selective_scan import selective_scan, selective_scan_ref

BACKENDS = ("auto", "torch", "compiled", "kernels", "reference")
KERNELS = ("selective_scan_fn",)  # causal_conv1d_fn too where installed
FUSED_KERNELS = ("mamba_inner_fn", "causal_conv1d_fn")  # the fused training path, taken where both import


@dataclass(kw_only=True)
class MambaConfig(MixerConfig):
    positive_ints: ClassVar[tuple[str, ...]] = ("d_state", "d_conv", "expand")

    arch: str = "mamba"
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"  # auto: ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    bias: bool = False  # in in_proj and out_proj
    backend: str = "auto"

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank

    @property
    def kernels(self) -> tuple[str, ...]:
        """The kernels backend='kernels' needs (l2m.models.kernels)."""
        return KERNELS

    def _check(self) -> None:
        super()._check()
        self.choice("backend", BACKENDS)
        if self.dt_rank != "auto" and not (is_int(self.dt_rank) and self.dt_rank >= 1):
            raise UserError(f"model dt_rank must be 'auto' (ceil(d_model / 16)) or an int >= 1, got {self.dt_rank!r}")
        require_kernels("Mamba", self.backend, KERNELS)
        require_compiled("Mamba", self.backend)


def ssm_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The step state of Mamba and Mamba2: at least float32, like the scans of the forward pass
    (in bf16 the state, a decayed sum over every token read, would lose the early tokens)."""
    return torch.promote_types(dtype, torch.float32)


class Mamba(nn.Module):
    """(B, L, d_model) -> (B, L, d_model); `step` for one token with the recurrent state."""

    def __init__(self, config: MambaConfig, layer_idx: int | None = None):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.backend = config.backend
        self.d_model, self.d_state, self.d_conv = config.d_model, config.d_state, config.d_conv
        self.d_inner, self.dt_rank = config.d_inner, config.resolved_dt_rank
        d_model, d_state, d_inner, dt_rank = self.d_model, self.d_state, self.d_inner, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=config.bias)
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, kernel_size=config.d_conv, groups=d_inner, padding=config.d_conv - 1, bias=config.conv_bias
        )
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=config.bias)
        for p in (self.A_log, self.D):
            p._no_weight_decay = True

        # dt_proj keeps the variance of dt at init, and its bias makes softplus(bias) log-uniform
        # in [dt_min, dt_max] (S4D/Mamba initialisation).
        std = dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_min, log_max = math.log(config.dt_min), math.log(config.dt_max)
        dt = torch.exp(torch.rand(d_inner) * (log_max - log_min) + log_min).clamp(min=config.dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj.bias._no_reinit = True

    def forward(self, hidden: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple | None]:
        """hidden (B, L, d_model) -> (B, L, d_model); with a state (conv, ssm), the state after the L
        tokens (on the torch path: the kernels and compiled loops take no initial state)."""
        kernels = state is None and use_kernels("Mamba", self.backend, KERNELS, hidden)
        if kernels and kernels_available(*FUSED_KERNELS):
            return self._fused_forward(hidden), None
        compiled = state is None and not kernels and use_compiled("Mamba", self.backend, hidden)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, L, d_inner) each
        f = torch.float32 if kernels else ssm_state_dtype(hidden.dtype)  # the kernels take float32
        A = -torch.exp(self.A_log.to(f))  # (d_inner, d_state)
        conv_fn = load_kernels().causal_conv1d_fn if kernels else None
        conv_state = None
        if conv_fn is not None:
            x = x.transpose(1, 2).contiguous()  # (B, d_inner, L), as the kernel reads it
            x = conv_fn(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu").transpose(1, 2)
        elif compiled:  # channels last throughout: no transposed copies
            x = compiled_causal_conv1d_silu(x, self.conv1d.weight, self.conv1d.bias)  # (B, L, d_inner)
        elif state is not None:
            x, conv_state = causal_conv1d_carry(x.transpose(1, 2), self.conv1d, state[0])  # (B, d_inner, L)
            x = F.silu(x).transpose(1, 2)  # (B, L, d_inner)
        else:
            x = F.silu(causal_conv1d(x.transpose(1, 2), self.conv1d)).transpose(1, 2)  # (B, L, d_inner)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)  # (B, L, r / n / n)
        dt = dt @ self.dt_proj.weight.t()  # (B, L, d_inner); bias goes into the scan's softplus
        scan_args = dict(D=self.D.to(f), delta_bias=self.dt_proj.bias.to(f), delta_softplus=True)
        if compiled:
            return self.out_proj(compiled_selective_scan_channels_last(x, dt, A, B, C, z=z, **scan_args)), None
        if kernels:
            scan = load_kernels().selective_scan_fn
        else:
            scan = selective_scan_ref if self.backend == "reference" else selective_scan
        if state is not None:
            scan_args.update(h0=state[1], return_last_state=True)
        channels_first = (t.transpose(1, 2).contiguous() for t in (x, dt, B, C, z))
        u, delta, B, C, z = channels_first  # (B, d_inner, L) or (B, d_state, L)
        y = scan(u, delta, A, B, C, z=z, **scan_args)
        if state is None:
            return self.out_proj(y.transpose(1, 2)), None  # (B, L, d_model)
        y, ssm_state = y
        return self.out_proj(y.transpose(1, 2)), (conv_state, ssm_state.to(state[1].dtype))

    def _fused_forward(self, hidden: Tensor) -> Tensor:
        """forward through mamba-ssm's mamba_inner_fn, the same parameters as the other paths."""
        xz = self.in_proj.weight @ hidden.transpose(1, 2)  # (B, 2 d_inner, L), length-contiguous as it expects
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        return load_kernels().mamba_inner_fn(  # (B, L, d_model)
            xz,
            self.conv1d.weight,
            self.conv1d.bias,
            self.x_proj.weight,
            self.dt_proj.weight,
            self.out_proj.weight,
            self.out_proj.bias,
            -torch.exp(self.A_log.float()),
            None,  # B and C from x_proj
            None,
            self.D.float(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )

    def init_state(self, batch: int, device=None, dtype=None) -> tuple[Tensor, Tensor]:
        """Zero state: conv_state (B, d_inner, d_conv-1) holds the last d_conv-1 conv inputs (model
        dtype), ssm_state (B, d_inner, d_state) (`ssm_state_dtype`)."""
        device = device if device is not None else self.A_log.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        conv = torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=ssm_state_dtype(dtype))
        return conv, ssm

    def step(self, hidden: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One token: hidden (B, d_model) -> (B, d_model), new state (the old one is not modified)."""
        conv_state, ssm_state = state
        f = ssm_state_dtype(hidden.dtype)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, d_inner) each
        window = torch.cat([conv_state, x[:, :, None]], dim=-1)  # (B, d_inner, d_conv)
        x = (window * self.conv1d.weight.squeeze(1)).sum(-1)  # (B, d_inner)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)  # (B, r), (B, n), (B, n)
        dt = F.softplus(self.dt_proj(dt).to(f))  # (B, d_inner)
        A = -torch.exp(self.A_log.to(f))  # (d_inner, n)
        x, B, C = x.to(f), B.to(f), C.to(f)
        ssm_state = torch.exp(dt[:, :, None] * A) * ssm_state + (dt * x)[:, :, None] * B[:, None, :]  # (B, d_inner, n)
        y = torch.einsum("bdn,bn->bd", ssm_state, C) + self.D.to(f) * x  # (B, d_inner)
        y = (y * F.silu(z.to(f))).to(hidden.dtype)
        return self.out_proj(y), (window[:, :, 1:], ssm_state)

    def state_size(self, n_past: int) -> dict[str, int]:
        """Scalars of recurrent state per sequence (constant in the number of tokens read)."""
        return {"ssm": self.d_inner * self.d_state, "conv": self.d_inner * (self.d_conv - 1)}

    def extra_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token besides its linear layers: the depthwise conv and the selective scan
        (9 per state element, mamba-ssm's count)."""
        return 2 * self.d_conv * self.d_inner + 9 * self.d_inner * self.d_state
