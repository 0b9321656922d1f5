"""GPT-2 backbone: pre-LayerNorm transformer blocks (nanoGPT layout and initialisation).

The backbone maps embedded tokens (B, T, d_model) to final-normed features; token embedding and
LM head live in the io adapters. Positions are learned (GPT-2, at most ``max_seq_len``) or
rotary. Step mode carries a KV cache: per layer (k, v), each (B, n_head, t, head_dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

POSITIONAL = ("learned", "rotary")
KVCache = tuple[Tensor, Tensor]


class Rotary(nn.Module):
    """Rotary position embedding (GPT-NeoX convention: rotate the two halves of each head)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim (d_model / n_head), got {head_dim}")
        self.register_buffer("inv_freq", base ** -(torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, x: Tensor, start: int) -> Tensor:
        """x (B, H, T, hd) at positions start..start+T-1."""
        pos = torch.arange(start, start + x.shape[2], device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)  # (T, hd/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float, bias: bool, rotary: bool):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = Rotary(d_model // n_head) if rotary else None

    def forward(self, x: Tensor, past: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """x (B, T, C). Without ``past``: causal attention over x. With ``past`` (a KV cache of
        earlier tokens): one new token (T == 1) attending to the cache and itself."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        start = 0 if past is None else past[0].shape[2]
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=past is None
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.c_proj = nn.Linear(4 * d_model, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float, bias: bool, rotary: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_head, dropout, bias, rotary)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = MLP(d_model, dropout, bias)

    def forward(self, x: Tensor, past: KVCache | None = None) -> tuple[Tensor, KVCache]:
        a, kv = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT(nn.Module):
    def __init__(
        self,
        n_layer: int,
        d_model: int,
        n_head: int,
        max_seq_len: int = 1024,
        positional: str = "learned",
        dropout: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        self.n_layer, self.d_model, self.n_head, self.max_seq_len = n_layer, d_model, n_head, max_seq_len
        self.wpe = nn.Embedding(max_seq_len, d_model) if positional == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(d_model, n_head, dropout, bias, positional == "rotary") for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.apply(_init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by 1/sqrt(2 n_layer)
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, d_model) embedded tokens -> (B, T, d_model)."""
        x = self.drop(self._add_positions(x, 0))
        for block in self.h:
            x, _ = block(x)
        return self.ln_f(x)

    def init_state(self, batch: int, device=None, dtype=None) -> tuple[KVCache, ...]:
        """Empty KV cache: per layer (k, v), each (B, n_head, 0, head_dim)."""
        device = device if device is not None else self.ln_f.weight.device
        dtype = dtype if dtype is not None else self.ln_f.weight.dtype
        empty = torch.zeros(batch, self.n_head, 0, self.d_model // self.n_head, device=device, dtype=dtype)
        return tuple((empty, empty) for _ in self.h)

    def step(self, x: Tensor, state: tuple[KVCache, ...]) -> tuple[Tensor, tuple[KVCache, ...]]:
        """One token x (B, d_model) at position len(cache) -> (B, d_model), grown cache."""
        x = self._add_positions(x[:, None], state[0][0].shape[2])
        new_state = []
        for block, past in zip(self.h, state):
            x, kv = block(x, past)
            new_state.append(kv)
        return self.ln_f(x)[:, 0], tuple(new_state)

    def state_breakdown(self, n_past: int) -> dict[str, int]:
        """KV cache after n_past tokens: 2 (k and v) * n_layer * n_head * head_dim per token."""
        return {"kv": 2 * self.n_layer * self.d_model * n_past}

    def _add_positions(self, x: Tensor, start: int) -> Tensor:
        if self.wpe is None:
            return x  # rotary: positions enter in attention
        end = start + x.shape[1]
        if end > self.max_seq_len:
            raise ValueError(
                f"sequence of {end} tokens exceeds max_seq_len={self.max_seq_len} of the learned positions; "
                "build the model with a larger max_seq_len or use positional='rotary'"
            )
        return x + self.wpe(torch.arange(start, end, device=x.device))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
