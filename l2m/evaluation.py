"""Position-wise evaluation on a held-out set: NLL_i and KL_i per position, averaged over sequences.

The losses are the output adapter's (l2m.models.adapters): the exact KL where the data's
conditional comes with the batch (Gaussian task), else KL_i = NLL_i - H_p(W_i | W_<i) where the
data knows its NLL floor, else (natural text) NLL only. Numbers are nats per token: summed over
the `copies` dimensions of a Gaussian token, averaged over sequences.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from l2m.checks import UserError


@dataclass
class Positionwise:
    """Position-wise metrics over a held-out set; each tensor is (L,) float64, nats per token."""

    nll: Tensor
    kl: Tensor | None  # None for text, where the data's conditional is unknown
    floor: Tensor | None  # exact H_p(W_i | W_<i) where known
    num_sequences: int
    # standard error of avg_kl / avg_nll over the held-out sequences (each sequence's average)
    avg_stderr: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)  # other curves of the adapter, e.g. "accuracy"

    def summary(self) -> dict[str, float | int | None]:
        """Averages over all positions (with their SE over sequences) and over the first and last
        quarter of positions."""
        q = max(1, len(self.nll) // 4)
        out: dict[str, float | int | None] = {"num_sequences": self.num_sequences}
        for name, curve in (("kl", self.kl), ("nll", self.nll), ("nll_floor", self.floor)):
            out[f"avg_{name}"] = None if curve is None else float(curve.mean())
            out[f"{name}_first_quarter"] = None if curve is None else float(curve[:q].mean())
            out[f"{name}_last_quarter"] = None if curve is None else float(curve[-q:].mean())
        for name in ("kl", "nll"):
            out[f"avg_{name}_se"] = self.avg_stderr.get(name)
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
    squares: dict[str, Tensor] = {}  # Σ over sequences of (the sequence's average)²
    count = None
    for batch in batches:
        losses = model.losses(batch)
        del losses["loss"]
        for name, value in losses.items():  # (B, L) each
            sums[name] = sums.get(name, 0) + value.double().sum(0)
            squares[name] = squares.get(name, 0) + (value.double().mean(1) ** 2).sum()
        n = next(iter(losses.values())).shape[0]
        count = (count or 0) + n
    model.train(was_training)

    device = next(model.parameters()).device
    if count is None:
        raise UserError("evaluate_positionwise got no batches; check the held-out set size (data.val_size)")
    names = sorted(sums)
    rows = [sums[name] for name in names] + [torch.full_like(sums[names[0]], count)]
    rows += [torch.full_like(sums[names[0]], float(squares[name])) for name in names]
    packed = torch.stack(rows)
    if dist.is_available() and dist.is_initialized():
        packed = packed.to(device)
        dist.all_reduce(packed)
    packed = packed.cpu()
    total = int(packed[len(names), 0].item())
    means = dict(zip(names, packed[: len(names)] / total))
    stderr = {}
    for name, square_sum in zip(names, packed[len(names) + 1 :, 0]):
        variance = (float(square_sum) - total * float(means[name].mean()) ** 2) / max(total - 1, 1)
        stderr[name] = math.sqrt(max(variance, 0.0) / total)
    floor = None if floor is None else floor.detach().double().cpu()
    kl = means.get("kl")
    if kl is None and floor is not None:  # exact in expectation: NLL_i = KL_i + H_p(W_i | W_<i)
        kl = means["nll"] - floor
        stderr["kl"] = stderr["nll"]  # each sequence's KL average is its NLL average minus a constant
    extra = {name: curve for name, curve in means.items() if name not in ("nll", "kl")}
    return Positionwise(nll=means["nll"], kl=kl, floor=floor, num_sequences=total, avg_stderr=stderr, extra=extra)


def splits_grid(seq_len: int, count: int = 24) -> list[int]:
    """About `count` log-spaced splits in 1..L−1, L/2 among them: where tail bounds are computed."""
    grid = {round(float(x)) for x in torch.logspace(0, math.log10(seq_len - 1), count, dtype=torch.float64)}
    return sorted(grid | {seq_len // 2} - {0})


@dataclass
class StateAnalysis:
    """A model's position-wise KL held against the exact references of its data (spec §6)."""

    references: dict[str, Tensor]  # e.g. "kl_nocontext", "kl_window4": (L,) exact KL of window-k predictors
    tail_kl: Tensor  # (L,): Σ_{j>i} KL_j of the model, the KL of Y = z_{i+1..L} given the split at i
    tail_bound: Tensor  # (L,): the linear-state bound at split i for the model's state there; nan off the grid
    summary: dict


def analyse_state(
    metrics: Positionwise,
    model: torch.nn.Module,
    data,
    windows: Iterable[int] = (1, 4, 16),
    tolerance: float = 0.1,
    context_fraction: float = 0.125,
    max_window: int = 512,
    bound_splits: int = 24,
) -> StateAnalysis | None:
    """Is this model limited by its history state or by its training? None where the data has no
    exact references (`data.window_kl(0)` is None, e.g. natural text).

    effective_context: the smallest window k (searched up to `max_window`) whose exact predictor's
    average KL is at most the model's ("as good as a predictor that sees k tokens"; None: more).
    window_avg_kl: {"k": average KL of the exact window-k predictor} for k = 0 and `windows`.
    bound_half / tail_kl_half: the linear-state bound for the model's state at the data's
    `history_split` (its SSM state or KV cache: `SequenceModel.bound_state_size`) and the model's KL
    summed over the positions after it. state_limited: tail KL within `tolerance` (relative) of the
    bound. training_limited: above it by more, while the effective context is at most
    `context_fraction`·split. Both None where the data knows no bound (`state_bound` is None).
    """
    nocontext = data.window_kl(0)
    if nocontext is None or metrics.kl is None:
        return None
    seq_len = len(metrics.kl)
    kl = metrics.kl
    references = {"kl_nocontext": nocontext}
    window_avg_kl = {"0": float(nocontext.mean())}
    for k in sorted(set(windows)):
        if 1 <= k < seq_len:
            references[f"kl_window{k}"] = data.window_kl(k)
            window_avg_kl[str(k)] = float(references[f"kl_window{k}"].mean())
    model_avg = float(kl.mean())
    searched = min(max_window, seq_len - 1)
    data.window_kl(searched)  # every smaller window comes with it
    effective = next((k for k in range(searched + 1) if float(data.window_kl(k).mean()) <= model_avg), None)

    tail_kl = kl.flip(0).cumsum(0).flip(0).roll(-1)  # tail_kl[i-1] = Σ_{j>i} KL_j (1-based i)
    tail_kl[-1] = 0.0
    half = data.history_split
    tail_bound = torch.full((seq_len,), float("nan"), dtype=torch.float64)
    for split in sorted(set(splits_grid(seq_len, bound_splits)) | {half}):
        bound = data.state_bound(model.bound_state_size(split), split)
        tail_bound[split - 1] = float("nan") if bound is None else bound
    bound_half, tail_half = float(tail_bound[half - 1]), float(tail_kl[half - 1])
    verdicts = {"state_limited": None, "training_limited": None}
    if not math.isnan(bound_half):
        above = tail_half > (1 + tolerance) * bound_half + 1e-9
        verdicts = {
            "state_limited": bool(abs(tail_half - bound_half) <= tolerance * bound_half + 1e-9),
            "training_limited": bool(above and effective is not None and effective <= context_fraction * half),
        }
    summary = {
        "effective_context": effective,
        "effective_context_searched_up_to": searched,
        "window_avg_kl": window_avg_kl,
        "dim_z_half_bound": int(model.bound_state_size(half)),
        "bound_half": None if math.isnan(bound_half) else bound_half,
        "tail_kl_half": tail_half,
        **verdicts,
        "verdict_tolerance": tolerance,
    }
    return StateAnalysis(references, tail_kl, tail_bound, summary)


def convergence(history: list[tuple[int, float]], last_fraction: float = 0.2) -> dict:
    """Whether the held-out average was still falling over the last `last_fraction` of the steps:
    the least-squares slope (per 1,000 steps) of the periodic evaluations there, and its SE.
    None where fewer than three evaluations fall in that stretch."""
    if not history:
        return {"slope_last20": None, "slope_last20_se": None, "still_falling": None}
    final = max(step for step, _ in history)
    points = [(step, value) for step, value in history if step >= (1 - last_fraction) * final]
    if len(points) < 3:
        return {"slope_last20": None, "slope_last20_se": None, "still_falling": None}
    steps = torch.tensor([p[0] for p in points], dtype=torch.float64) / 1000
    values = torch.tensor([p[1] for p in points], dtype=torch.float64)
    centred = steps - steps.mean()
    slope = float((centred @ (values - values.mean())) / (centred @ centred))
    residual = values - values.mean() - slope * centred
    se = math.sqrt(float(residual @ residual) / (len(points) - 2) / float(centred @ centred))
    return {"slope_last20": slope, "slope_last20_se": se, "still_falling": bool(slope < 0 and -slope > 2 * se)}
