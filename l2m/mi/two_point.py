"""Two-point MI Î_TP(d) = Ĥ(X) + Ĥ(Y) − Ĥ(XY) from pair counts, and its bias-corrected decay fit.

X and Y are the first and second token of the pairs at distance d, so the three entropies are
estimated on the same N pairs. The estimate keeps a positive bias at large d (where the true
MI vanishes); spec §5 removes it by fitting Î(d) = A d^(−α) + C with C ≥ 0 in log space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from l2m.mi.counts import PairCounter
from l2m.mi.entropy import grassberger_entropy, naive_entropy
from l2m.mi.fit import fit_power_law, positive_points

ESTIMATORS = {"grassberger": grassberger_entropy, "naive": naive_entropy}


def pair_mi_stderr(keys: np.ndarray, counts: np.ndarray, vocab_size: int) -> float:
    """Delta-method standard error sqrt((E[i²] − I²)/N) of the plug-in MI, i = log p(x,y)/(p(x)p(y))."""
    total = counts.sum()
    first = np.bincount(keys // vocab_size, weights=counts, minlength=vocab_size)
    second = np.bincount(keys % vocab_size, weights=counts, minlength=vocab_size)
    p_xy = counts / total
    pmi = np.log(p_xy * total * total / (first[keys // vocab_size] * second[keys % vocab_size]))
    mi = p_xy @ pmi
    return float(np.sqrt(max(p_xy @ pmi**2 - mi * mi, 0.0) / total))


def two_point_mi(counter: PairCounter, d: int, estimator: str = "grassberger") -> tuple[float, float]:
    """Î_TP(d) in nats and its standard error from the pair counts at distance d.

    The standard error treats the N pairs as independent; pairs from one document are not,
    so on text it is a lower bound.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")
    entropy = ESTIMATORS[estimator]
    keys, counts = counter.pairs(d)
    if counts.size == 0:
        raise ValueError(f"no token pairs at distance {d}: every document is shorter than {d + 1} tokens")
    first, second = counter.marginals(d)
    mi = entropy(first)[0] + entropy(second)[0] - entropy(counts)[0]
    return float(mi), pair_mi_stderr(keys, counts, counter.vocab_size)


@dataclass(frozen=True)
class DecayFit:
    """Î(d) ≈ amplitude · d^(−alpha) + offset, offset ≥ 0 (the estimator's bias floor)."""

    alpha: float
    amplitude: float
    offset: float
    alpha_stderr: float
    offset_stderr: float

    def __call__(self, d):
        return self.amplitude * np.asarray(d, dtype=np.float64) ** (-self.alpha) + self.offset


def fit_decay_with_offset(d, mi) -> DecayFit:
    """Least squares of log Î on log(A d^(−α) + C) over (log A, α, C ≥ 0).

    Standard errors come from the Jacobian at the optimum, (JᵀJ)⁻¹ s² with s² the residual
    variance (zero when there are exactly three points).
    """
    d, y = positive_points(d, mi, min_points=3, fit="the fit A d^(−α) + C", names=("d", "mi"))
    log_y = np.log(y)
    start = fit_power_law(d, y)
    x0 = np.array([np.log(start.prefactor), max(-start.exponent, 1e-3), 0.1 * y.min()])

    def residual(theta):
        log_a, alpha, offset = theta
        return np.log(np.exp(log_a) * d ** (-alpha) + offset) - log_y

    res = least_squares(residual, x0, bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, np.inf]), x_scale="jac")
    dof = d.size - 3
    if dof > 0:
        s2 = 2.0 * res.cost / dof
        cov = s2 * np.linalg.pinv(res.jac.T @ res.jac)
        alpha_err, offset_err = float(np.sqrt(cov[1, 1])), float(np.sqrt(cov[2, 2]))
    else:
        alpha_err = offset_err = 0.0
    log_a, alpha, offset = res.x
    return DecayFit(float(alpha), float(np.exp(log_a)), float(offset), alpha_err, offset_err)
