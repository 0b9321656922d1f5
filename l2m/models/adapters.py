"""Input/output adapters between tokens and the d_model residual stream (spec §3), and the loss
each kind of token is trained on. A new kind of token (an io `kind`) is one pair of adapters here
and one entry in `IO_KINDS`.

discrete: token ids -> embedding; LM head -> logits (weights tied to the embedding by default).
          Loss: next-token NLL.
gaussian: 2-layer MLP (dim -> d_model) in; 2-layer MLP out -> per-dimension mean and std,
          std = softplus(.) + min_std > 0. Loss: the exact KL to the data's conditional
          N(batch["mean"], batch["std"]²), averaged over positions and dimensions (spec §4).
Adapters accept any leading shape: (B, T, ...) for the full forward, (B, ...) for a step.

The batch contract: an input adapter reads `batch[batch_key]`, (B, L+1, ...) with BOS first;
the model reads tokens 0..L-1 and predicts tokens 1..L. `losses(prediction, batch)` of the
output adapter returns "loss" (the scalar trained on) and curves (B, L) in nats per token: "kl"
where the data's conditional is known, and "nll"; the first curve is the headline (progress bar).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from l2m.checks import UserError, check_int
from l2m.models.config import ModelConfig

log = logging.getLogger(__name__)

_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


def gaussian_kl(mean_q: Tensor, std_q: Tensor, mean_p: Tensor, std_p: Tensor) -> Tensor:
    """KL(p || q) between univariate Gaussians, elementwise (shapes broadcast)."""
    return torch.log(std_q / std_p) + (std_p**2 + (mean_q - mean_p) ** 2) / (2 * std_q**2) - 0.5


def gaussian_entropy(std: Tensor) -> Tensor:
    """Differential entropy of N(., std²), elementwise."""
    return _HALF_LOG_2PI_E + torch.log(std)


class DiscreteInput(nn.Module):
    batch_key = "input_ids"  # (B, L+1) int64

    def __init__(self, vocab_size: int, d_model: int, padded_vocab_size: int | None = None, init_std: float = 0.02):
        super().__init__()
        self.vocab_size = vocab_size
        self.wte = nn.Embedding(padded_vocab_size or vocab_size, d_model)
        nn.init.normal_(self.wte.weight, std=init_std)

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

    def losses(self, logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """logits (B, L, V) of tokens 1..L of batch["input_ids"] (B, L+1): NLL and top-1 accuracy
        (B, L); loss the mean NLL, over the positions of batch["loss_mask"] (B, L) where given."""
        targets = batch["input_ids"][:, 1:]  # (B, L)
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, L)
        accuracy = (logits.argmax(-1) == targets).float()  # (B, L)
        mask = batch.get("loss_mask")
        loss = nll.mean() if mask is None else (nll * mask).sum() / mask.sum()
        return {"loss": loss, "nll": nll, "accuracy": accuracy}


class GaussianInput(nn.Module):
    batch_key = "x"  # (B, L+1, dim) float

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

    def losses(self, prediction: tuple[Tensor, Tensor], batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """(mean, std) (B, L, D) against the exact conditional batch["mean"] (B, L, D), batch["std"]
        ((1 or B), L, D). loss: KL per position and dimension; kl and nll per token (summed over D)."""
        mean_q, std_q = prediction
        kl = gaussian_kl(mean_q.float(), std_q.float(), batch["mean"], batch["std"])  # (B, L, D)
        kl_per_token = kl.sum(-1)  # (B, L)
        nll = kl_per_token + gaussian_entropy(batch["std"]).sum(-1)  # (B, L): E_p[-log q] = KL + H_p
        return {"loss": kl.mean(), "kl": kl_per_token, "nll": nll}


def _discrete(io: Mapping, config: ModelConfig):
    vocab = check_int("io 'vocab_size' (for kind 'discrete')", io.get("vocab_size"))
    padded = math.ceil(vocab / config.pad_vocab_size_multiple) * config.pad_vocab_size_multiple
    inp = DiscreteInput(vocab, config.d_model, padded, config.embedding_std)
    return inp, DiscreteOutput(vocab, config.d_model, tie_to=inp.wte if config.tie_embeddings else None)


def _gaussian(io: Mapping, config: ModelConfig):
    dim = check_int("io 'dim' (for kind 'gaussian')", io.get("dim"))
    min_std = float(io.get("min_std", 1e-3))
    if not min_std > 0:
        raise UserError(f"io min_std must be > 0 (keeps the predicted std positive), got {min_std}")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for name in ModelConfig.discrete_only:
        if getattr(config, name) != defaults[name]:
            log.warning(f"model.{name}={getattr(config, name)} has no effect on Gaussian tokens (vectors: no "
                        "embedding matrix to tie or pad); it applies to discrete tokens (text, recall)")
    return GaussianInput(dim, config.d_model), GaussianOutput(dim, config.d_model, min_std)


IO_KINDS: dict[str, Callable] = {"discrete": _discrete, "gaussian": _gaussian}


def build_io(io: Mapping, config: ModelConfig):
    """(input adapter, output adapter) between the residual stream of `config` (its d_model, and
    for discrete tokens its embedding settings) and an io config such as a datamodule's
    ``io_config()``: {"kind": "discrete", "vocab_size": V} or {"kind": "gaussian", "dim": D}."""
    kind = io.get("kind") if isinstance(io, Mapping) else None
    if kind not in IO_KINDS:
        raise UserError(
            f"io must be a mapping with 'kind' in {tuple(IO_KINDS)} "
            f"({{'kind': 'discrete', 'vocab_size': V}} or {{'kind': 'gaussian', 'dim': D}}), got {io!r}"
        )
    return IO_KINDS[kind](io, config)
