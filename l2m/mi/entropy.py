"""Entropy of a discrete distribution from sample counts: plug-in and Grassberger (spec §5).

Both estimators return (entropy in nats, standard error). The standard error is the
delta-method one of the plug-in estimator, sqrt((Σ p log²p − H²) / N) with p = n / N; the
Grassberger estimator differs from the plug-in one by a bias term of order (#bins)/N, so it
shares that asymptotic variance.
"""

from __future__ import annotations

import numpy as np
from scipy.special import digamma


def _counts_of_counts(counts) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct positive counts n, how many bins have each, and the total N.

    Working on counts-of-counts keeps a table of millions of pair counts cheap (few distinct n).
    """
    c = np.asarray(counts).ravel()
    if c.dtype.kind not in "iu":
        if c.dtype.kind != "f" or not np.all(np.isfinite(c)) or np.any(c != np.round(c)):
            raise ValueError("counts must be non-negative integers")
        c = c.astype(np.int64)
    if np.any(c < 0):
        raise ValueError("counts must be non-negative integers, got a negative count")
    c = c[c > 0]
    if c.size == 0:
        raise ValueError("counts must contain at least one positive count")
    values, multiplicity = np.unique(c, return_counts=True)
    return values.astype(np.float64), multiplicity.astype(np.float64), int(c.sum())


def _plugin(values, multiplicity, total) -> tuple[float, float]:
    p = values / total
    log_p = np.log(p)
    h = -float(np.sum(multiplicity * p * log_p))
    second_moment = float(np.sum(multiplicity * p * log_p**2))
    stderr = float(np.sqrt(max(second_moment - h * h, 0.0) / total))
    return h, stderr


def naive_entropy(counts) -> tuple[float, float]:
    """Plug-in (maximum-likelihood) entropy −Σ p log p with p = n/N; biased low by ≈ (K−1)/2N."""
    return _plugin(*_counts_of_counts(counts))


def grassberger_g(n) -> np.ndarray:
    """G(n) = ψ(n) + ½(−1)ⁿ (ψ((n+1)/2) − ψ(n/2)) of Grassberger's estimator (n ≥ 1)."""
    n = np.asarray(n, dtype=np.float64)
    sign = 1.0 - 2.0 * (n % 2)  # (−1)ⁿ
    return digamma(n) + 0.5 * sign * (digamma((n + 1) / 2) - digamma(n / 2))


def grassberger_entropy(counts) -> tuple[float, float]:
    """Grassberger (2003) entropy Ĥ_G = log N − (1/N) Σ n G(n), far less biased than the plug-in."""
    values, multiplicity, total = _counts_of_counts(counts)
    h = float(np.log(total) - np.sum(multiplicity * values * grassberger_g(values)) / total)
    _, stderr = _plugin(values, multiplicity, total)
    return h, stderr
