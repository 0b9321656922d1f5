"""Causal self-attention as a mixer, full or sliding-window (Mistral's: each token sees the last
`window` tokens, itself included), with rotary positions or none.

History state after n_past tokens: the keys and values the next token attends to, 2·d_model per
token of the last min(n_past, window − 1) (all n_past for full attention). Step mode keeps exactly
that cache, trimmed to window − 1 tokens, so a windowed model's state stops growing. A stack of
n_layer windowed layers sees n_layer·(window − 1) + 1 tokens back (its receptive field).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from l2m.checks import UserError
from l2m.models.config import MixerConfig, ModelConfig

POSITIONAL = ("rotary", "none")  # as a mixer; GPT adds "learned" (positions added before the first block)


def check_attention(config: ModelConfig) -> None:
    """The fields every attention config shares: heads that divide d_model, a window >= 1 or None,
    a dropout in [0, 1)."""
    if config.d_model % config.n_head:
        divisors = [h for h in range(1, config.d_model + 1) if config.d_model % h == 0]
        raise UserError(
            f"d_model={config.d_model} is not divisible by n_head={config.n_head}: choose n_head among {divisors}"
        )
    window = config.window
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise UserError(f"model window must be an int >= 1 (the tokens each token attends to, itself included) "
                        f"or null for full attention, got {window!r}")
    if not 0.0 <= config.dropout < 1.0:
        raise UserError(f"model dropout must be in [0, 1), got {config.dropout!r}")
    if config.positional == "rotary" and (config.d_model // config.n_head) % 2:
        raise UserError(f"rotary positions need an even head dim d_model / n_head, got {config.d_model // config.n_head}; "
                        "change n_head or set model.positional")


@dataclass(kw_only=True)
class AttentionConfig(MixerConfig):
    """Attention as one mixer of a stack (hybrids); GPTConfig is the transformer with its MLPs."""

    positive_ints: ClassVar[tuple[str, ...]] = ("n_head",)

    arch: str = "attention"
    n_head: int
    window: int | None = None  # sliding window: tokens each token attends to, itself included; null = full
    positional: str = "rotary"  # rotary | none
    bias: bool = False  # in its two linear layers
    dropout: float = 0.0

    @property
    def family(self) -> str:
        return "attention" if self.window is None else "swa"

    def _check(self) -> None:
        super()._check()
        self.choice("positional", POSITIONAL)
        check_attention(self)


class AttentionState(NamedTuple):
    """The KV cache, each (B, n_head, cached, head_dim), and the tokens read so far (rotary positions)."""

    k: Tensor
    v: Tensor
    position: int


class Rotary(nn.Module):
    """Rotary position embedding (GPT-NeoX convention: rotate the two halves of each head)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", base ** -(torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, x: Tensor, start: int) -> Tensor:
        """x (B, H, T, hd) at positions start..start+T-1."""
        pos = torch.arange(start, start + x.shape[2], device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)  # (T, hd/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    """(B, T, d_model) -> (B, T, d_model). Takes a GPTConfig or an AttentionConfig."""

    def __init__(self, config: ModelConfig, layer_idx: int | None = None):
        super().__init__()
        d_model, bias = config.d_model, config.bias
        self.n_head, self.head_dim, self.dropout = config.n_head, d_model // config.n_head, config.dropout
        self.window = config.window
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotary = Rotary(self.head_dim) if config.positional == "rotary" else None

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, window={self.window}"

    @property
    def receptive_field(self) -> int | None:
        """Tokens one layer sees, itself included (None: all)."""
        return self.window

    def forward(self, x: Tensor, state: AttentionState | None = None) -> tuple[Tensor, AttentionState | None]:
        """x (B, T, C); with a state (the cache of earlier tokens), the state after x."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hd)
        start = 0 if state is None else state.position
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        if state is not None:
            k = torch.cat([state.k, k], dim=2)  # (B, nh, cached + T, hd)
            v = torch.cat([state.v, v], dim=2)  # (B, nh, cached + T, hd)
        y = self._attend(q, k, v)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        if state is not None:
            keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
            state = AttentionState(k[:, :, k.shape[2] - keep:], v[:, :, k.shape[2] - keep:], start + T)
        return self.resid_dropout(self.c_proj(y)), state

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Query i (the i-th of the T new tokens) attends to key j of the S = cached + T keys where
        0 <= (i + cached) - j < window."""
        T, S = q.shape[2], k.shape[2]
        cached = S - T
        dropout = self.dropout if self.training else 0.0
        if self.window is None and cached == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        if cached == 0 and T > 2 * self.window:
            return self._attend_in_blocks(q, k, v, dropout)
        lag = torch.arange(T, device=q.device)[:, None] + cached - torch.arange(S, device=q.device)  # (T, S)
        allowed = lag >= 0 if self.window is None else (lag >= 0) & (lag < self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)

    def _attend_in_blocks(self, q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
        """The sliding window over blocks of W = window queries, each reading its own block's keys and
        the previous block's: 2W keys per query instead of T (Longformer's banded form)."""
        B, nh, T, hd = q.shape
        W = self.window
        n = -(-T // W)  # blocks
        pad = (0, 0, 0, n * W - T)
        q, k, v = (F.pad(t, pad).view(B, nh, n, W, hd) for t in (q, k, v))  # (B, nh, n, W, hd)
        k, v = (torch.cat([F.pad(t, (0, 0, 0, 0, 1, 0))[:, :, :-1], t], dim=3) for t in (k, v))  # (B, nh, n, 2W, hd)
        lag = torch.arange(W, device=q.device)[:, None] + W - torch.arange(2 * W, device=q.device)  # (W, 2W)
        key_position = (torch.arange(n, device=q.device)[:, None] - 1) * W + torch.arange(2 * W, device=q.device)  # (n, 2W)
        allowed = (lag >= 0) & (lag < W) & (key_position >= 0)[:, None, :]  # (n, W, 2W)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)  # (B, nh, n, W, hd)
        return y.reshape(B, nh, n * W, hd)[:, :, :T]

    def init_state(self, batch: int, device=None, dtype=None) -> AttentionState:
        """An empty cache: k and v each (B, n_head, 0, head_dim)."""
        device = device if device is not None else self.c_attn.weight.device
        dtype = dtype if dtype is not None else self.c_attn.weight.dtype
        empty = torch.zeros(batch, self.n_head, 0, self.head_dim, device=device, dtype=dtype)
        return AttentionState(empty, empty, 0)

    def step(self, x: Tensor, state: AttentionState) -> tuple[Tensor, AttentionState]:
        """One token x (B, C) -> (B, C) and the cache after it."""
        y, state = self(x[:, None], state)
        return y[:, 0], state

    def state_size(self, n_past: int) -> dict[str, int]:
        """The KV cache after n_past tokens: k and v of the last min(n_past, window - 1) tokens."""
        cached = n_past if self.window is None else min(n_past, self.window - 1)
        return {"kv": 2 * self.n_head * self.head_dim * cached}

    def extra_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token besides its linear layers: Q Kᵀ and the weighted sum of V over the
        keys a token sees, as dense attention computes them (causal kernels skip about half)."""
        seen = seq_len if self.window is None else min(seq_len, self.window)
        return 4 * seen * self.n_head * self.head_dim
