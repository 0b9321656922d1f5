"""Position-wise evaluation on a held-out set: NLL_i and KL_i per position, averaged over sequences.

The losses are the output adapter's (l2m.models.adapters): the exact KL where the data's
conditional comes with the batch (Gaussian task), else KL_i = NLL_i - H_p(W_i | W_<i) where the
data knows its NLL floor, else (natural text) NLL only. Numbers are nats per token: summed over
the `copies` dimensions of a Gaussian token, averaged over sequences.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


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
    floor: Tensor | None = None,
) -> Positionwise:
    """Average per-position KL and NLL of `model` (a SequenceModel) over `batches` (already on its
    device); `floor` is the data's exact NLL floor, where known.

    Under torch.distributed every rank passes its own share of the held-out set; sums and counts
    are all-reduced, so every rank returns the metrics of the whole set.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    count = None
    for batch in batches:
        losses = model.losses(batch)
        del losses["loss"]
        for name, value in losses.items():  # (B, L) each
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
    floor = None if floor is None else floor.detach().double().cpu()
    kl = means.get("kl")
    if kl is None and floor is not None:  # exact in expectation: NLL_i = KL_i + H_p(W_i | W_<i)
        kl = means["nll"] - floor
    return Positionwise(nll=means["nll"], kl=kl, floor=floor, num_sequences=total)
