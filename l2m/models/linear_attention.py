"""Linear attention with a choice of decay: none (Katharopoulos et al. 2020), fixed per head (RetNet,
Sun et al. 2023) or a data-dependent gate per key channel (GLA, Yang et al. 2024).

Per head, with a state S of d_k × d_v scalars (fla's convention):

    S_t = diag(α_t) S_{t-1} + k_t v_tᵀ          o_t = S_tᵀ q_t

α_t = 1 (none), γ_h (fixed: RetNet's 1 − 2^(−5−h)), or sigmoid(gate(x_t))^(1/τ) per key channel
(gated). `linear_attention_chunked` evaluates a whole sequence with matmuls over chunks of Q tokens
(Yang et al. 2024's chunkwise form), `linear_attention_step` is one step of the recurrence (step
mode); on a CPU, `l2m.models.compiled.compiled_recurrence` runs the recurrence itself as a compiled
loop (backend compiled, auto's choice there). History state per sequence: n_head·d_k·d_v, plus the short convolution's (d_conv − 1)
inputs of q, k and v where d_conv > 1.

Shapes: b batch, T time, h heads, c chunks, l/s positions in a chunk (l output, s input),
k/v the key and value dims per head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from l2m.checks import UserError
from l2m.models.compiled import compiled_causal_conv1d_silu, compiled_recurrence, require_compiled, use_compiled
from l2m.models.config import MixerConfig
from l2m.models.kernels import causal_conv1d, causal_conv1d_carry, load_kernels, require_kernels, use_kernels

DECAYS = ("none", "fixed", "gated")
BACKENDS = ("auto", "torch", "compiled", "kernels")  # compiled: the CPU loops of l2m.models.compiled; kernels: fla-core's Triton ops


def check_heads(config: MixerConfig) -> None:
    """d_key and d_value (d_model where null) split evenly over n_head; d_conv >= 0."""
    for key in ("d_key", "d_value"):
        total = getattr(config, key) or config.d_model
        if isinstance(total, bool) or not isinstance(total, int) or total < 1 or total % config.n_head:
            raise UserError(f"model {key}={total!r} must be an int >= 1 divisible by n_head={config.n_head} "
                            f"(it is split over the heads); change {key} (null: d_model) or n_head")
    if isinstance(config.d_conv, bool) or not isinstance(config.d_conv, int) or config.d_conv < 0:
        raise UserError(f"model d_conv must be an int >= 0 (0 or 1: no short convolution), got {config.d_conv!r}")


@dataclass(kw_only=True)
class LinearAttentionConfig(MixerConfig):
    positive_ints: ClassVar[tuple[str, ...]] = ("n_head", "chunk_size", "gate_rank")

    arch: str = "linear_attention"
    n_head: int = 4
    d_key: int | None = None  # key dims over all heads; null: d_model
    d_value: int | None = None  # value dims over all heads; null: d_model
    decay: str = "none"  # none (linear attention) | fixed (RetNet) | gated (GLA)
    fixed_decays: list[float] | None = None  # decay=fixed: one γ in (0, 1] per head; null: RetNet's 1 - 2^(-5-h)
    gate_rank: int = 16  # decay=gated: rank of the gate's projection (GLA's)
    gate_normalizer: float = 16.0  # decay=gated: α = sigmoid(.)^(1/τ), τ this (GLA's 16)
    d_conv: int = 0  # short causal convolution over q, k, v (fla's use_short_conv); 0: none
    chunk_size: int = 32  # block length of the chunked form (changes the result only by rounding)
    backend: str = "auto"  # auto | torch | compiled (CPU loops) | kernels (fla-core's chunk_gla / chunk_simple_gla on CUDA)

    @property
    def family(self) -> str:
        return {"none": "linear attention", "fixed": "retnet", "gated": "gla"}[self.decay]

    @property
    def kernels(self) -> tuple[str, ...]:
        return ("chunk_gla",) if self.decay == "gated" else ("chunk_simple_gla",)

    def _check(self) -> None:
        super()._check()
        self.choice("decay", DECAYS)
        self.choice("backend", BACKENDS)
        check_heads(self)
        self.positive_number("gate_normalizer", "GLA's 16")
        if self.fixed_decays is not None:
            decays = list(self.fixed_decays)
            if len(decays) != self.n_head or not all(isinstance(g, (int, float)) and 0 < g <= 1 for g in decays):
                raise UserError(f"model fixed_decays must hold n_head={self.n_head} decays in (0, 1] (1: none), "
                                f"got {self.fixed_decays!r}; null gives RetNet's 1 - 2^(-5-h)")
        require_kernels("linear attention", self.backend, self.kernels)
        require_compiled("linear attention", self.backend)


def _chunks(x: Tensor, Q: int) -> Tensor:
    """(b, T, h, d) -> (b, h, c, Q, d), the tail padded with zeros."""
    b, T, h, d = x.shape
    x = F.pad(x, (0, 0, 0, 0, 0, (-T) % Q))
    return x.view(b, -1, Q, h, d).permute(0, 3, 1, 2, 4)


def _unchunk(y: Tensor, T: int) -> Tensor:
    """(b, h, c, Q, d) -> (b, T, h, d)."""
    b, h, c, Q, d = y.shape
    return y.permute(0, 2, 3, 1, 4).reshape(b, c * Q, h, d)[:, :T]


def _channel_decayed_scores(q: Tensor, k: Tensor, cum: Tensor) -> Tensor:
    """scores[l, s] = sum_k q[l, k] k[s, k] exp(cum[l, k] - cum[s, k]) for s <= l in each chunk, a decay
    per key channel (GLA), in sub-chunks of S <= 8 tokens (Yang et al. 2024's secondary chunking).

    q, k, cum: (b, h, c, Q, k) -> (b, h, c, Q, Q). Within a sub-chunk the differences are taken pairwise
    (a (S, S, k) tensor); across sub-chunks they are factored through B_i, the log-decay at the start
    of l's sub-chunk i: exp(cum[l] - B_i) · exp(B_i - cum[s]), both <= 1, so two matmuls serve.
    """
    b, h, c, Q, dk = q.shape
    S = max(d for d in range(1, 9) if Q % d == 0)
    n = Q // S
    sub = torch.arange(Q, device=q.device) // S  # (Q,): each position's sub-chunk

    # 1. within each sub-chunk: pairwise, (b, h, c, n, l, s)
    q_sub, k_sub, cum_sub = (t.view(b, h, c, n, S, dk) for t in (q, k, cum))
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()  # (l, s)
    gap = (cum_sub.unsqueeze(5) - cum_sub.unsqueeze(4)).masked_fill(~causal[:, :, None], -torch.inf)
    within = torch.einsum("bhcnlk,bhcnsk,bhcnlsk->bhcnls", q_sub, k_sub, gap.exp())

    # 2. from earlier sub-chunks, through B_i (0 for the first sub-chunk)
    start = F.pad(cum_sub[..., :-1, -1, :], (0, 0, 1, 0))  # (b, h, c, n, k): B_i
    q_from_start = q_sub * (cum_sub - start.unsqueeze(4)).exp()  # (b, h, c, n, S, k)
    earlier = (sub[None, :] < torch.arange(n, device=q.device)[:, None])[:, :, None]  # (n, Q, 1): s before i
    to_start = (start.unsqueeze(4) - cum.unsqueeze(3)).masked_fill(~earlier, -torch.inf)  # (b, h, c, n, Q, k)
    across = q_from_start @ (k.unsqueeze(3) * to_start.exp()).transpose(-1, -2)  # (b, h, c, n, S, Q)

    # 3. the sub-chunks' own blocks on the diagonal
    diagonal = torch.eye(n, dtype=q.dtype, device=q.device).view(n, 1, n, 1)
    scores = across.view(b, h, c, n, S, n, S) + within.unsqueeze(5) * diagonal  # (b, h, c, n, l, n', s)
    return scores.reshape(b, h, c, Q, Q)


def linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, chunk_size: int,
                             initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """o_t = S_tᵀ q_t for S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_tᵀ, by chunks of Q tokens.

    q, k: (b, T, h, k); v: (b, T, h, v); log_decay: (b, T, h, k) per key channel, or (b, T, h, 1)
    one per head, <= 0; initial_state: (b, h, k, v) (zeros where None).
    Returns o (b, T, h, v) and the state after the last token (b, h, k, v). A padded tail step
    (k = v = 0, log-decay 0) leaves the state as it is.
    """
    b, T, h, dk = q.shape
    Q = min(chunk_size, T)
    q, k, v, a = (_chunks(t, Q) for t in (q, k, v, log_decay))  # (b, h, c, Q, .)
    cum = a.cumsum(dim=3)  # (b, h, c, Q, k|1): log-decay from the chunk start to l, inclusive
    causal = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril()  # (l, s): s <= l

    # 1. within chunks: o[l] = sum_{s<=l} (q[l] ⊙ exp(cum[l] - cum[s])) · k[s] v[s], every factor
    #    exp(.) <= 1 (no overflow, however strong the decay)
    if a.shape[-1] == 1:
        gap = (cum - cum.transpose(-1, -2)).masked_fill(~causal, -torch.inf)  # (b, h, c, l, s)
        scores = (q @ k.transpose(-1, -2)) * gap.exp()  # (b, h, c, l, s)
    else:
        scores = _channel_decayed_scores(q, k, cum)  # (b, h, c, l, s)
    o = scores @ v  # (b, h, c, l, v)

    # 2. each chunk's contribution to the state at its end: k[s] decayed from s to the end
    k_to_end = k * (cum[:, :, :, -1:] - cum).exp()  # (b, h, c, s, k)
    chunk_states = k_to_end.transpose(-1, -2) @ v  # (b, h, c, k, v)

    # 3. across chunks: the state entering each (a loop over chunks, not time steps)
    chunk_decay = cum[:, :, :, -1].exp().unsqueeze(-1)  # (b, h, c, k|1, 1)
    state = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else initial_state.to(q.dtype)
    entering = []
    for decay_c, new_c in zip(chunk_decay.unbind(2), chunk_states.unbind(2)):
        entering.append(state)
        state = decay_c * state + new_c
    entering = torch.stack(entering, dim=2)  # (b, h, c, k, v)

    # 4. the entering state read by q[l], decayed from the chunk start to l
    o = o + (q * cum.exp()) @ entering
    return _unchunk(o, T), state


def linear_attention_kernel(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
                            initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`linear_attention_chunked` on fla-core's Triton ops (CUDA): chunk_simple_gla for one decay
    per head, chunk_gla for one per key channel; same arguments, same results up to rounding."""
    kernels = load_kernels()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if log_decay.shape[-1] == 1:
        return kernels.chunk_simple_gla(q, k, v, g=log_decay.squeeze(-1).contiguous(), scale=1.0,
                                        initial_state=initial_state, output_final_state=True)
    return kernels.chunk_gla(q, k, v, g=log_decay.contiguous(), scale=1.0, initial_state=initial_state,
                             output_final_state=True)


def linear_attention_step(state: Tensor, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor) -> tuple[Tensor, Tensor]:
    """One step: state (b, h, k, v); q, k (b, h, k); v (b, h, v); log_decay (b, h, k|1).
    Returns o (b, h, v) and the new state."""
    state = log_decay.exp().unsqueeze(-1) * state + k.unsqueeze(-1) * v.unsqueeze(-2)
    return torch.einsum("bhk,bhkv->bhv", q, state), state


class ShortConvolution(nn.Module):
    """Depthwise causal convolution over `channels` (fla's ShortConvolution), then SiLU; its state
    is the last d_conv − 1 inputs, (b, channels, d_conv − 1)."""

    def __init__(self, channels: int, d_conv: int):
        super().__init__()
        self.d_conv = d_conv
        self.conv1d = nn.Conv1d(channels, channels, d_conv, groups=channels, padding=d_conv - 1, bias=False)

    def forward(self, x: Tensor, state: Tensor | None = None, compiled: bool = False) -> tuple[Tensor, Tensor | None]:
        """x (b, T, channels) -> (b, T, channels); with a state, the state after x. compiled: Mamba's fused
        CPU loop (no state)."""
        if state is None and compiled:
            return compiled_causal_conv1d_silu(x, self.conv1d.weight, None), None
        if state is None:
            return F.silu(causal_conv1d(x.transpose(1, 2), self.conv1d).transpose(1, 2)), None
        y, state = causal_conv1d_carry(x.transpose(1, 2), self.conv1d, state)
        return F.silu(y.transpose(1, 2)), state

    def init_state(self, batch: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch, self.conv1d.in_channels, self.d_conv - 1, device=device, dtype=dtype)


class GatedHeadNorm(nn.Module):
    """RMSNorm of each head's output, times silu(gate) (RetNet's and GLA's output gate)."""

    def __init__(self, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.RMSNorm(head_dim, eps=eps)

    def forward(self, o: Tensor, gate: Tensor) -> Tensor:
        """o (..., h, v), gate (..., h·v) -> (..., h·v)."""
        return self.norm(o).flatten(-2) * F.silu(gate)


class QKVMixer(nn.Module):
    """What linear attention and DeltaNet share: projections to q, k, v and the output gate, the
    optional short convolution over [q, k, v], the gated per-head norm and out_proj at the end, and
    the choice of path."""

    who: str  # the mixer's name in messages

    def __init__(self, config: MixerConfig, layer_idx: int | None = None):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.decay, self.chunk_size, self.backend, self.kernels = config.decay, config.chunk_size, config.backend, config.kernels
        self.n_head, d_model = config.n_head, config.d_model
        self.d_key, self.d_value = config.d_key or d_model, config.d_value or d_model
        self.head_k, self.head_v = self.d_key // self.n_head, self.d_value // self.n_head
        self.q_proj = nn.Linear(d_model, self.d_key, bias=False)
        self.k_proj = nn.Linear(d_model, self.d_key, bias=False)
        self.v_proj = nn.Linear(d_model, self.d_value, bias=False)
        self.g_proj = nn.Linear(d_model, self.d_value, bias=False)
        channels = 2 * self.d_key + self.d_value
        self.conv = ShortConvolution(channels, config.d_conv) if config.d_conv > 1 else None
        self.o_norm = GatedHeadNorm(self.head_v)
        self.out_proj = nn.Linear(self.d_value, d_model, bias=False)

    def extra_repr(self) -> str:
        return (f"n_head={self.n_head}, d_key={self.d_key}, d_value={self.d_value}, decay={self.decay!r}, "
                f"backend={self.backend!r}")

    def _path(self, x: Tensor) -> str:
        """Where this input runs: "kernels" (fla-core's, CUDA), "compiled" (the CPU loops) or "torch"."""
        if use_kernels(self.who, self.backend, self.kernels, x):
            return "kernels"
        return "compiled" if use_compiled(self.who, self.backend, x) else "torch"

    def _qkv(self, x: Tensor, conv_state: Tensor | None, path: str) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """x (b, T, d_model) -> q, k (b, T, h, k), v (b, T, h, v), the conv state after x."""
        # one matmul on the three weights (a small copy) instead of a copy of three outputs
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (2 d_key + d_value, d_model)
        qkv = F.linear(x, weight)  # (b, T, 2 d_key + d_value)
        if self.conv is not None:
            qkv, conv_state = self.conv(qkv, conv_state, compiled=path == "compiled")
        q, k, v = qkv.split([self.d_key, self.d_key, self.d_value], dim=-1)
        return (q.unflatten(-1, (self.n_head, self.head_k)), k.unflatten(-1, (self.n_head, self.head_k)),
                v.unflatten(-1, (self.n_head, self.head_v)), conv_state)

    def _out(self, o: Tensor, x: Tensor) -> Tensor:
        """o (..., h, v) and the mixer's input x (..., d_model) -> (..., d_model)."""
        return self.out_proj(self.o_norm(o.to(x.dtype), self.g_proj(x)))

    def init_state(self, batch: int, device=None, dtype=None) -> tuple[Tensor | None, Tensor]:
        """(conv state or None, the recurrent state (b, h, k, v), in at least float32)."""
        device = device if device is not None else self.q_proj.weight.device
        dtype = dtype if dtype is not None else self.q_proj.weight.dtype
        conv = None if self.conv is None else self.conv.init_state(batch, device, dtype)
        f = torch.promote_types(dtype, torch.float32)
        return conv, torch.zeros(batch, self.n_head, self.head_k, self.head_v, device=device, dtype=f)

    def state_size(self, n_past: int) -> dict[str, int]:
        """The recurrent state, n_head·d_k·d_v, and the short convolution's last inputs: constant in time."""
        sizes = {"state": self.n_head * self.head_k * self.head_v}
        if self.conv is not None:
            sizes["conv"] = self.conv.conv1d.in_channels * (self.conv.d_conv - 1)
        return sizes


class LinearAttention(QKVMixer):
    """Linear attention, RetNet or GLA by `decay`: (b, T, d_model) -> (b, T, d_model)."""

    config_class = LinearAttentionConfig
    who = "linear attention"

    def __init__(self, config: LinearAttentionConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        if config.decay == "fixed":
            decays = config.fixed_decays or [1 - 2.0 ** (-5 - h) for h in range(self.n_head)]
            self.register_buffer("log_gamma", torch.tensor(decays).log(), persistent=False)
        if config.decay == "gated":
            self.gate_normalizer = config.gate_normalizer
            self.gk_proj = nn.Sequential(nn.Linear(config.d_model, config.gate_rank, bias=False),
                                         nn.Linear(config.gate_rank, self.d_key, bias=True))

    def _feature_maps(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """decay none: elu + 1 on q and k (Katharopoulos's positive features); else q scaled by d_k^-1/2."""
        if self.decay == "none":
            return F.elu(q) + 1, F.elu(k) + 1
        return q * self.head_k**-0.5, k

    def _log_decay(self, x: Tensor, f: torch.dtype) -> Tensor:
        """(b, T, d_model) -> (b, T, h, k) for gated, (b, T, h, 1) otherwise."""
        b, T, _ = x.shape
        if self.decay == "gated":
            gate = F.logsigmoid(self.gk_proj(x).to(f)) / self.gate_normalizer
            return gate.unflatten(-1, (self.n_head, self.head_k))
        if self.decay == "fixed":
            return self.log_gamma.to(f).view(1, 1, -1, 1).expand(b, T, -1, 1)
        return x.new_zeros(b, T, self.n_head, 1, dtype=f)

    def forward(self, x: Tensor, state: tuple | None = None) -> tuple[Tensor, tuple | None]:
        """x (b, T, d_model) -> (b, T, d_model); with a state (conv, recurrent), the state after x."""
        path = self._path(x)
        q, k, v, conv_state = self._qkv(x, None if state is None else state[0], path)
        q, k = self._feature_maps(q, k)
        f = torch.promote_types(x.dtype, torch.float32)
        inputs = (q.to(f), k.to(f), v.to(f), self._log_decay(x, f))
        with torch.autocast(x.device.type, enabled=False):  # the recurrence in at least float32
            initial = None if state is None else state[1]
            if path == "kernels":
                o, final = linear_attention_kernel(*inputs, initial)
            elif path == "compiled":
                o, final = compiled_recurrence(*inputs[:3], log_decay=None if self.decay == "none" else inputs[3],
                                               initial_state=initial)
            else:
                o, final = linear_attention_chunked(*inputs, self.chunk_size, initial)
        return self._out(o, x), None if state is None else (conv_state, final)

    def step(self, x: Tensor, state: tuple) -> tuple[Tensor, tuple]:
        """One token through the recurrence: x (b, d_model) -> (b, d_model), the state after it."""
        q, k, v, conv_state = self._qkv(x[:, None], state[0], "torch")
        q, k = self._feature_maps(q[:, 0], k[:, 0])
        f = state[1].dtype
        o, new_state = linear_attention_step(state[1], q.to(f), k.to(f), v[:, 0].to(f), self._log_decay(x[:, None], f)[:, 0])
        return self._out(o, x), (conv_state, new_state)

    def extra_flops_per_token(self, seq_len: int) -> int:
        """The chunked form per token (chunk Q): q kᵀ and its product with v within the chunk (times
        d_k for a per-channel gate), and the state's update and read-out."""
        Q = min(self.chunk_size, seq_len)
        within = 2 * Q * self.d_key * (self.head_k if self.decay == "gated" else 1) + 2 * Q * self.d_value
        return within + 4 * self.n_head * self.head_k * self.head_v
