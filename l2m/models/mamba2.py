"""Mamba2 mixer (SSD), parameter-compatible with mamba_ssm.modules.mamba2.Mamba2.

Parameter names, shapes and initialisation follow mamba-ssm, so a state dict moves between our
PyTorch path (`backend="torch"`, runs anywhere), the compiled CPU loops (`backend="compiled"`: the
SSD scan as the linear-attention recurrence, and Mamba's fused conv + SiLU) and the CUDA kernels
(`backend="kernels"`: mamba-ssm's `mamba_chunk_scan_combined`, plus causal-conv1d when installed);
see l2m.models.kernels.

History state per sequence (spec §3): ssm = nheads·headdim·d_state, conv = conv_dim·(d_conv−1),
with conv_dim = d_inner + 2·ngroups·d_state. Step mode carries exactly those tensors; the SSM
state in at least float32 (`l2m.models.mamba.ssm_state_dtype`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from l2m.checks import UserError
from l2m.models.compiled import compiled_causal_conv1d_silu, compiled_ssd, require_compiled, use_compiled
from l2m.models.config import MixerConfig
from l2m.models.kernels import causal_conv1d, causal_conv1d_carry, kernels_available, load_kernels, require_kernels, use_kernels
from l2m.models.mamba import ssm_state_dtype
from l2m.models.ssd import ssd_chunked, ssd_step

BACKENDS = ("auto", "torch", "compiled", "kernels")
KERNELS = ("mamba_chunk_scan_combined",)  # causal_conv1d_fn too where installed
# the memory-efficient training path, taken where both import
FUSED_KERNELS = ("mamba_split_conv1d_scan_combined", "causal_conv1d_fn")
# The torch path's SSD block length on a CPU, where chunk_size is larger: the within-chunk product
# costs ~Q per token, and at Q = 64 a fwd+bwd step of d_model 256 at L = 2,048 takes 0.6x the time
# of Q = 256 (benchmarks/RESULTS.md). The block length changes the result only by rounding.
CPU_CHUNK_SIZE = 64


@dataclass(kw_only=True)
class Mamba2Config(MixerConfig):
    positive_ints: ClassVar[tuple[str, ...]] = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size")

    arch: str = "mamba2"
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1  # groups of heads sharing B and C
    chunk_size: int = 256  # SSD block length (the torch path on a CPU uses at most CPU_CHUNK_SIZE)
    backend: str = "auto"
    A_init_range: tuple[float, float] = field(default=(1.0, 16.0))
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def kernels(self) -> tuple[str, ...]:
        """The kernels backend='kernels' needs (l2m.models.kernels)."""
        return KERNELS

    def _check(self) -> None:
        super()._check()
        self.choice("backend", BACKENDS)
        if self.d_inner % self.headdim:
            raise UserError(
                f"headdim={self.headdim} does not divide d_inner = expand * d_model = {self.d_inner}: choose a "
                f"headdim among the divisors of {self.d_inner} (e.g. 64) or change d_model/expand"
            )
        if self.nheads % self.ngroups:
            raise UserError(
                f"ngroups={self.ngroups} must divide the number of heads d_inner / headdim = {self.nheads}; "
                "change ngroups or headdim"
            )
        require_kernels("Mamba2", self.backend, KERNELS)
        require_compiled("Mamba2", self.backend)


class RMSNormGated(nn.Module):
    """norm(x · silu(z)) · weight, RMS taken over groups of `group_size` channels.

    mamba_ssm.ops.triton.layernorm_gated.RMSNorm with norm_before_gate=False (Mamba2's setting).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        self.eps = eps
        self.group_size = hidden_size if group_size is None else group_size
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        dtype = x.dtype
        f = torch.promote_types(dtype, torch.float32)  # bf16/fp16 upcast, as in mamba-ssm
        x = x.to(f) * F.silu(z.to(f))
        x = x.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        x = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + self.eps)
        return (x.flatten(-2) * self.weight.to(f)).to(dtype)


class Mamba2(nn.Module):
    """Mamba2 mixer: in_proj -> [z, x, B, C, dt]; causal depthwise conv on [x, B, C]; SSD scan;
    gated RMSNorm with z; out_proj. (B, T, d_model) -> (B, T, d_model)."""

    def __init__(self, config: Mamba2Config, layer_idx: int | None = None):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.backend = config.backend
        self.d_model, self.d_state, self.d_conv, self.expand = config.d_model, config.d_state, config.d_conv, config.expand
        self.headdim, self.ngroups, self.chunk_size = config.headdim, config.ngroups, config.chunk_size
        self.d_inner, self.nheads, self.conv_dim = config.d_inner, config.nheads, config.conv_dim
        d_model, d_inner, nheads, gn = self.d_model, self.d_inner, self.nheads, self.ngroups * self.d_state

        # Registration order and names as in mamba-ssm (state dicts line up key by key).
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * gn + nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.d_conv, groups=self.conv_dim, padding=config.d_conv - 1)
        # dt = softplus(raw + dt_bias) starts log-uniform in [dt_min, dt_max]: dt_bias = softplus^-1(dt)
        log_min, log_max = math.log(config.dt_min), math.log(config.dt_max)
        dt = torch.exp(torch.rand(nheads) * (log_max - log_min) + log_min).clamp(min=config.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # A = -exp(A_log) < 0, one decay rate per head, uniform in A_init_range
        self.A_log = nn.Parameter(torch.empty(nheads).uniform_(*config.A_init_range).log())
        self.D = nn.Parameter(torch.ones(nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # the convention mamba-ssm's optimiser grouping reads
        self.norm = RMSNormGated(d_inner, eps=1e-5, group_size=d_inner // config.ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, chunk_size={self.chunk_size}, backend={self.backend!r}")

    def _split_xbc(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., conv_dim) -> x (..., nheads, headdim), B and C (..., ngroups, d_state)."""
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        return (x.unflatten(-1, (self.nheads, self.headdim)),
                B.unflatten(-1, (self.ngroups, self.d_state)),
                C.unflatten(-1, (self.ngroups, self.d_state)))

    def _scan_inputs(self, x: Tensor, dt: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, ...]:
        """(x, dt, A, B, C, D) for the scan, in at least float32 as in the kernels (cumulative
        log-decays lose too much in bf16/fp16), with dt = softplus(dt + dt_bias) and A = -exp(A_log)."""
        f = ssm_state_dtype(x.dtype)
        dt = F.softplus(dt.to(f) + self.dt_bias.to(f))
        return x.to(f), dt, -torch.exp(self.A_log.to(f)), B.to(f), C.to(f), self.D.to(f)

    def forward(self, u: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple | None]:
        """u (b, T, d_model) -> (b, T, d_model); with a state (conv, ssm), the state after the T tokens
        (on the torch path: the kernels take no initial state)."""
        if u.ndim != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2: input must be (batch, seqlen, d_model={self.d_model}), got {tuple(u.shape)}")
        kernels = state is None and use_kernels("Mamba2", self.backend, KERNELS, u)
        compiled = not kernels and use_compiled("Mamba2", self.backend, u)
        zxbcdt = self.in_proj(u)  # (b, T, d_inner + conv_dim + h)
        if kernels and kernels_available(*FUSED_KERNELS):
            y = load_kernels().mamba_split_conv1d_scan_combined(  # (b, T, d_model)
                zxbcdt,
                self.conv1d.weight.squeeze(1),
                self.conv1d.bias,
                self.dt_bias,
                -torch.exp(self.A_log.float()),
                D=self.D,
                chunk_size=self.chunk_size,
                activation="silu",
                rmsnorm_weight=self.norm.weight,
                rmsnorm_eps=self.norm.eps,
                outproj_weight=self.out_proj.weight,
                outproj_bias=self.out_proj.bias,
                headdim=self.headdim,
                ngroups=self.ngroups,
                norm_before_gate=False,  # RMSNormGated: norm(y * silu(z))
            )
            return y, None
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        conv_fn = load_kernels().causal_conv1d_fn if kernels else None
        conv_state = None
        if conv_fn is not None:
            xBC = conv_fn(xBC.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
            xBC = xBC.transpose(1, 2)  # (b, T, conv_dim)
        elif compiled and state is None:  # channels last: a view of in_proj's output, no copy
            xBC = compiled_causal_conv1d_silu(xBC, self.conv1d.weight, self.conv1d.bias)  # (b, T, conv_dim)
        elif state is not None:
            xBC, conv_state = causal_conv1d_carry(xBC.transpose(1, 2), self.conv1d, state[0])
            xBC = F.silu(xBC.transpose(1, 2).contiguous())  # (b, T, conv_dim)
        else:
            # (b, T, conv_dim), contiguous before the SiLU: its backward runs ~5x slower on a CPU when
            # the gradient's memory layout differs from its input's
            xBC = F.silu(causal_conv1d(xBC.transpose(1, 2), self.conv1d).transpose(1, 2).contiguous())
        x, B, C = self._split_xbc(xBC)  # (b, T, h, p), (b, T, g, n), (b, T, g, n)

        ssm_state = None
        if kernels:  # the kernel applies softplus(dt + dt_bias) itself and computes in float32
            A = -torch.exp(self.A_log.float())
            scan = load_kernels().mamba_chunk_scan_combined
            y = scan(x, dt, A, B, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        else:
            with torch.autocast(u.device.type, enabled=False):
                x, dt, A, B, C, D = self._scan_inputs(x, dt, B, C)
                chunk = min(self.chunk_size, CPU_CHUNK_SIZE) if u.device.type == "cpu" else self.chunk_size
                if compiled:
                    y, ssm_state = compiled_ssd(x, dt, A, B, C, D, None if state is None else state[1].to(x.dtype))
                    ssm_state = None if state is None else ssm_state.to(state[1].dtype)
                elif state is None:
                    y = ssd_chunked(x, dt, A, B, C, chunk, D=D)  # (b, T, h, p)
                else:
                    y, ssm_state = ssd_chunked(x, dt, A, B, C, chunk, D=D, initial_state=state[1].to(x.dtype),
                                               return_final_state=True)
                    ssm_state = ssm_state.to(state[1].dtype)
                y = y.to(u.dtype)
        y = self.out_proj(self.norm(y.flatten(-2), z))  # (b, T, d_model)
        return y, None if state is None else (conv_state, ssm_state)

    def init_state(self, batch: int, device=None, dtype=None) -> tuple[Tensor, Tensor]:
        """Zero state: conv_state (batch, conv_dim, d_conv-1) holds the last d_conv-1 conv inputs (model
        dtype), ssm_state (batch, nheads, headdim, d_state) (`ssm_state_dtype`)."""
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_state_dtype(dtype))
        return conv_state, ssm_state

    def step(self, u: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One token: u (batch, d_model) -> y (batch, d_model) and the new state (inputs untouched).

        Plain PyTorch on every backend: a step is a handful of small ops either way."""
        if u.ndim != 2 or u.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2.step: input must be (batch, d_model={self.d_model}), got {tuple(u.shape)}")
        conv_state, ssm_state = state
        z, xBC, dt = torch.split(self.in_proj(u), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        window = torch.cat([conv_state, xBC.unsqueeze(-1)], dim=-1)  # (b, conv_dim, d_conv)
        xBC = F.silu((window * self.conv1d.weight.squeeze(1)).sum(-1) + self.conv1d.bias)
        x, B, C = self._split_xbc(xBC)  # (b, h, p), (b, g, n), (b, g, n)
        with torch.autocast(u.device.type, enabled=False):
            x, dt, A, B, C, D = self._scan_inputs(x, dt, B, C)
            y, new_ssm_state = ssd_step(ssm_state.to(x.dtype), x, dt, A, B, C, D)
        y = self.out_proj(self.norm(y.to(u.dtype).flatten(-2), z))
        return y, (window[..., 1:].to(conv_state.dtype), new_ssm_state.to(ssm_state.dtype))

    def state_size(self, n_past: int) -> dict[str, int]:
        """Scalars of history state per sequence (constant in time)."""
        return {"ssm": self.nheads * self.headdim * self.d_state, "conv": self.conv_dim * (self.d_conv - 1)}

    def extra_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token besides its linear layers: the depthwise conv and the chunked SSD
        (per chunk of Q tokens: C Bᵀ per group, then per head the masked product with X, the chunk's
        state Bᵀ X and the read-out C h)."""
        q, n, p = self.chunk_size, self.d_state, self.headdim
        return 2 * self.d_conv * self.conv_dim + 2 * q * n * self.ngroups + self.nheads * (2 * q * p + 4 * n * p)
