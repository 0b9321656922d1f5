import numpy as np
import pytest

from l2m.fit import fit_power_law


def test_exact_power_law_is_recovered():
    x = np.array([16, 64, 256, 1024, 4096])
    fit = fit_power_law(x, 0.37 * x**0.79)
    assert fit.exponent == pytest.approx(0.79, abs=1e-12)
    assert fit.prefactor == pytest.approx(0.37, rel=1e-12)
    assert fit.exponent_stderr == pytest.approx(0.0, abs=1e-10)
    beta, prefactor, err = fit
    assert (beta, prefactor, err) == (fit.exponent, fit.prefactor, fit.exponent_stderr)


def test_standard_error_matches_scipy_linregress():
    from scipy.stats import linregress

    rng = np.random.default_rng(0)
    x = np.geomspace(2, 2048, 11)
    y = 3.0 * x**0.5 * np.exp(rng.normal(0, 0.1, x.size))
    fit = fit_power_law(x, y)
    ref = linregress(np.log(x), np.log(y))
    assert fit.exponent == pytest.approx(ref.slope, rel=1e-12)
    assert fit.exponent_stderr == pytest.approx(ref.stderr, rel=1e-10)
    assert fit.prefactor == pytest.approx(np.exp(ref.intercept), rel=1e-12)


@pytest.mark.parametrize("x,y", [([1.0], [1.0]), ([1.0, 2.0], [1.0, -1.0]), ([1.0, 2.0], [1.0])])
def test_bad_input_is_rejected(x, y):
    with pytest.raises(ValueError):
        fit_power_law(x, y)


def test_weighted_fit_carries_the_points_errors_into_beta():
    # Points exactly on the line: β's error comes from the points' own errors alone, and equals
    # the weighted-least-squares formula sqrt(1 / Σ w (log x − mean_w)²), w = (y / SE)².
    x = np.array([16.0, 64.0, 256.0])
    y = 2.0 * x**0.8
    se = np.array([0.05, 0.1, 0.2]) * y
    fit = fit_power_law(x, y, y_stderr=se)
    w = 1 / np.array([0.05, 0.1, 0.2]) ** 2
    lx = np.log(x)
    expected = np.sqrt(1 / np.sum(w * (lx - np.sum(w * lx) / w.sum()) ** 2))
    assert fit.exponent == pytest.approx(0.8, abs=1e-12)
    assert fit.exponent_stderr == pytest.approx(expected, rel=1e-10)
    # Two points now have a standard error too; scatter beyond the errors scales it up.
    assert fit_power_law(x[:2], y[:2], y_stderr=se[:2]).exponent_stderr > 0
    noisy = y * np.array([1.3, 0.7, 1.3])
    assert fit_power_law(x, noisy, y_stderr=se).exponent_stderr > 3 * expected
    with pytest.raises(ValueError, match="y_stderr"):
        fit_power_law(x, y, y_stderr=[0.1, 0.0, 0.1])
