import numpy as np
import pytest

from l2m.mi import fit_power_law


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
