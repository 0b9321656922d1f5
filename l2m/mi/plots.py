"""The two MI plots: bipartite MI vs L (error bars, fit lines) and two-point MI vs d (raw, bias-corrected).

Uses matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from l2m.mi.bipartite import BipartiteResult
from l2m.mi.two_point import DecayFit

_STYLE = {"direct": ("o", "-"), "vclub": ("s", "--")}


def plot_bipartite(result: BipartiteResult, path: str | Path, exact: dict | None = None) -> Path:
    """I_BP(ℓ; L) vs L per ratio r = L/ℓ and estimator, log–log, with the fitted power laws.

    exact: optional {(ℓ, L): I_BP} drawn as crosses (synthetic sources).
    """
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.subplots()
    ratios = sorted({s.seq_len // s.ell for s in result.splits})
    colors = {r: f"C{i}" for i, r in enumerate(ratios)}
    for estimator, (marker, line) in _STYLE.items():
        for r in ratios:
            pts = [s for s in result.splits if s.seq_len == r * s.ell]
            x = np.array([s.seq_len for s in pts], dtype=float)
            y = np.array([getattr(s, estimator) for s in pts])
            err = np.array([getattr(s, f"{estimator}_se") for s in pts])
            fit = result.fits[estimator].get(r, {})
            label = f"{estimator}, L/ℓ={r}"
            if "beta" in fit:
                se = "n/a" if fit["beta_se"] is None else f"{fit['beta_se']:.2f}"
                label += f" (β={fit['beta']:.2f}±{se})"
                ax.plot(x, fit["prefactor"] * x ** fit["beta"], line, color=colors[r], alpha=0.6)
            ax.errorbar(x, y, yerr=err, fmt=marker, color=colors[r], capsize=3, label=label,
                        mfc="none" if estimator == "vclub" else None)
    if exact:
        ax.plot([seq_len for _, seq_len in exact], list(exact.values()), "kx", label="exact")
    values = [getattr(s, est) for s in result.splits for est in _STYLE]
    # Log axes show the power law; a poor density estimator can give MI ≤ 0, which needs linear axes.
    ax.set(xscale="log", yscale="log" if min(values) > 0 else "linear", xlabel="sequence length L",
           ylabel="bipartite MI I(X;Y) [nats]", title="Bipartite mutual information")
    _ticks_at(ax, [s.seq_len for s in result.splits])
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_two_point(d, mi, se, fit: DecayFit | None, path: str | Path, exact=None) -> Path:
    """Î_TP(d) raw (hollow circles) and bias-corrected (Î − C, filled squares, drawn a little to the
    right so that neither hides the other) vs d, log–log, with the fit A d^(−α) + C, and the exact
    I_TP(d) of an exact source as a black line."""
    d, mi, se = (np.asarray(a, dtype=float) for a in (d, mi, se))
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.subplots()
    ax.errorbar(d, mi, yerr=se, fmt="o", mfc="none", ms=8, capsize=3, color="C0", label="raw Î(d)")
    if fit is not None:
        dense = np.geomspace(d.min(), d.max(), 200)
        ax.plot(dense, fit(dense), "-", color="C0", alpha=0.6, label=f"A d^(−α) + C, C={fit.offset:.2g}")
        ax.errorbar(d * 1.06, mi - fit.offset, yerr=se, fmt="s", ms=5, color="C1", capsize=3,
                    label=f"bias-corrected Î(d) − C (α={fit.alpha:.2f}±{fit.alpha_stderr:.2f})")
        ax.plot(dense, fit.amplitude * dense ** (-fit.alpha), "--", color="C1", alpha=0.6)
    if exact is not None:
        ax.plot(d, np.asarray(exact, dtype=float), "-", color="black", lw=1.2, label="exact I(d) of the source")
    ax.set(xscale="log", yscale="log", xlabel="distance d", ylabel="two-point MI [nats]", title="Two-point mutual information")
    _ticks_at(ax, d)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _ticks_at(ax, x) -> None:
    """Plain-number ticks at the measured x values of a log axis."""
    ax.set_xticks(sorted(set(np.asarray(x, dtype=float).tolist())))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
