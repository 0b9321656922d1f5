"""Power-law fits in log–log space (math only), shared by the Gaussian family, the MI estimators and reports."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from l2m.checks import UserError


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
        raise UserError(f"{names[0]} and {names[1]} must have the same length, got {x.size} and {y.size}")
    if x.size < min_points:
        raise UserError(f"{fit} needs at least {min_points} points, got {x.size}")
    if np.any(x <= 0) or np.any(y <= 0) or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise UserError(f"{fit} needs finite, strictly positive {names[0]} and {names[1]}")
    return x, y


def fit_power_law(x, y, y_stderr=None) -> PowerLawFit:
    """Fit log y = log A + β log x by least squares.

    Without `y_stderr`: ordinary least squares, and the standard error of β from the residuals
    (0 when there are exactly two points). With `y_stderr` (the points' own standard errors):
    weighted least squares with weights 1/σ², σ = y_stderr / y the error of log y, and the standard
    error of β from those errors, scaled up by sqrt(χ²/dof) where the points scatter more than
    their errors say (so it holds both for two points and for a misfitting power law).
    """
    x, y = positive_points(x, y, min_points=2, fit="a power-law fit")
    lx, ly = np.log(x), np.log(y)
    design = np.stack([np.ones_like(lx), lx], axis=1)
    dof = x.size - 2
    if y_stderr is None:
        (log_a, beta), *_ = np.linalg.lstsq(design, ly, rcond=None)
        residual = ly - design @ np.array([log_a, beta])
        beta_err = float(np.sqrt(residual @ residual / dof / np.sum((lx - lx.mean()) ** 2))) if dof > 0 else 0.0
        return PowerLawFit(exponent=float(beta), prefactor=float(np.exp(log_a)), exponent_stderr=beta_err)
    sigma = np.asarray(y_stderr, dtype=np.float64).ravel() / y
    if sigma.shape != y.shape or not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
        raise UserError(f"y_stderr must hold one finite, positive standard error per point, got {y_stderr}")
    weights = 1.0 / sigma**2
    normal = design.T @ (design * weights[:, None])
    log_a, beta = np.linalg.solve(normal, design.T @ (weights * ly))
    residual = ly - design @ np.array([log_a, beta])
    chi2_per_dof = (weights @ residual**2) / dof if dof > 0 else 1.0
    beta_err = float(np.sqrt(np.linalg.inv(normal)[1, 1] * max(1.0, chi2_per_dof)))
    return PowerLawFit(exponent=float(beta), prefactor=float(np.exp(log_a)), exponent_stderr=beta_err)
