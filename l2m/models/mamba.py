"""Mamba-1 mixer (selective SSM) with mamba-ssm's parameter names, shapes and initialisation.

A state dict of ``mamba_ssm.modules.mamba_simple.Mamba`` loads into this module unchanged, so
weights move between our PyTorch path and the CUDA kernels.

Backends:
  "torch"     our parallel selective scan (l2m.models.selective_scan), any device;
  "kernels"   mamba-ssm's selective_scan_fn + causal-conv1d (CUDA tensors only);
  "auto"      kernels when importable and the input is on CUDA, else torch;
  "reference" the sequential per-token scan (slow; for tests and benchmarks).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from l2m.models.selective_scan import selective_scan, selective_scan_ref

BACKENDS = ("auto", "torch", "kernels", "reference")
KERNELS_HINT = (
    "install the CUDA kernels with `pip install 'l2m[cuda]'` (mamba-ssm and causal-conv1d; needs "
    "CUDA torch and nvcc), or set backend='torch'"
)


def load_kernels():
    """(selective_scan_fn, causal_conv1d_fn) from mamba-ssm / causal-conv1d, or None if missing."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn, causal_conv1d_fn


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise causal convolution, x (B, D, L), weight (D, W) -> (B, D, L).

    A sum of W shifted products: PyTorch's grouped Conv1d on CPU is, for some layouts and thread
    counts, hundreds of times slower (0.5 s instead of 1 ms for (1, 128, 1024) on 2 threads).
    """
    W, L = weight.shape[1], x.shape[-1]
    x = F.pad(x, (W - 1, 0))
    y = sum(x[..., k : k + L] * weight[:, k, None] for k in range(W))
    return y if bias is None else y + bias[:, None]


class Mamba(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str = "auto",
        layer_idx: int | None = None,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if d_conv < 1:
            raise ValueError(f"d_conv must be >= 1, got {d_conv}")
        self.kernels = load_kernels() if backend in ("auto", "kernels") else None
        if backend == "kernels" and self.kernels is None:
            raise ImportError(f"backend='kernels' needs mamba-ssm and causal-conv1d: {KERNELS_HINT}")
        self.backend = backend
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        for p in (self.A_log, self.D):
            p._no_weight_decay = True

        # dt_proj keeps the variance of dt at init, and its bias makes softplus(bias) log-uniform
        # in [dt_min, dt_max] (S4D/Mamba initialisation).
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj.bias._no_reinit = True

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (B, L, d_model) -> (B, L, d_model)."""
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        A = -torch.exp(self.A_log.float())
        if self._use_kernels(hidden):
            selective_scan_fn, causal_conv1d_fn = self.kernels
            x = causal_conv1d_fn(x.contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
            scan = selective_scan_fn
        else:
            x = F.silu(causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias))
            scan = selective_scan_ref if self.backend == "reference" else selective_scan
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # bias goes into the scan's softplus
        y = scan(
            x.contiguous(),
            dt.contiguous(),
            A,
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            self.D.float(),
            z=z.contiguous(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))

    def _use_kernels(self, hidden: Tensor) -> bool:
        if self.backend == "kernels" and not hidden.is_cuda:
            raise ValueError(
                f"backend='kernels' runs on CUDA tensors only, got {hidden.device}: move the model to a GPU "
                "or set backend='torch'"
            )
        return self.kernels is not None and hidden.is_cuda

    def init_state(self, batch: int, device=None, dtype=None) -> tuple[Tensor, Tensor]:
        """(conv_state (B, d_inner, d_conv-1): last conv inputs, ssm_state (B, d_inner, d_state))."""
        device = device if device is not None else self.A_log.device
        dtype = dtype if dtype is not None else self.in_proj.weight.dtype
        conv = torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype)
        ssm = torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return conv, ssm

    def step(self, hidden: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One token: hidden (B, d_model) -> (B, d_model), new state (the old one is not modified)."""
        conv_state, ssm_state = state
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, d_inner)
        window = torch.cat([conv_state, x[:, :, None]], dim=-1)  # (B, d_inner, d_conv)
        x = (window * self.conv1d.weight.squeeze(1)).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt).float())  # (B, d_inner)
        A = -torch.exp(self.A_log.float())
        ssm_state = torch.exp(dt[:, :, None] * A) * ssm_state + (dt * x.float())[:, :, None] * B.float()[:, None, :]
        y = torch.einsum("bdn,bn->bd", ssm_state, C.float()) + self.D.float() * x.float()
        y = (y * F.silu(z.float())).to(hidden.dtype)
        return self.out_proj(y), (window[:, :, 1:], ssm_state)

    def state_breakdown(self) -> dict[str, int]:
        """Scalars of recurrent state per sequence (constant in the number of tokens read)."""
        return {"ssm": self.d_inner * self.d_state, "conv": self.d_inner * (self.d_conv - 1)}
