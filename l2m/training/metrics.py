"""Exact per-position losses of the two L²M tasks and the position-wise evaluation loop.

Gaussian task: the data's conditional p(z_i | z_<i) = N(mean_p, std_p²) is known exactly, so the
loss is the exact KL(p || q) per position and dimension (spec §4), and the NLL is its expectation
over z_i, KL + H_p. Text task: the NLL of the next token.

Position-wise numbers are nats per token: summed over the `copies` dimensions of a Gaussian
token, averaged over sequences.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

TASKS = ("gaussian", "text")

_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


def gaussian_kl(mean_q: Tensor, std_q: Tensor, mean_p: Tensor, std_p: Tensor) -> Tensor:
    """KL(p || q) between univariate Gaussians, elementwise (shapes broadcast)."""
    return torch.log(std_q / std_p) + (std_p**2 + (mean_q - mean_p) ** 2) / (2 * std_q**2) - 0.5


def gaussian_entropy(std: Tensor) -> Tensor:
    """Differential entropy of N(., std²), elementwise."""
    return _HALF_LOG_2PI_E + torch.log(std)


def token_losses(model: torch.nn.Module, batch: Mapping[str, Tensor], task: str) -> dict[str, Tensor]:
    """Per-sequence, per-position losses of one batch, in float32.

    Returns {"kl": (B, L, D), "nll": (B, L)} for the Gaussian task (KL per dimension, NLL per token)
    and {"nll": (B, L)} for text.
    """
    if task == "gaussian":
        x = batch["x"]  # (B, L+1, D), x[:, 0] is the BOS token
        mean_q, std_q = model(x[:, :-1])  # (B, L, D) each
        kl = gaussian_kl(mean_q.float(), std_q.float(), batch["mean"], batch["std"])
        nll = kl.sum(-1) + gaussian_entropy(batch["std"]).sum(-1)  # std may be (1, L, D): broadcasts
        return {"kl": kl, "nll": nll}
    if task == "text":
        ids = batch["input_ids"]  # (B, L+1)
        logits = model(ids[:, :-1])  # (B, L, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
        return {"nll": nll}
    raise ValueError(f"task={task!r} is not supported; expected one of {TASKS}")


@dataclass
class Positionwise:
    """Position-wise metrics over a held-out set; each tensor is (L,) float64, nats per token."""

    nll: Tensor
    kl: Tensor | None  # None for text, where the data's conditional is unknown
    floor: Tensor | None  # exact H_p(W_i | W_<i) where known
    num_sequences: int

    def summary(self) -> dict[str, float | int | None]:
        """Averages over all positions and over the first and last quarter of positions."""
        q = max(1, len(self.nll) // 4)
        out: dict[str, float | int | None] = {"num_sequences": self.num_sequences}
        for name, curve in (("kl", self.kl), ("nll", self.nll), ("nll_floor", self.floor)):
            out[f"avg_{name}"] = None if curve is None else float(curve.mean())
            out[f"{name}_first_quarter"] = None if curve is None else float(curve[:q].mean())
            out[f"{name}_last_quarter"] = None if curve is None else float(curve[-q:].mean())
        return out


@torch.no_grad()
def evaluate_positionwise(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    task: str,
    floor: Tensor | None = None,
) -> Positionwise:
    """Average per-position KL and NLL of `model` over `batches` (already on the model's device).

    Under torch.distributed every rank passes its own share of the held-out set; sums and counts
    are all-reduced, so every rank returns the metrics of the whole set.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    count = None
    for batch in batches:
        losses = token_losses(model, batch, task)
        if "kl" in losses:
            losses["kl"] = losses["kl"].sum(-1)  # (B, L): nats per token, summed over copies
        for name, value in losses.items():
            sums[name] = sums.get(name, 0) + value.double().sum(0)
        n = next(iter(losses.values())).shape[0]
        count = (count or 0) + n
    model.train(was_training)

    device = next(model.parameters()).device
    if count is None:
        raise ValueError("evaluate_positionwise got no batches; check the held-out set size (data.val_size)")
    names = sorted(sums)
    packed = torch.stack([sums[name] for name in names] + [torch.full_like(sums[names[0]], count)])
    if dist.is_available() and dist.is_initialized():
        packed = packed.to(device)
        dist.all_reduce(packed)
    packed = packed.cpu()
    total = int(packed[-1, 0].item())
    means = dict(zip(names, packed[:-1] / total))
    return Positionwise(
        nll=means["nll"],
        kl=means.get("kl"),
        floor=None if floor is None else floor.detach().double().cpu(),
        num_sequences=total,
    )
