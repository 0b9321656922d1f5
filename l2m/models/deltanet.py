"""DeltaNet (Schlag et al. 2021; Yang et al. 2024) and Gated DeltaNet (Yang, Kautz & Hatamizadeh 2025):
linear attention whose state is corrected by the delta rule instead of only added to.

Per head, with a state S of d_k × d_v scalars (fla's convention), β_t in (0, 1), α_t = 1 (decay
none) or exp(−exp(A_log)·softplus(a_t + dt_bias)) (gated, Mamba2's decay):

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ          o_t = S_tᵀ q_t

q and k pass a short convolution and SiLU and are L2-normalised (q then scaled by d_k^-1/2), so
each step writes the new value for key k_t and keeps the rest. `delta_rule_chunked` evaluates a
sequence by chunks in the WY form (triangular solves and matmuls; Yang et al. 2024), `delta_rule_step`
is one step (step mode); on a CPU, `l2m.models.compiled.compiled_recurrence` runs the recurrence
itself as a compiled loop (backend compiled, auto's choice there). History state: n_head·d_k·d_v,
plus the short convolution's inputs.

Shapes: b batch, T time, h heads, c chunks, l/s positions in a chunk, k/v the dims per head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from l2m.models.compiled import compiled_recurrence, require_compiled
from l2m.models.config import MixerConfig
from l2m.models.kernels import load_kernels, require_kernels
from l2m.models.linear_attention import BACKENDS, QKVMixer, _chunks, _unchunk, check_heads

DECAYS = ("none", "gated")


@dataclass(kw_only=True)
class DeltaNetConfig(MixerConfig):
    positive_ints: ClassVar[tuple[str, ...]] = ("n_head", "chunk_size")

    arch: str = "deltanet"
    n_head: int = 4
    d_key: int | None = None  # key dims over all heads; null: d_model
    d_value: int | None = None  # value dims over all heads; null: d_model
    decay: str = "none"  # none (DeltaNet) | gated (Gated DeltaNet)
    d_conv: int = 4  # short causal convolution over q, k, v (both papers use one); 0: none
    chunk_size: int = 32  # block length of the chunked WY form (changes the result only by rounding)
    backend: str = "auto"  # auto | torch | compiled (CPU loops) | kernels (fla-core's chunk_delta_rule / chunk_gated_delta_rule on CUDA)

    @property
    def family(self) -> str:
        return {"none": "deltanet", "gated": "gated deltanet"}[self.decay]

    @property
    def kernels(self) -> tuple[str, ...]:
        return ("chunk_gated_delta_rule",) if self.decay == "gated" else ("chunk_delta_rule",)

    def _check(self) -> None:
        super()._check()
        self.choice("decay", DECAYS)
        self.choice("backend", BACKENDS)
        check_heads(self)
        require_kernels("DeltaNet", self.backend, self.kernels)
        require_compiled("DeltaNet", self.backend)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / ||x|| over the last dim, as fla's l2norm: x · rsqrt(sum x² + eps) (1.4x faster a layer than
    F.normalize's division on a CPU, forward and backward)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor, chunk_size: int,
                       initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The (gated) delta rule by chunks of Q tokens.

    q, k: (b, T, h, k); v: (b, T, h, v); beta: (b, T, h); log_decay: (b, T, h), <= 0;
    initial_state: (b, h, k, v) (zeros where None). Returns o (b, T, h, v) and the final state.

    Inside a chunk entered with state S, with G the cumulative log-decay from the chunk start, the
    corrections δ_l = β_l (v_l − α_l S_{l-1}ᵀ k_l) solve (I + A) Δ = diag(β) V − diag(β e^G) K S,
    A[l, s] = β_l e^(G_l − G_s) k_l·k_s for s < l: Δ = U − W S with U, W from one triangular solve.
    Then O = diag(e^G) Q S + (M ⊙ Q Kᵀ) Δ and S ← e^(G_Q) S + (K ⊙ e^(G_Q − G))ᵀ Δ, M[l, s] = e^(G_l − G_s).
    """
    b, T, h, dk = q.shape
    Q = min(chunk_size, T)
    q, k, v = (_chunks(t, Q) for t in (q, k, v))  # (b, h, c, Q, .)
    beta, a = (_chunks(t.unsqueeze(-1), Q).squeeze(-1) for t in (beta, log_decay))  # (b, h, c, Q)
    G = a.cumsum(dim=-1)  # (b, h, c, Q): log-decay from the chunk start to l, inclusive
    lower = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril()  # s <= l
    decay_ls = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~lower, -torch.inf).exp()  # (b, h, c, l, s): M

    # 1. within chunks, everything that does not depend on the entering state (all chunks at once)
    kk = (k @ k.transpose(-1, -2)) * decay_ls * beta.unsqueeze(-1)  # (b, h, c, l, s): A on s < l
    system = kk.tril(-1) + torch.eye(Q, dtype=q.dtype, device=q.device)  # I + A, unit lower triangular
    rhs = torch.cat([beta.unsqueeze(-1) * v, (beta * G.exp()).unsqueeze(-1) * k], dim=-1)  # (b, h, c, Q, v + k)
    UW = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    U, W = UW.split([v.shape[-1], dk], dim=-1)  # (b, h, c, Q, v), (b, h, c, Q, k)
    scores = (q @ k.transpose(-1, -2)) * decay_ls  # (b, h, c, l, s): M ⊙ Q Kᵀ
    q_decayed = q * G.exp().unsqueeze(-1)  # (b, h, c, Q, k)
    k_to_end = k * (G[..., -1:] - G).exp().unsqueeze(-1)  # (b, h, c, Q, k)
    chunk_decay = G[..., -1].exp()[..., None, None]  # (b, h, c, 1, 1)

    # 2. across chunks: the entering state's part (a loop over chunks, not time steps)
    state = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    outputs = []
    for U_c, W_c, scores_c, q_c, k_c, decay_c in zip(*(t.unbind(2) for t in (U, W, scores, q_decayed, k_to_end, chunk_decay))):
        delta = U_c - W_c @ state  # (b, h, Q, v)
        outputs.append(q_c @ state + scores_c @ delta)
        state = decay_c * state + k_c.transpose(-1, -2) @ delta
    return _unchunk(torch.stack(outputs, dim=2), T), state


def delta_rule_kernel(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor | None,
                      initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`delta_rule_chunked` on fla-core's Triton ops (CUDA); log_decay None: no decay (DeltaNet)."""
    kernels = load_kernels()
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    if log_decay is None:
        return kernels.chunk_delta_rule(q, k, v, beta, scale=1.0, initial_state=initial_state, output_final_state=True)
    return kernels.chunk_gated_delta_rule(q, k, v, g=log_decay.contiguous(), beta=beta, scale=1.0,
                                          initial_state=initial_state, output_final_state=True)


def delta_rule_step(state: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor) -> tuple[Tensor, Tensor]:
    """One step: state (b, h, k, v); q, k (b, h, k); v (b, h, v); beta, log_decay (b, h).
    Returns o (b, h, v) and the new state."""
    state = log_decay.exp()[..., None, None] * state
    delta = beta.unsqueeze(-1) * (v - torch.einsum("bhkv,bhk->bhv", state, k))  # (b, h, v)
    state = state + k.unsqueeze(-1) * delta.unsqueeze(-2)
    return torch.einsum("bhk,bhkv->bhv", q, state), state


class DeltaNet(QKVMixer):
    """DeltaNet or Gated DeltaNet by `decay`: (b, T, d_model) -> (b, T, d_model)."""

    config_class = DeltaNetConfig
    who = "DeltaNet"

    def __init__(self, config: DeltaNetConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        self.b_proj = nn.Linear(config.d_model, self.n_head, bias=False)
        if config.decay == "gated":  # Mamba2's decay: A in [1, 16], dt log-uniform in [1e-3, 0.1]
            self.a_proj = nn.Linear(config.d_model, self.n_head, bias=False)
            self.A_log = nn.Parameter(torch.empty(self.n_head).uniform_(1, 16).log())
            dt = torch.exp(torch.rand(self.n_head) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
            for p in (self.A_log, self.dt_bias):
                p._no_weight_decay = True

    def _inputs(self, x: Tensor, conv_state: Tensor | None, path: str) -> tuple[Tensor, ...]:
        """x (b, T, d_model) -> q, k (b, T, h, k), v (b, T, h, v), beta, log_decay (b, T, h) in at
        least float32, and the conv state after x."""
        q, k, v, conv_state = self._qkv(x, conv_state, path)
        if self.conv is None:  # the convolution applies the SiLU where there is one
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        f = torch.promote_types(x.dtype, torch.float32)
        q = l2_normalize(q.to(f)) * self.head_k**-0.5
        k = l2_normalize(k.to(f))
        beta = torch.sigmoid(self.b_proj(x).to(f))
        if self.decay == "gated":
            log_decay = -self.A_log.to(f).exp() * F.softplus(self.a_proj(x).to(f) + self.dt_bias.to(f))
        else:
            log_decay = beta.new_zeros(beta.shape)
        return q, k, v.to(f), beta, log_decay, conv_state

    def forward(self, x: Tensor, state: tuple | None = None) -> tuple[Tensor, tuple | None]:
        """x (b, T, d_model) -> (b, T, d_model); with a state (conv, recurrent), the state after x."""
        path = self._path(x)
        q, k, v, beta, log_decay, conv_state = self._inputs(x, None if state is None else state[0], path)
        with torch.autocast(x.device.type, enabled=False):  # the recurrence in at least float32
            initial = None if state is None else state[1]
            if path == "kernels":
                o, final = delta_rule_kernel(q, k, v, beta, log_decay if self.decay == "gated" else None, initial)
            elif path == "compiled":
                o, final = compiled_recurrence(q, k, v, beta, log_decay if self.decay == "gated" else None, initial)
            else:
                o, final = delta_rule_chunked(q, k, v, beta, log_decay, self.chunk_size, initial)
        return self._out(o, x), None if state is None else (conv_state, final)

    def step(self, x: Tensor, state: tuple) -> tuple[Tensor, tuple]:
        """One token through the recurrence: x (b, d_model) -> (b, d_model), the state after it."""
        q, k, v, beta, log_decay, conv_state = self._inputs(x[:, None], state[0], "torch")
        o, new_state = delta_rule_step(state[1], q[:, 0], k[:, 0], v[:, 0], beta[:, 0], log_decay[:, 0])
        return self._out(o, x), (conv_state, new_state.to(state[1].dtype))

    def extra_flops_per_token(self, seq_len: int) -> int:
        """The chunked WY form per token (chunk Q): k kᵀ and q kᵀ within the chunk, the triangular
        solve for U and W, and the state's read-out, correction and update."""
        Q = min(self.chunk_size, seq_len)
        within = 4 * Q * self.d_key + Q * (self.d_key + self.d_value) + 2 * Q * self.d_value
        return within + 6 * self.n_head * self.head_k * self.head_v
