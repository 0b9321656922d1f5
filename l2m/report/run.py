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

from l2m.evaluation import Positionwise
from l2m.report.format import format_number

CSV_NAME, SUMMARY_NAME, PLOT_NAME = "positionwise.csv", "summary.json", "positionwise.png"


def positionwise_rows(metrics: Positionwise) -> tuple[list[str], list[list[float | int | None]]]:
    """Columns and rows of the position-wise table (positions are 1-based)."""
    curves = {"kl": metrics.kl, "nll": metrics.nll, "nll_floor": metrics.floor}
    columns = ["position"] + [name for name, curve in curves.items() if curve is not None]
    rows = [
        [i + 1] + [float(curves[name][i]) for name in columns[1:]] for i in range(len(metrics.nll))
    ]
    return columns, rows


def write_outputs(
    run_dir: str | Path, metrics: Positionwise, summary: Mapping, title: str = "", smooth: int = 5
) -> dict[str, Path]:
    """Write the CSV, the JSON summary and the plot; return their paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": run_dir / CSV_NAME, "summary": run_dir / SUMMARY_NAME, "plot": run_dir / PLOT_NAME}
    columns, rows = positionwise_rows(metrics)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    with open(paths["summary"], "w") as f:
        json.dump(dict(summary), f, indent=2, sort_keys=True)
    plot_positionwise(metrics, paths["plot"], title=title, smooth=smooth)
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


def plot_positionwise(metrics: Positionwise, path: str | Path, title: str = "", smooth: int = 5) -> None:
    """Log-axis plot of KL_i (where defined) and NLL_i with the exact floor, lightly smoothed."""
    positions = torch.arange(1, len(metrics.nll) + 1)
    panels = [("KL$_i$ (nats/token)", metrics.kl, None)] if metrics.kl is not None else []
    panels.append(("NLL$_i$ (nats/token)", metrics.nll, metrics.floor))
    fig = Figure(figsize=(5.5 * len(panels), 4))  # not pyplot: leaves the caller's backend alone
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (label, curve, floor) in zip(axes[0], panels):
        ax.plot(positions, moving_average(curve, smooth), label=f"model (window {smooth})")
        if floor is not None:  # smoothed alike, so the smoothed NLL (= KL + floor) never dips below it
            ax.plot(positions, moving_average(floor, smooth), "k--", lw=1, label="exact floor $H_p(W_i|W_{<i})$")
        ax.set_xscale("log")
        # NLL of a continuous token can be negative: a log y-axis only where the curve is positive.
        if bool((curve > 0).all()) and (floor is None or bool((floor > 0).all())):
            ax.set_yscale("log")
        ax.set_xlabel("position i")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_summary(summary: Mapping, paths: Mapping[str, Path]) -> None:
    """The short table a run ends with, and where its files are."""
    from rich.console import Console
    from rich.table import Table

    keys = ["model", "params", "seq_len", "dim_z_half", "i_bp_half", "ratio"]
    if summary.get("avg_kl") is not None:
        keys += ["initial_avg_kl", "avg_kl", "kl_first_quarter", "kl_last_quarter"]
    else:
        keys += ["initial_avg_nll", "avg_nll", "nll_first_quarter", "nll_last_quarter"]
    labels = {
        "params": "parameters",
        "seq_len": "L",
        "dim_z_half": "dim(z_{L/2})",
        "i_bp_half": "I_BP(L/2;L) \\[nats]",  # escaped: rich reads a bare [nats] as markup and drops it
        "ratio": "I_BP / dim(z)",
    }
    table = Table(title="L²M run summary (nats; KL and NLL per token)")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key in keys:
        table.add_row(labels.get(key, key), format_number(summary.get(key)))
    console = Console()
    console.print(table)
    for name, path in paths.items():
        console.print(f"{name:>8}: {path}")
