"""`python -m l2m.sweep DIR [DIR ...] [--out DIR] [--state ssm|total]`: the sweep report of the runs
under the given run or multirun directories; see l2m.report.sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l2m.checks import UserError, one_line_errors
from l2m.report.sweep import (
    best_rows,
    collapse_metrics,
    family_collapse,
    find_runs,
    plot_learning_curves,
    plot_overlays,
    plot_recall_frontier,
    plot_sweep,
    print_table,
    sweep_rows,
    window_references,
    write_csv,
    write_report,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m l2m.sweep", description="Sweep report (paper Fig. 3) from the run directories of a sweep."
    )
    parser.add_argument("dirs", nargs="+", help="run or multirun directories written by train.py")
    parser.add_argument("--out", default=None, help="where the report goes (default: the first dir)")
    parser.add_argument("--state", choices=["ssm", "total"], default="ssm",
                        help="dim(z): SSM state for SSMs and KV cache for transformers (paper Fig. 3c), "
                             "or the whole history state (SSM + conv)")
    args = parser.parse_args(argv)
    with one_line_errors(path_hint="check the run directories, or choose an --out you can write to"):
        return _report(args)


def _report(args: argparse.Namespace) -> int:
    records = find_runs(args.dirs)
    every_row, skipped = sweep_rows(records, args.state)
    if not every_row:
        finished = sum(r.summary is not None for r in records)
        raise UserError(
            f"none of the {finished} summary.json files has i_bp_half, avg_kl and the history-state "
            "parts: the sweep report is for Gaussian-task runs (text runs have no exact MI)"
        )
    out = Path(args.out or args.dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    rows = best_rows(every_row)  # sweep.csv keeps every run of an lr grid; the table and figures, its best
    collapse, across = collapse_metrics(rows), family_collapse(rows)
    paths = {"csv": out / "sweep.csv", "plot": out / "sweep.png", "report": out / "report.md"}
    write_csv(every_row, paths["csv"])
    plot_sweep(rows, paths["plot"], args.state, collapse, window_references(rows))
    figures = {"sweep": paths["plot"]}
    figures.update({p.stem: p for p in plot_overlays(rows, out)})
    curves = plot_learning_curves(rows, out / "learning_curves.png")
    if curves is not None:
        figures["learning curves"] = curves
    frontier = plot_recall_frontier(rows, out / "recall_frontier.png", across)
    if frontier is not None:
        figures["recall frontier"] = paths["frontier"] = frontier
    write_report(rows, records, collapse, figures, paths["report"], args.state, across)
    print_table(rows, skipped, records, collapse, paths, across)
    return 0


if __name__ == "__main__":
    sys.exit(main())
