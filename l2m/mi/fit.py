"""Power-law fits in log–log space, shared by the Gaussian family, the MI estimators and reports."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PowerLawFit:
    """y ≈ prefactor · x**exponent, fitted by least squares of log y on log x."""

    exponent: float
    prefactor: float
    exponent_stderr: float

    def __call__(self, x):
        return self.prefactor * np.asarray(x, dtype=np.float64) ** self.exponent

    def __iter__(self):
        # Lets callers unpack: `beta, A, beta_err = fit_power_law(x, y)`.
        return iter((self.exponent, self.prefactor, self.exponent_stderr))


def positive_points(x, y, min_points: int, fit: str, names: tuple[str, str] = ("x", "y")):
    """x, y as flat float64 arrays, checked for what a fit in log space needs."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same length, got {x.size} and {y.size}")
    if x.size < min_points:
        raise ValueError(f"{fit} needs at least {min_points} points, got {x.size}")
    if np.any(x <= 0) or np.any(y <= 0) or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{fit} needs finite, strictly positive {names[0]} and {names[1]}")
    return x, y


def fit_power_law(x, y) -> PowerLawFit:
    """Fit log y = log A + β log x by ordinary least squares.

    Returns β (`exponent`), A (`prefactor`) and the standard error of β from the residuals
    (0 when the fit has no residual degrees of freedom, i.e. exactly two points).
    """
    x, y = positive_points(x, y, min_points=2, fit="a power-law fit")
    lx, ly = np.log(x), np.log(y)
    design = np.stack([np.ones_like(lx), lx], axis=1)
    (log_a, beta), *_ = np.linalg.lstsq(design, ly, rcond=None)
    dof = x.size - 2
    if dof > 0:
        residual = ly - design @ np.array([log_a, beta])
        sigma2 = residual @ residual / dof
        beta_err = float(np.sqrt(sigma2 / np.sum((lx - lx.mean()) ** 2)))
    else:
        beta_err = 0.0
    return PowerLawFit(exponent=float(beta), prefactor=float(np.exp(log_a)), exponent_stderr=beta_err)
