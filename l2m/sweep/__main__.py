"""`python -m l2m.sweep DIR [DIR ...] [--out DIR] [--state ssm|total]`: the sweep report (paper Fig. 3c)
of the runs under the given run or multirun directories; see l2m.report.sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l2m.report.sweep import find_summaries, plot_sweep, print_table, sweep_rows, write_csv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l2m.sweep", description="Sweep report (paper Fig. 3c) from the summary.json files of many runs.")
    parser.add_argument("dirs", nargs="+", help="run or multirun directories written by train.py")
    parser.add_argument("--out", default=None, help="where sweep.csv and sweep.png go (default: the first dir)")
    parser.add_argument("--state", choices=["ssm", "total"], default="ssm",
                        help="dim(z): SSM state for SSMs and KV cache for transformers (paper Fig. 3c), "
                             "or the whole history state (SSM + conv)")
    args = parser.parse_args(argv)
    try:
        summaries = find_summaries(args.dirs)
        rows, skipped = sweep_rows(summaries, args.state)
        if not rows:
            raise ValueError(
                f"none of the {len(summaries)} summary.json files has i_bp_half, avg_kl and the history-state "
                "parts: the sweep report is for Gaussian-task runs (text runs have no exact MI)"
            )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out = Path(args.out or args.dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "sweep.csv", "plot": out / "sweep.png"}
    write_csv(rows, paths["csv"])
    plot_sweep(rows, paths["plot"], args.state)
    print_table(rows, skipped, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
