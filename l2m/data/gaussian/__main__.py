"""`python -m l2m.data.gaussian [--levels 2-6] [--kind subvolume|log|both] [--copies N]`: the exact
MI table of the Gaussian families and the fitted power law."""

from __future__ import annotations

import argparse

from l2m.data.gaussian.family import KINDS, MAX_LEVELS, mi_table


def _parse_levels(text: str) -> list[int]:
    """'2-6' or '2,3,5' -> list of levels."""
    try:
        if "-" in text:
            lo, hi = (int(s) for s in text.split("-"))
            levels = list(range(lo, hi + 1))
        else:
            levels = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must look like '2-6' or '2,3,4', got {text!r}") from None
    if not levels or any(not 1 <= k <= MAX_LEVELS for k in levels):
        raise argparse.ArgumentTypeError(f"levels must lie in 1..{MAX_LEVELS}, got {text!r}")
    return levels


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from l2m.fit import fit_power_law

    parser = argparse.ArgumentParser(
        prog="python -m l2m.data.gaussian", description="Exact MI of the sub-volume and log Gaussian families."
    )
    parser.add_argument("--levels", type=_parse_levels, default=_parse_levels("2-6"), help="e.g. 2-6 (L = 4**levels)")
    parser.add_argument("--kind", choices=(*KINDS, "both"), default="both")
    parser.add_argument("--copies", type=int, default=1, help="MI scales linearly with copies (default 1)")
    args = parser.parse_args(argv)
    if args.copies < 1:
        parser.error(f"--copies must be >= 1, got {args.copies}")

    console = Console()
    for kind in KINDS if args.kind == "both" else (args.kind,):
        rows = mi_table(args.levels, kind, args.copies)
        caption = ""
        if len(rows) >= 2:
            beta, prefactor, beta_err = fit_power_law([r["L"] for r in rows], [r["i_bp"] for r in rows])
            caption = f"fit I_BP(L/2; L) ≈ {prefactor:.4g}·L^β,  β = {beta:.4f} ± {beta_err:.4f}"
        copies = f"{args.copies} cop{'y' if args.copies == 1 else 'ies'}"
        table = Table(title=f"{kind} family, {copies}, nats", caption=caption)
        for name in ("levels", "L", "I_BP(L/2; L)", "I_TP(1, L)", "σ_L"):
            table.add_column(name, justify="right")
        for r in rows:
            table.add_row(
                str(r["levels"]), f"{r['L']:,}", f"{r['i_bp']:.10g}", f"{r['i_tp']:.6e}", f"{r['sigma_last']:.10f}"
            )
        console.print(table)


if __name__ == "__main__":
    main()
