"""Input/output adapters between tokens and the d_model residual stream (spec §3).

discrete: token ids -> embedding; LM head -> logits (weights tied to the embedding by default).
gaussian: 2-layer MLP (dim -> d_model) in; 2-layer MLP out -> per-dimension mean and std,
          std = softplus(.) + min_std > 0.
Adapters accept any leading shape: (B, T, ...) for the full forward, (B, ...) for a step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

IO_KINDS = ("discrete", "gaussian")


class DiscreteInput(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, padded_vocab_size: int | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(padded_vocab_size or vocab_size, d_model)
        nn.init.normal_(self.wte.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.is_floating_point():
            raise ValueError(f"discrete models take int64 token ids, got dtype {ids.dtype}")
        return self.wte(ids)


class DiscreteOutput(nn.Module):
    """LM head; logits of padding rows (vocabulary padded for speed, as in mamba-ssm) are dropped."""

    def __init__(self, vocab_size: int, d_model: int, tie_to: nn.Embedding | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        n_rows = tie_to.num_embeddings if tie_to is not None else vocab_size
        self.lm_head = nn.Linear(d_model, n_rows, bias=False)
        if tie_to is not None:
            self.lm_head.weight = tie_to.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    def forward(self, h: Tensor) -> Tensor:
        return self.lm_head(h)[..., : self.vocab_size]


class GaussianInput(nn.Module):
    def __init__(self, dim: int, d_model: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim or not x.is_floating_point():
            raise ValueError(f"gaussian models take float tokens (..., dim={self.dim}), got {tuple(x.shape)} {x.dtype}")
        return self.mlp(x)


class GaussianOutput(nn.Module):
    def __init__(self, dim: int, d_model: int, min_std: float = 1e-3):
        super().__init__()
        self.dim, self.min_std = dim, min_std
        self.mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 2 * dim))
        # start at the data's marginal: mean 0, std 1 (unit-variance tokens)
        with torch.no_grad():
            self.mlp[-1].bias[:dim].zero_()
            self.mlp[-1].bias[dim:].fill_(math.log(math.expm1(1.0 - min_std)))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw_std = self.mlp(h).chunk(2, dim=-1)
        return mean, F.softplus(raw_std) + self.min_std


def build_io(io: Mapping, d_model: int, tie_embeddings: bool = True, pad_vocab_size_multiple: int = 1):
    """(input adapter, output adapter) for an io config such as a datamodule's ``io_config()``."""
    kind = io.get("kind")
    if kind == "discrete":
        vocab = _positive_int(io, "vocab_size")
        padded = math.ceil(vocab / pad_vocab_size_multiple) * pad_vocab_size_multiple
        inp = DiscreteInput(vocab, d_model, padded)
        return inp, DiscreteOutput(vocab, d_model, tie_to=inp.wte if tie_embeddings else None)
    if kind == "gaussian":
        dim = _positive_int(io, "dim")
        min_std = float(io.get("min_std", 1e-3))
        if not min_std > 0:
            raise ValueError(f"io min_std must be > 0 (keeps the predicted std positive), got {min_std}")
        return GaussianInput(dim, d_model), GaussianOutput(dim, d_model, min_std)
    raise ValueError(
        f"io kind must be one of {IO_KINDS} "
        f"({{'kind': 'discrete', 'vocab_size': V}} or {{'kind': 'gaussian', 'dim': D}}), got {kind!r}"
    )


def _positive_int(io: Mapping, key: str) -> int:
    value = io.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"io {key!r} must be a positive int for kind {io.get('kind')!r}, got {value!r}")
    return value
