"""GPT-2 backbone: pre-LayerNorm transformer blocks (nanoGPT layout and initialisation).

The backbone maps embedded tokens (B, T, d_model) to final-normed features; token embedding and
LM head live in the io adapters. Positions are learned (GPT-2, at most ``max_seq_len``) or
rotary. Step mode carries a KV cache: per layer (k, v), each (B, n_head, t, head_dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from l2m.checks import UserError
from l2m.models.config import ModelConfig, call_block

POSITIONAL = ("learned", "rotary")
ACTIVATIONS = ("gelu", "gelu_tanh")  # exact GELU, or its tanh approximation (GPT-2's "gelu_new")
KVCache = tuple[Tensor, Tensor]


@dataclass(kw_only=True)
class GPTConfig(ModelConfig):
    positive_ints: ClassVar[tuple[str, ...]] = ("n_head", "max_seq_len")

    arch: str = "gpt"
    n_head: int
    max_seq_len: int = 1024  # learned positions; build_model sizes it to the run's context length
    positional: str = "learned"  # learned | rotary
    dropout: float = 0.0
    bias: bool = True  # in the linear layers and LayerNorms
    activation: str = "gelu"  # gelu (exact) | gelu_tanh (what GPT-2's weights were trained with)
    init_std: float = 0.02  # std of the linear weights at init (GPT-2's); tiny models learn recall sooner with ~0.08

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def _check(self) -> None:
        super()._check()
        if self.d_model % self.n_head:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            raise UserError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}: choose n_head among {divisors}"
            )
        self.choice("positional", POSITIONAL)
        self.choice("activation", ACTIVATIONS)
        self.positive_number("init_std", "0.02: GPT-2's init")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model dropout must be in [0, 1), got {self.dropout!r}")


class Rotary(nn.Module):
    """Rotary position embedding (GPT-NeoX convention: rotate the two halves of each head)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise UserError(f"rotary positions need an even head_dim (d_model / n_head), got {head_dim}")
        self.register_buffer("inv_freq", base ** -(torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, x: Tensor, start: int) -> Tensor:
        """x (B, H, T, hd) at positions start..start+T-1."""
        pos = torch.arange(start, start + x.shape[2], device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)  # (T, hd/2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d_model, bias = config.d_model, config.bias
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rotary = Rotary(config.head_dim) if config.positional == "rotary" else None

    def forward(self, x: Tensor, past: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """x (B, T, C). Without ``past``: causal attention over x. With ``past`` (a KV cache of
        t earlier tokens): one new token (T == 1) attending to the cache and itself."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hd)
        start = 0 if past is None else past[0].shape[2]
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, nh, t+1, hd)
            v = torch.cat([past[1], v], dim=2)  # (B, nh, t+1, hd)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=past is None)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, past: KVCache | None = None) -> tuple[Tensor, KVCache]:
        a, kv = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT(nn.Module):
    """The backbone of a GPTConfig: (B, T, d_model) embedded tokens -> (B, T, d_model)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.n_layer, self.d_model, self.n_head = config.n_layer, config.d_model, config.n_head
        self.max_seq_len = config.max_seq_len
        self.wpe = nn.Embedding(config.max_seq_len, config.d_model) if config.positional == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.apply(partial(_init_weights, linear_std=config.init_std, embedding_std=config.embedding_std))
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by 1/sqrt(2 n_layer)
                nn.init.normal_(p, std=config.init_std / math.sqrt(2 * config.n_layer))

    @property
    def max_positions(self) -> int | None:
        """The longest sequence it reads: max_seq_len with learned positions, unbounded with rotary."""
        return self.max_seq_len if self.wpe is not None else None

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, d_model) embedded tokens -> (B, T, d_model)."""
        x = self.drop(self._add_positions(x, 0))
        for block in self.h:
            x, _ = call_block(block, x, checkpointing=self.config.checkpointing)
        return self.ln_f(x)

    def extra_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token besides its linear layers: Q Kᵀ and the weighted sum of V over the
        whole context, as dense attention computes them (causal kernels skip about half)."""
        return self.n_layer * 4 * seq_len * self.d_model

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
            raise UserError(
                f"sequence of {end} tokens exceeds max_seq_len={self.max_seq_len} of the learned positions; "
                "build the model with a larger max_seq_len or use positional='rotary'"
            )
        return x + self.wpe(torch.arange(start, end, device=x.device))


def _init_weights(module: nn.Module, linear_std: float, embedding_std: float) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=linear_std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=embedding_std)
