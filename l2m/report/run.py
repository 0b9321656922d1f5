"""What an evaluation leaves in the run directory: positionwise.csv, summary.json, positionwise.png.

Other tools (the sweep report, notebooks) read runs from these files, without the logger.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from matplotlib.figure import Figure

from l2m.evaluation import Positionwise, StateAnalysis
from l2m.report.format import format_number, readable_log_ticks

CSV_NAME, SUMMARY_NAME, PLOT_NAME = "positionwise.csv", "summary.json", "positionwise.png"


def positionwise_rows(
    metrics: Positionwise, analysis: StateAnalysis | None = None
) -> tuple[list[str], list[list[float | int | None]]]:
    """Columns and rows of the position-wise table (positions are 1-based; None where a column is
    not computed at that position, e.g. tail_bound off its grid of splits)."""
    curves = {"kl": metrics.kl, "nll": metrics.nll, "nll_floor": metrics.floor}
    if analysis is not None:
        curves |= {**analysis.references, **analysis.heldout_references, "tail_kl": analysis.tail_kl,
                   "tail_bound": analysis.tail_bound}
    columns = ["position"] + [name for name, curve in curves.items() if curve is not None]

    def value(x: torch.Tensor) -> float | None:
        return None if torch.isnan(x) else float(x)

    rows = [[i + 1] + [value(curves[name][i]) for name in columns[1:]] for i in range(len(metrics.nll))]
    return columns, rows


def write_outputs(
    run_dir: str | Path,
    metrics: Positionwise,
    summary: Mapping,
    analysis: StateAnalysis | None = None,
    title: str = "",
    smooth: int = 5,
) -> dict[str, Path]:
    """Write the CSV, the JSON summary and the plot; return their paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": run_dir / CSV_NAME, "summary": run_dir / SUMMARY_NAME, "plot": run_dir / PLOT_NAME}
    columns, rows = positionwise_rows(metrics, analysis)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    with open(paths["summary"], "w") as f:
        json.dump(dict(summary), f, indent=2, sort_keys=True)
    plot_positionwise(metrics, paths["plot"], analysis, title=title, smooth=smooth)
    return paths


def moving_average(curve: torch.Tensor, window: int) -> torch.Tensor:
    """Centred moving average that shrinks its window at the edges (no padding bias)."""
    if window <= 1:
        return curve
    kernel = torch.ones(1, 1, window, dtype=curve.dtype)
    pad = window // 2
    sums = torch.nn.functional.conv1d(curve.view(1, 1, -1), kernel, padding=pad)
    counts = torch.nn.functional.conv1d(torch.ones_like(curve).view(1, 1, -1), kernel, padding=pad)
    return (sums / counts).view(-1)[: len(curve)]


def plot_positionwise(
    metrics: Positionwise, path: str | Path, analysis: StateAnalysis | None = None, title: str = "", smooth: int = 5
) -> None:
    """Log-axis plot of KL_i (with the exact window references, where known) and NLL_i (with the
    exact floor), lightly smoothed; and, where known, the tail KL against the linear-state bound."""
    positions = torch.arange(1, len(metrics.nll) + 1)
    references = analysis.references if analysis is not None else {}
    panels = [("KL$_i$ (nats/token)", metrics.kl, None, references)] if metrics.kl is not None else []
    panels.append(("NLL$_i$ (nats/token)", metrics.nll, metrics.floor, {}))
    n_panels = len(panels) + (analysis is not None)
    fig = Figure(figsize=(5.5 * n_panels, 4))  # not pyplot: leaves the caller's backend alone
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    for ax, (label, curve, floor, refs) in zip(axes, panels):
        ax.plot(positions, moving_average(curve, smooth), label=f"model (moving average over {smooth} positions)" if smooth > 1 else "model")
        if floor is not None:  # smoothed alike, so the smoothed NLL (= KL + floor) never dips below it
            ax.plot(positions, moving_average(floor, smooth), "k--", lw=1, label="exact floor $H_p(W_i|W_{<i})$")
        for i, (name, ref) in enumerate(refs.items()):
            label_ref = "no context" if name == "kl_nocontext" else f"best window {name.removeprefix('kl_window')}"
            smoothed = moving_average(ref, smooth)
            smoothed[smoothed <= 0] = float("nan")  # a window that holds the whole past: KL 0, off a log axis
            ax.plot(positions, smoothed, ls=":", lw=1.2, color=f"C{i + 2}", label=f"exact: {label_ref}")
        ax.set_xscale("log")
        # NLL of a continuous token can be negative: a log y-axis only where the curve is positive.
        if bool((curve > 0).all()) and (floor is None or bool((floor > 0).all())):
            ax.set_yscale("log")
        ax.set_xlabel("position i")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if analysis is not None:
        ax = axes[-1]
        on_grid = ~torch.isnan(analysis.tail_bound)
        ax.plot(positions, analysis.tail_kl, label="model: $\\sum_{j>i}$ KL$_j$")
        ax.plot(positions[on_grid], analysis.tail_bound[on_grid], "ko--", ms=3, lw=1,
                label="linear-state bound for the model's state")
        ax.set_xscale("log")
        ax.set_xlabel("split i")
        ax.set_ylabel("KL of positions after i (nats)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    readable_log_ticks(fig)
    fig.savefig(path, dpi=120)


# What the table shows of a summary besides its scalars: identifiers, curves, and settings.
NOT_SHOWN = {"task", "reference_family", "history_split", "history_split_label", "num_sequences",
             "heldout_history", "window_avg_kl", "effective_context_searched_up_to", "verdict_tolerance",
             "dim_z_half_bound", "avg_nll_floor", "nll_floor_first_quarter", "nll_floor_last_quarter", "step",
             "paired_references", "paired_z", "floor_tolerance", "from_training"}


def print_summary(summary: Mapping, paths: Mapping[str, Path]) -> None:
    """The short table a run ends with, and where its files are: the headline numbers first, then every
    other scalar the run's evaluation wrote (a new metric shows up without an edit here)."""
    from rich.console import Console
    from rich.table import Table

    split = summary.get("history_split_label", "L/2")
    keys = ["model", "params", "seq_len", "dim_z_half", "i_bp_half", "ratio"]
    measured = "KL" if summary.get("avg_kl") is not None else "NLL"  # text: the KL is unknown
    if measured == "KL":
        keys += ["initial_avg_kl", "avg_kl", "avg_kl_se", "kl_first_quarter", "kl_last_quarter"]
    else:
        keys += ["initial_avg_nll", "avg_nll", "avg_nll_se", "nll_first_quarter", "nll_last_quarter"]
    keys += [key for key in ("answer_kl", "answer_accuracy", "answer_chance", "effective_context", "utilization", "receptive_field",
                             "floor_reference", "kl_minus_floor", "kl_minus_floor_se", "tail_kl_half", "bound_half",
                             "heldout_linear_state_kl", "kl_minus_linear_state", "kl_minus_linear_state_se",
                             "state_limited", "training_limited", "still_falling") if key in summary]
    shown = set(keys) | NOT_SHOWN | {k for k in summary if k.startswith(("avg_", "initial_", "kl_", "nll_"))}
    keys += [key for key, value in summary.items()
             if key not in shown and (value is None or isinstance(value, (int, float, str)))]
    labels = {
        "params": "parameters",
        "seq_len": "L",
        "dim_z_half": f"dim(z) at {split}",
        "i_bp_half": f"I_BP at {split} \\[nats]",  # escaped: rich reads a bare [nats] as markup and drops it
        "ratio": "I_BP / dim(z)",
        "receptive_field": "receptive field (tokens; - for all)",
        "avg_kl_se": "avg_kl SE (sequences)",
        "avg_nll_se": "avg_nll SE (sequences)",
        "effective_context": "effective context (tokens)",
        "utilization": "utilization (effective context / L)",
        "floor_reference": "floor: best predictor of its receptive field",
        "kl_minus_floor": "avg_kl − floor (same sequences)" if summary.get("paired_references") else "avg_kl − floor",
        "kl_minus_floor_se": "its SE (paired over sequences)",
        "tail_kl_half": f"KL after {split} (sum)",
        "bound_half": f"linear-state bound after {split}",
        "heldout_linear_state_kl": "  its best linear state's, on these sequences",
        "kl_minus_linear_state": f"KL after {split} − best linear state (same sequences)",
        "kl_minus_linear_state_se": "its SE (paired over sequences)",
        "answer_kl": "KL on the answers",
        "answer_accuracy": "answer accuracy (top-1)",
        "answer_chance": "  chance: a value of the context (1/P)",
        "still_falling": "still improving (last 20%)",
    }
    from_training = set(summary.get("from_training") or ())  # evaluate.py: the rest is measured again
    caption = "*: from the training run; the rest measured again on the held-out set" if from_training else None
    table = Table(title=f"L²M run summary (nats; {measured} per token)", caption=caption)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key in keys:
        table.add_row(labels.get(key, key) + (" *" if key in from_training else ""), format_number(summary.get(key)))
    console = Console()
    console.print(table)
    for name, path in paths.items():
        console.print(f"{name:>8}: {path}", soft_wrap=True, highlight=False)  # a path is copied whole, never wrapped
