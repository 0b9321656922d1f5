"""Position-wise evaluation on a held-out set: NLL_i and KL_i per position, averaged over sequences.

The losses are the output adapter's (l2m.models.adapters): the exact KL where the data's
conditional comes with the batch (Gaussian task), else KL_i = NLL_i - H_p(W_i | W_<i) where the
data knows its NLL floor, else (natural text) NLL only. Numbers are nats per token: summed over
the `copies` dimensions of a Gaussian token, averaged over sequences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from l2m.checks import UserError


@dataclass
class HeldOut:
    """The held-out batches an evaluation ran on (this DDP rank's share, on the model's device) and the
    model's KL on each, (B, L) float64: what a reference is paired against, sequence by sequence."""

    batches: list[Mapping[str, Tensor]]
    kl: list[Tensor]


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
    heldout: HeldOut | None = None  # kept where asked (keep_heldout), for paired references

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
    keep_heldout: bool = False,
) -> Positionwise:
    """Average per-position KL and NLL of `model` (a SequenceModel) over `batches` (already on its
    device); `floor` is the data's exact NLL floor, where known. keep_heldout: keep the batches and
    the model's KL on each (`Positionwise.heldout`), where the adapter gives a KL.

    Under torch.distributed every rank passes its own share of the held-out set; sums and counts
    are all-reduced, so every rank returns the metrics of the whole set.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    squares: dict[str, Tensor] = {}  # Σ over sequences of (the sequence's average)²
    count = None
    kept = HeldOut([], []) if keep_heldout else None
    for batch in batches:
        losses = model.losses(batch)
        del losses["loss"]
        if kept is not None and "kl" in losses:
            kept.batches.append(batch)
            kept.kl.append(losses["kl"].double())
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
    return Positionwise(nll=means["nll"], kl=kl, floor=floor, num_sequences=total, avg_stderr=stderr, extra=extra,
                        heldout=kept if kept and kept.kl else None)


@dataclass
class Paired:
    """The model against a reference predictor on the same held-out sequences."""

    reference: Tensor  # (L,) float64: the reference's KL_i on these sequences
    difference: float  # model − reference: KL averaged over positions (or summed after a split) and sequences
    se: float  # the SE of `difference` over sequences (each sequence's own difference)

    def on(self, z: float = 2.0) -> bool:
        """Within z paired SEs (an exact match, SE 0, within rounding)."""
        return abs(self.difference) <= z * self.se + 1e-9


def paired_reference(metrics: Positionwise, model: torch.nn.Module, prediction: Callable, after: int | None = None) -> Paired:
    """The model's KL on its held-out sequences against the KL, under the model's own output adapter,
    of `prediction(batch)` (a reference's prediction in the adapter's form): per position and as an
    average difference with its paired SE; with `after`, the difference of the KL summed over the
    positions after it (the tail a linear-state bound counts). Sums are all-reduced under
    torch.distributed, as in evaluate_positionwise, so every rank returns the whole set's numbers."""
    if metrics.heldout is None:
        raise UserError("paired references need the held-out batches: evaluate with keep_heldout=True")
    heldout = metrics.heldout
    curve = torch.zeros_like(heldout.kl[0][0])
    differences = []
    for batch, model_kl in zip(heldout.batches, heldout.kl):
        reference = model.decoder.losses(prediction(batch), batch)["kl"].double()  # (B, L)
        curve += reference.sum(0)
        difference = model_kl - reference  # (B, L)
        differences.append(difference.mean(1) if after is None else difference[:, after:].sum(1))  # (B,)
    differences = torch.cat(differences)
    packed = torch.cat([curve, torch.stack([differences.sum(), (differences**2).sum(),
                                            torch.tensor(float(len(differences)), device=curve.device)])])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed)
    packed = packed.cpu()
    total, seq_len = float(packed[-1]), len(curve)
    mean = float(packed[seq_len]) / total
    variance = (float(packed[seq_len + 1]) - total * mean**2) / max(total - 1, 1)
    return Paired(reference=packed[:seq_len] / total, difference=mean, se=math.sqrt(max(variance, 0.0) / total))


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
    # the window-k references on the held-out sequences themselves, e.g. "heldout_window4": (L,)
    heldout_references: dict[str, Tensor] = field(default_factory=dict)


def _window_name(k: int) -> str:
    return "nocontext" if k == 0 else f"window{k}"


def _paired_windows(metrics: Positionwise, model: torch.nn.Module, data, windows: list[int],
                    searched: int) -> tuple[dict[int, Paired], int | None] | None:
    """The model against the exact window-k predictors on its own held-out sequences: for k in
    `windows`, and by bisection the smallest k <= searched whose predictor does at least as well as
    the model on them (None: none). None where the data has no window predictions."""
    if metrics.heldout is None or data.window_prediction(0, metrics.heldout.batches[0]) is None:
        return None
    paired: dict[int, Paired] = {}

    def against(k: int) -> Paired:
        if k not in paired:
            paired[k] = paired_reference(metrics, model, lambda batch: data.window_prediction(k, batch))
        return paired[k]

    for k in windows:
        against(k)
    if against(searched).difference < -1e-9:  # better than every window searched
        return paired, None
    low, high = 0, searched  # the window predictor's KL falls with k: find where it crosses the model's
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if against(middle).difference >= -1e-9 else (middle + 1, high)
    return paired, low


def _paired_linear_state(metrics: Positionwise, model: torch.nn.Module, data, split: int) -> Paired | None:
    """The model's KL summed after `split` against the best linear state of its size there
    (`bound_state_size`) on its own held-out sequences; None where the data has no such prediction."""
    dim = model.bound_state_size(split)
    if metrics.heldout is None or data.linear_state_prediction(dim, split, metrics.heldout.batches[0]) is None:
        return None
    return paired_reference(metrics, model, lambda batch: data.linear_state_prediction(dim, split, batch), after=split)


def analyse_state(
    metrics: Positionwise,
    model: torch.nn.Module,
    data,
    windows: Iterable[int] = (1, 4, 16),
    tolerance: float = 0.1,
    context_fraction: float = 0.125,
    max_window: int = 512,
    bound_splits: int = 24,
    paired_z: float = 2.0,
    floor_tolerance: float = 0.02,
) -> StateAnalysis | None:
    """Is this model limited by its history state or by its training? None where the data has no
    exact references (`data.window_kl(0)` is None, e.g. natural text).

    window_avg_kl: {"k": average KL of the exact window-k predictor} for k = 0 and `windows`.
    Where the held-out batches were kept (evaluate_positionwise(keep_heldout=True)) and the data
    predicts as the window-k predictor would (`window_prediction`), every comparison is paired: the
    predictor runs on the model's own held-out sequences, so model − reference has an SE over
    sequences and is 0 for a model that is that predictor. Else the references are expectations.

    effective_context: the smallest window k (searched up to `max_window`) whose exact predictor's
    KL is at most the model's ("as good as a predictor that sees k tokens"; None: more);
    utilization: effective_context / L (long-context utilization).
    floor_reference, kl_minus_floor (± kl_minus_floor_se, paired): the model against the best its
    receptive field allows: the window-k predictor for a receptive field of k < L tokens
    (sliding-window attention), else the exact conditional (KL 0). on_references: the references
    the model matches within `paired_z` paired SEs.
    bound_half / tail_kl_half: the linear-state bound for the model's state at the data's
    `history_split` (its SSM state or KV cache: `SequenceModel.bound_state_size`) and the model's KL
    summed over the positions after it. kl_minus_linear_state (± _se, paired; unbounded receptive
    fields): that tail KL against the best linear state of the model's size run on the same held-out
    sequences (`linear_state_prediction`), whose tail KL there is heldout_linear_state_kl.
    Verdicts: with a bounded receptive field, state_limited = on the window floor of that field,
    within `paired_z` paired SEs or `floor_tolerance` of it (relative: the SE alone shrinks with the
    held-out set until no trained model sits on anything), training_limited = above by more; else state_limited = tail KL within
    `tolerance` (relative) of the bound, or `paired_z` paired SEs of the paired linear state, and
    training_limited = above it by more, while the effective context is at most
    `context_fraction`·split (None where the data knows no bound).
    """
    nocontext = data.window_kl(0)
    if nocontext is None or metrics.kl is None:
        return None
    seq_len = len(metrics.kl)
    kl = metrics.kl
    model_avg = float(kl.mean())
    receptive = getattr(model, "receptive_field", None)
    bounded = receptive is not None and receptive < seq_len
    named = sorted({0} | {k for k in windows if 1 <= k < seq_len} | ({receptive} if bounded else set()))
    references = {f"kl_{_window_name(k)}": data.window_kl(k) for k in named}
    window_avg_kl = {str(k): float(data.window_kl(k).mean()) for k in named}
    searched = min(max_window, seq_len - 1)

    paired_result = _paired_windows(metrics, model, data, named, searched)
    if paired_result is None:
        data.window_kl(searched)  # every smaller window comes with it
        effective = next((k for k in range(searched + 1) if float(data.window_kl(k).mean()) <= model_avg), None)
        paired: dict[int, Paired] = {}
    else:
        paired, effective = paired_result

    def floor_entry(name: str, difference: float, se: float | None) -> dict:
        return {"floor_reference": name, "kl_minus_floor": difference, "kl_minus_floor_se": se}

    if bounded and receptive in paired:
        floor = floor_entry(_window_name(receptive), paired[receptive].difference, paired[receptive].se)
    elif bounded:
        floor = floor_entry(_window_name(receptive), model_avg - window_avg_kl[str(receptive)], None)
    else:
        floor = floor_entry("exact", model_avg, metrics.avg_stderr.get("kl"))

    tail_kl = kl.flip(0).cumsum(0).flip(0).roll(-1)  # tail_kl[i-1] = Σ_{j>i} KL_j (1-based i)
    tail_kl[-1] = 0.0
    half = data.history_split
    tail_bound = torch.full((seq_len,), float("nan"), dtype=torch.float64)
    for split in sorted(set(splits_grid(seq_len, bound_splits)) | {half}):
        bound = data.state_bound(model.bound_state_size(split), split)
        tail_bound[split - 1] = float("nan") if bound is None else bound
    bound_half, tail_half = float(tail_bound[half - 1]), float(tail_kl[half - 1])
    linear = None if bounded or math.isnan(bound_half) else _paired_linear_state(metrics, model, data, half)
    verdicts = {"state_limited": None, "training_limited": None}
    if bounded:  # the window floor of its receptive field: within z paired SEs or floor_tolerance of it
        difference, floor_kl = floor["kl_minus_floor"], window_avg_kl[str(receptive)]
        margin = max(paired_z * (floor["kl_minus_floor_se"] or 0.0), floor_tolerance * floor_kl) + 1e-9
        verdicts = {"state_limited": bool(abs(difference) <= margin), "training_limited": bool(difference > margin)}
    elif not math.isnan(bound_half):  # paired where the data predicts as the best linear state would
        difference, se = (tail_half - bound_half, 0.0) if linear is None else (linear.difference, linear.se)
        margin = max(paired_z * se, tolerance * bound_half) + 1e-9
        verdicts = {
            "state_limited": bool(abs(difference) <= margin),
            "training_limited": bool(difference > margin and effective is not None and effective <= context_fraction * half),
        }
    on_linear_state = ["linear_state"] if linear is not None and linear.on(paired_z) else []
    summary = {
        "effective_context": effective,
        "effective_context_searched_up_to": searched,
        "utilization": None if effective is None else effective / seq_len,
        "paired_references": paired_result is not None,
        "window_avg_kl": window_avg_kl,
        "heldout_window_kl": {str(k): float(p.reference.mean()) for k, p in sorted(paired.items()) if k in named},
        "kl_minus_window": {str(k): [p.difference, p.se] for k, p in sorted(paired.items()) if k in named},
        "on_references": [_window_name(k) for k, p in sorted(paired.items()) if k in named and p.on(paired_z)]
        + on_linear_state,
        **floor,
        "bound_half": None if math.isnan(bound_half) else bound_half,
        "tail_kl_half": tail_half,
        "kl_minus_linear_state": None if linear is None else linear.difference,
        "kl_minus_linear_state_se": None if linear is None else linear.se,
        "heldout_linear_state_kl": None if linear is None else float(linear.reference[half:].sum()),
        **verdicts,
        "verdict_tolerance": tolerance,
        "paired_z": paired_z,
        "floor_tolerance": floor_tolerance,
    }
    heldout = {f"heldout_{_window_name(k)}": p.reference for k, p in sorted(paired.items()) if k in named}
    if linear is not None:
        heldout["heldout_linear_state"] = linear.reference
    return StateAnalysis(references, tail_kl, tail_bound, summary, heldout)


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
