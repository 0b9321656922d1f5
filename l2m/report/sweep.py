"""Sweep report: the paper's Fig. 3c from the summary.json files of many runs.

    python -m l2m.sweep multirun/<date>/<time> [more run or multirun dirs] [--out DIR] [--state ssm|total]

Writes sweep.csv (one row per run) and sweep.png: average KL against I_BP(L/2; L) / dim(z) on
log-log axes (where runs of all sizes and lengths should fall onto one curve), next to KL against L.
Reads only the files train.py leaves in each run directory, so it needs neither the logger nor
Lightning (l2m.training would import it), and works on runs copied off the training machines.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from l2m.report.format import format_number

COLUMNS = ["run_dir", "model", "params", "seq_len", "dim_z", "i_bp_half", "ratio",
           "avg_kl", "kl_first_quarter", "kl_last_quarter", "initial_avg_kl"]
NEEDED = ["model", "seq_len", "dim_z_half", "i_bp_half", "avg_kl"]
# History-state parts that count for --state ssm: the recurrent SSM state (what the paper's Fig. 3c
# uses for Mamba) and the KV cache (a transformer's whole state); the short-conv window does not.
SSM_PARTS = ("ssm", "kv")


def find_summaries(dirs: list[str | Path]) -> list[Path]:
    """Every summary.json under each directory (recursively); each directory must hold one."""
    found = []
    for d in map(Path, dirs):
        paths = sorted(d.rglob("summary.json")) if d.is_dir() else []
        if not paths:
            raise FileNotFoundError(
                f"no summary.json under {d}: point at a run or multirun directory written by train.py "
                "(e.g. multirun/<date>/<time>)"
            )
        found += paths
    return sorted(set(found))


def state_dim(summary: dict, state: str) -> int | None:
    """dim(z_{L/2}) as the plot uses it; None when the summary does not say."""
    if state == "total":
        return summary["dim_z_half"]
    parts = [summary[f"dim_z_half_{p}"] for p in SSM_PARTS if summary.get(f"dim_z_half_{p}") is not None]
    return sum(parts) if parts else None


def sweep_rows(paths: list[Path], state: str = "ssm") -> tuple[list[dict], int]:
    """One row per usable run, sorted by model and L, and the number of summaries skipped
    (text runs have no I_BP or KL; older summaries may lack the state parts)."""
    rows, skipped = [], 0
    for path in paths:
        try:
            s = json.loads(path.read_text())
        except json.JSONDecodeError as error:  # e.g. a run killed while writing it
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        dim_z = state_dim(s, state) if all(s.get(k) is not None for k in NEEDED) else None
        if not dim_z:
            skipped += 1
            continue
        rows.append({
            **{k: s.get(k) for k in COLUMNS},
            "run_dir": str(path.parent),
            "dim_z": dim_z,
            "ratio": s["i_bp_half"] / dim_z,
        })
    rows.sort(key=lambda r: (r["model"], r["seq_len"], r["run_dir"]))
    return rows, skipped


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot_sweep(rows: list[dict], path: Path, state: str = "ssm") -> None:
    """Left: avg KL vs I_BP / dim(z), points labelled with L (Fig. 3c). Right: avg KL vs L."""
    fig = Figure(figsize=(11, 4.5))  # not pyplot: leaves the caller's backend alone
    ax_ratio, ax_len = fig.subplots(1, 2)
    markers = "osD^vP*Xh<>"
    for i, model in enumerate(sorted({r["model"] for r in rows})):
        runs = [r for r in rows if r["model"] == model]
        style = dict(marker=markers[i % len(markers)], color=f"C{i}", label=model, lw=1, ms=6)
        # Points only on the left: what matters is the collapse across models, not an order in L.
        ax_ratio.plot([r["ratio"] for r in runs], [r["avg_kl"] for r in runs], ls="none", **style)
        ax_len.plot([r["seq_len"] for r in runs], [r["avg_kl"] for r in runs], **style)
        for r in runs:
            ax_ratio.annotate(f"L={r['seq_len']}", (r["ratio"], r["avg_kl"]), textcoords="offset points",
                              xytext=(4, 4), fontsize=7, color=f"C{i}")
    what = "SSM state / KV cache" if state == "ssm" else "whole history state"
    ax_ratio.set_xlabel(f"$I_{{BP}}(L/2;L)$ / dim($z_{{L/2}}$)   [{what}]")
    ax_len.set_xlabel("sequence length L")
    ax_len.set_xscale("log", base=2)
    lengths = sorted({r["seq_len"] for r in rows})
    ax_len.set_xticks(lengths, [str(n) for n in lengths])
    ax_ratio.set_xscale("log")
    for ax in (ax_ratio, ax_len):
        # A log KL axis only where every value is positive (a perfect or degenerate run may give 0).
        if all(r["avg_kl"] > 0 for r in rows):
            ax.set_yscale("log")
        ax.set_ylabel("average KL per token (nats)")
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(0.1)
        ax.legend(fontsize=8)
    # Short labels on the log axes: their ranges often span less than a decade, where matplotlib
    # labels minor ticks too and its a×10^b form crowds them.
    for axis in (ax_ratio.xaxis, ax_ratio.yaxis, ax_len.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    fig.suptitle(f"L²M sweep: {len(rows)} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(rows: list[dict], skipped: int, paths: dict[str, Path]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    headers = {"model": "model", "params": "params", "seq_len": "L", "dim_z": "dim(z)", "i_bp_half": "I_BP",
               "ratio": "I_BP/dim(z)", "initial_avg_kl": "KL init", "avg_kl": "avg KL"}
    table = Table(title="L²M sweep (nats; KL per token)", box=box.SIMPLE_HEAD, pad_edge=False)  # fits 80 columns
    for key, header in headers.items():
        table.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(*(format_number(r[k]) for k in headers))
    console = Console()
    console.print(table)
    if skipped:
        console.print(f"skipped {skipped} summaries without I_BP, KL or history-state parts (e.g. text runs)")
    for name, path in paths.items():
        console.print(f"{name:>5}: {path}")
