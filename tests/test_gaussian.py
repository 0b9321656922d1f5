"""The exact Gaussian family (spec §2): reference values, exact conditionals, sampling, MI scaling."""

import math

import numpy as np
import pytest
import torch

from conftest import run_if
from l2m.data.gaussian import GaussianFamily
from l2m.data.gaussian.__main__ import main
from l2m.fit import fit_power_law

# Spec §2 "Reference values" (one copy, nats): kind, levels, I_BP(L/2; L), I_TP(1, L), σ_L.
REFERENCE = [
    ("subvolume", 2, 0.9013125395027, 3.0611091081824e-03, 0.7142857142857),
    ("subvolume", 3, 2.730142214888428, 2.9811207702775e-04, 0.6779076806833),
    ("log", 2, 0.3179587878713552, 3.0611091081824e-03, 0.7624928516630),
    ("log", 3, 0.3422339068222202, 2.9811207702775e-04, 0.7572281660192),
]


def gaussian_kl(mu_p, std_p, mu_q, std_q):
    """KL(N(mu_p, std_p²) || N(mu_q, std_q²)), elementwise."""
    return torch.log(std_q / std_p) + (std_p**2 + (mu_q - mu_p) ** 2) / (2 * std_q**2) - 0.5


@pytest.mark.parametrize("kind,levels,i_bp,i_tp,sigma_last", REFERENCE)
def test_reference_values(kind, levels, i_bp, i_tp, sigma_last):
    one = GaussianFamily(levels, kind, copies=1)
    L = one.seq_len
    assert L == 4**levels
    assert one.bipartite_mi() == pytest.approx(i_bp, rel=1e-9)
    assert one.two_point_mi(1, L) == pytest.approx(i_tp, rel=1e-9)
    assert float(one.conditional_std[-1]) == pytest.approx(sigma_last, rel=1e-9)
    # MI and entropies scale with the number of independent copies.
    many = GaussianFamily(levels, kind, copies=64)
    assert many.bipartite_mi() == pytest.approx(64 * i_bp, rel=1e-12)
    assert many.two_point_mi(L, 1) == pytest.approx(64 * i_tp, rel=1e-12)


@pytest.mark.parametrize("kind", ["subvolume", "log"])
def test_covariance_and_every_split_match_brute_force_log_dets(kind):
    fam = GaussianFamily(3, kind, copies=2)
    cov, r, L = fam.covariance, fam.cholesky, fam.seq_len
    assert cov.dtype == torch.float64 and cov.shape == (L, L)
    torch.testing.assert_close(cov, cov.T, rtol=0, atol=1e-15)
    torch.testing.assert_close(cov.diagonal(), torch.ones(L, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(r @ r.T, cov, rtol=0, atol=1e-13)
    assert torch.equal(r, r.tril())
    assert torch.linalg.eigvalsh(cov).min() > 0.15  # spec: smallest eigenvalue ≈ 0.19
    assert torch.equal(cov, cov.flip(0, 1))  # persymmetric: bipartite_mi relies on it

    def logdet(a):
        return torch.linalg.slogdet(a).logabsdet.item()

    for split in range(1, L):
        exact = 0.5 * (logdet(cov[:split, :split]) + logdet(cov[split:, split:]) - logdet(cov))
        assert fam.bipartite_mi(split) == pytest.approx(2 * exact, rel=1e-10, abs=1e-12)
    i, j = 5, 17
    assert fam.two_point_mi(i, j) == pytest.approx(-math.log(1 - cov[i - 1, j - 1].item() ** 2), rel=1e-12)


def corr_power(c, power: float) -> torch.Tensor:
    """[[1, c], [c, 1]] ** power, by eigendecomposition."""
    e, v = torch.linalg.eigh(torch.tensor([[1.0, c], [c, 1.0]], dtype=torch.float64))
    return v @ torch.diag(e**power) @ v.T


def literal_covariance(levels: int, kind: str) -> torch.Tensor:
    """Σ by following spec §2 step by step on the linear maps themselves: y = A w, w ~ N(0, I).

    An implementation independent of the Kronecker formula the package uses.
    """
    g, r = math.sqrt(5) / 4, 0.25
    m = torch.tensor([[g, g, g, r], [-g, g, -g, r], [-g, -g, g, r], [g, -g, -g, r]], dtype=torch.float64)
    a = m.clone()  # level 1: y = M x
    for _ in range(levels - 1):
        n = a.shape[0]
        fresh = torch.eye(n, dtype=torch.float64)
        # Row i of the n×4 array, as maps from the inputs: subvolume (Y¹_i, Y²_i, Y³_i, W_i) with
        # three independent copies of the previous level; log (Y_i, W_i1, W_i2, W_i3).
        parts = (a, a, a, fresh) if kind == "subvolume" else (a, fresh, fresh, fresh)
        slots = torch.block_diag(*parts).view(4, n, -1)  # (slot q, row i, inputs)
        z = torch.einsum("pq,qnd->npd", m, slots).reshape(4 * n, -1)  # Z_{i,p} = Σ_q M_pq r_i[q]
        cov = z @ z.T  # after step 2, before any coupling
        for i in range(n - 1):
            p, q = 4 * i + 3, 4 * i + 4  # (Z_{i,4}, Z_{i+1,1})
            c0 = cov[p, q].item()
            c1 = 0.4 * (cov[p - 1, p].item() + cov[q, q + 1].item()) + 0.2 * c0
            z[[p, q]] = corr_power(c1, 0.5) @ corr_power(c0, -0.5) @ z[[p, q]]
        a = z
    return a @ a.T


@pytest.mark.parametrize("kind", ["subvolume", "log"])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_covariance_equals_the_literal_construction(kind, levels):
    exact = GaussianFamily(levels, kind).covariance
    torch.testing.assert_close(exact, literal_covariance(levels, kind), rtol=0, atol=1e-13)


def schur_conditionals(cov: torch.Tensor, z: torch.Tensor):
    """Brute-force p(z_i | z_<i) by Gaussian conditioning, one position at a time. z: (N, L)."""
    means, stds = [], []
    for i in range(cov.shape[0]):
        if i == 0:
            means.append(torch.zeros(z.shape[0], dtype=torch.float64))
            stds.append(cov[0, 0].sqrt())
            continue
        gain = torch.linalg.solve(cov[:i, :i], cov[:i, i])  # Σ_<i,<i⁻¹ Σ_<i,i
        means.append(z[:, :i] @ gain)
        stds.append((cov[i, i] - cov[i, :i] @ gain).sqrt())
    return torch.stack(means, 1), torch.stack(stds)


@pytest.mark.parametrize("kind", ["subvolume", "log"])
def test_exact_conditionals_equal_schur_complement(kind):
    fam = GaussianFamily(2, kind, copies=3)
    x = fam.sample(5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 17, 3) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], torch.zeros(5, 3))
    mean, std = fam.conditional(x)
    assert mean.shape == std.shape == (5, 16, 3)

    z = x[:, 1:].double().permute(0, 2, 1).reshape(-1, 16)  # every (sequence, copy) row
    ref_mean, ref_std = schur_conditionals(fam.covariance, z)
    ref_mean = ref_mean.view(5, 3, 16).permute(0, 2, 1)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(std[0, :, 0].double(), ref_std, rtol=1e-7, atol=0)
    kl = gaussian_kl(ref_mean, ref_std[None, :, None], mean.double(), std.double())
    assert kl.abs().max() < 1e-11

    # The batch path from the noise (no triangular solve) gives the same conditionals.
    eps = fam.noise(5, generator=torch.Generator().manual_seed(0))
    batch = fam.from_noise(eps)
    torch.testing.assert_close(batch["x"], x, rtol=0, atol=0)
    torch.testing.assert_close(batch["mean"], mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch["std"].expand_as(std), std, rtol=0, atol=0)


def test_conditional_entropy_is_the_chain_rule_of_the_joint_entropy():
    fam = GaussianFamily(3, copies=4)
    h = fam.conditional_entropy()
    assert h.shape == (64,)
    torch.testing.assert_close(h, 4 * 0.5 * torch.log(2 * math.pi * math.e * fam.conditional_std**2))
    joint = 4 * 0.5 * (64 * math.log(2 * math.pi * math.e) + torch.linalg.slogdet(fam.covariance).logabsdet)
    assert h.sum().item() == pytest.approx(joint.item(), rel=1e-12)


def test_empirical_covariance_matches_within_statistical_error():
    fam = GaussianFamily(2, copies=64)
    x = fam.sample(400, generator=torch.Generator().manual_seed(1))
    z = x[:, 1:].double().permute(0, 2, 1).reshape(-1, 16)  # N = 25,600 independent copies
    n = z.shape[0]
    empirical = z.T @ z / n  # known zero mean
    cov = fam.covariance
    # For zero-mean Gaussians Var(z_i z_j) = Σ_ii Σ_jj + Σ_ij², so each entry has this standard error.
    stderr = ((1 + cov**2) / n).sqrt()
    z_scores = (empirical - cov) / stderr
    assert z_scores.abs().max() < 5
    # And the errors really are of statistical size (not just small): mean squared z-score ≈ 1.
    assert 0.5 < (z_scores**2).mean() < 2


def test_subvolume_exponent_and_log_family_growth():
    levels = [2, 3, 4, 5, 6]
    lengths = np.array([4.0**k for k in levels])
    sub = [GaussianFamily(k, "subvolume", copies=1).bipartite_mi() for k in levels]
    beta, _, beta_err = fit_power_law(lengths, sub)
    assert 0.77 <= beta <= 0.82, (beta, beta_err)

    log_mi = np.array([GaussianFamily(k, "log", copies=1).bipartite_mi() for k in levels])
    increments = np.diff(log_mi)  # per factor 4 in L
    assert np.all(increments > 0)
    assert increments.max() / increments.min() < 1.05
    slope, intercept = np.polyfit(np.log(lengths), log_mi, 1)
    residual = log_mi - (slope * np.log(lengths) + intercept)
    r2 = 1 - residual @ residual / np.sum((log_mi - log_mi.mean()) ** 2)
    assert r2 > 0.999

    # Same two-point decay, completely different bipartite scaling.
    for k in levels[:4]:
        L = 4**k
        assert GaussianFamily(k, "log").two_point_mi(1, L) == pytest.approx(
            GaussianFamily(k, "subvolume").two_point_mi(1, L), rel=1e-12
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"levels": 0}, "levels must be an int in 1..8"),
        ({"levels": 9}, "levels must be an int in 1..8"),
        ({"levels": 2.0}, "levels"),
        ({"levels": True}, "levels"),
        ({"levels": 2, "kind": "volume"}, r"kind must be one of \('subvolume', 'log'\)"),
        ({"levels": 2, "copies": 0}, "copies must be an int >= 1"),
    ],
)
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianFamily(**kwargs)


def test_bad_arguments_raise():
    fam = GaussianFamily(2, copies=2)
    for split in (0, 16, 3.5):
        with pytest.raises(ValueError, match=r"split must be an int in 1\.\.15"):
            fam.bipartite_mi(split)
    with pytest.raises(ValueError, match=r"i must be a 1-based position in 1\.\.16"):
        fam.two_point_mi(0, 3)
    with pytest.raises(ValueError, match=r"j must be a 1-based position in 1\.\.16"):
        fam.two_point_mi(1, 17)
    with pytest.raises(ValueError, match="must differ"):
        fam.two_point_mi(4, 4)
    for shape in [(3, 16, 2), (3, 17, 3), (17, 2)]:
        with pytest.raises(ValueError, match=r"x must have shape \(batch, 17, 2\)"):
            fam.conditional(torch.zeros(shape))
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        fam.sample(0)


def test_levels_8_fails_fast_where_memory_is_short():
    with open("/proc/meminfo") as f:
        available = int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    if available > 1.6 * 8 * 65536**2:  # what building Σ at L = 65,536 asks for
        pytest.skip("this machine has the memory for levels=8")
    fam = GaussianFamily(8, copies=1)  # construction is free; the covariance is built lazily
    assert fam.seq_len == 65536
    with pytest.raises(MemoryError, match="L=65536 needs about"):
        fam.covariance


def test_mi_table_command(capsys):
    main(["--levels", "2-3"])
    out = capsys.readouterr().out
    assert "subvolume" in out and "log" in out
    assert "0.9013125395" in out and "0.3179587879" in out and "β =" in out


@run_if(cuda=True)
def test_batches_on_gpu_equal_cpu():
    fam = GaussianFamily(4, copies=8)
    eps = fam.noise(3, generator=torch.Generator().manual_seed(0))
    cpu, gpu = fam.from_noise(eps), fam.from_noise(eps.cuda())
    for key in ("x", "mean", "std"):
        assert gpu[key].device.type == "cuda"
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=0, atol=1e-6)
    mean, std = fam.conditional(gpu["x"])
    torch.testing.assert_close(mean.cpu(), cpu["mean"], rtol=0, atol=1e-5)


# --- exact references for bounded predictors (spec §6) ------------------------------------------

def _conditional(cov: torch.Tensor, target: int, given: list[int]) -> tuple[torch.Tensor, float]:
    """Regression weights and variance of z_target given z_given, by a direct Schur complement."""
    if not given:
        return torch.zeros(0, dtype=torch.float64), float(cov[target, target])
    s_gg = cov[given][:, given]
    s_tg = cov[target, given]
    weights = torch.linalg.solve(s_gg, s_tg)
    return weights, float(cov[target, target] - s_tg @ weights)


@pytest.mark.parametrize("kind", ["subvolume", "log"])
@pytest.mark.parametrize("copies", [1, 64])
def test_window_kl_equals_direct_schur_complements(kind, copies):
    fam = GaussianFamily(3, kind, copies)
    cov = fam.covariance
    for k in (0, 1, 3, 16, 63):
        expected = []
        for i in range(fam.seq_len):
            _, var_window = _conditional(cov, i, list(range(max(0, i - k), i)))
            _, var_all = _conditional(cov, i, list(range(i)))
            expected.append(copies * 0.5 * math.log(var_window / var_all))
        torch.testing.assert_close(fam.window_kl(k), torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    assert float(fam.window_kl(63).abs().max()) == 0.0  # the whole past: the exact conditional


@pytest.mark.parametrize("kind", ["subvolume", "log"])
def test_window_prediction_is_the_direct_regression_on_the_last_k_tokens(kind):
    fam = GaussianFamily(3, kind, copies=2)
    cov, x = fam.covariance, fam.sample(3, torch.Generator().manual_seed(1))
    z = x[:, 1:].double()
    for k in (0, 1, 3, 16):
        mean, std = fam.window_prediction(k, x)
        assert mean.shape == (3, 64, 2) and std.shape == (1, 64, 2) and mean.dtype == torch.float64
        for i in range(fam.seq_len):
            given = list(range(max(0, i - k), i))
            weights, variance = _conditional(cov, i, given)
            expected = torch.einsum("bjc,j->bc", z[:, given], weights) if given else torch.zeros(3, 2, dtype=torch.float64)
            torch.testing.assert_close(mean[:, i], expected, rtol=0, atol=1e-12)
            assert float(std[0, i, 0]) ** 2 == pytest.approx(variance, abs=1e-12)
    # with the whole past it is the exact conditional the batches carry
    mean, _ = fam.window_prediction(63, x)
    torch.testing.assert_close(mean.float(), fam.conditional(x)[0], rtol=0, atol=1e-5)


def _inverse_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values**-0.5) @ vectors.T


@pytest.mark.parametrize("kind", ["subvolume", "log"])
@pytest.mark.parametrize("split", [1, 5, 8, 13])
def test_canonical_correlations_equal_svd_of_the_whitened_cross_covariance(kind, split):
    fam = GaussianFamily(2, kind, copies=64)  # L = 16
    cov = fam.covariance
    whitened = _inverse_sqrt(cov[:split, :split]) @ cov[:split, split:] @ _inverse_sqrt(cov[split:, split:])
    expected = torch.linalg.svdvals(whitened)
    torch.testing.assert_close(fam.canonical_correlations(split), expected, rtol=1e-10, atol=1e-12)
    # the whole spectrum gives back I_BP, per copy
    i_bp = float(-0.5 * torch.log1p(-fam.canonical_correlations(split) ** 2).sum())
    assert 64 * i_bp == pytest.approx(fam.bipartite_mi(split), rel=1e-10)


def test_linear_state_bound_takes_the_largest_directions_of_all_copies_together():
    one, many = GaussianFamily(3, copies=1), GaussianFamily(3, copies=3)
    values = -0.5 * torch.log1p(-one.canonical_correlations() ** 2)  # descending
    assert one.linear_state_bound(0) == pytest.approx(one.bipartite_mi(), rel=1e-12)
    assert one.linear_state_bound(2) == pytest.approx(one.bipartite_mi() - float(values[:2].sum()), rel=1e-12)
    # 3 copies share the spectrum: the 4 largest values of the union are v1, v1, v1, v2
    assert many.linear_state_bound(4) == pytest.approx(many.bipartite_mi() - float(3 * values[0] + values[1]), rel=1e-12)
    assert many.linear_state_bound(3 * 32) == 0.0 and one.linear_state_bound(10**6) == 0.0
    bounds = [one.linear_state_bound(d) for d in range(12)]
    assert all(a >= b for a, b in zip(bounds, bounds[1:]))


def _gaussian_kl(mean_q, var_q, mean_p, var_p):
    return 0.5 * torch.log(var_q / var_p) + (var_p + (mean_q - mean_p) ** 2) / (2 * var_q) - 0.5


def test_exact_window_predictor_reaches_window_kl_on_samples():
    fam = GaussianFamily(2, copies=1)  # L = 16
    cov, k = fam.covariance, 2
    z = fam.sample(20_000, torch.Generator().manual_seed(0))[:, 1:, 0].double()  # (N, L)
    total = torch.zeros(z.shape[0], dtype=torch.float64)
    for i in range(fam.seq_len):
        w_window, var_window = _conditional(cov, i, list(range(max(0, i - k), i)))
        w_all, var_all = _conditional(cov, i, list(range(i)))
        mean_window = z[:, max(0, i - k) : i] @ w_window
        mean_all = z[:, :i] @ w_all
        total += _gaussian_kl(mean_window, torch.tensor(var_window), mean_all, torch.tensor(var_all))
    assert float(total.mean()) == pytest.approx(float(fam.window_kl(k).sum()), abs=3 * float(total.std()) / 141)


@pytest.mark.parametrize("d", [1, 3])
def test_exact_predictor_through_the_top_canonical_directions_reaches_the_linear_state_bound(d):
    # s = the d leading canonical variates of X = z_1..z_8; each y_i is predicted exactly from (s, y_<i).
    fam = GaussianFamily(2, copies=1)  # L = 16, split 8
    cov, split = fam.covariance, 8
    u, _, _ = torch.linalg.svd(
        _inverse_sqrt(cov[:split, :split]) @ cov[:split, split:] @ _inverse_sqrt(cov[split:, split:])
    )
    project = _inverse_sqrt(cov[:split, :split]) @ u[:, :d]  # s = project^T x
    # joint covariance of (s, z): s is linear in z
    lift = torch.cat([torch.cat([project.T, torch.zeros(d, fam.seq_len - split, dtype=torch.float64)], 1),
                      torch.eye(fam.seq_len, dtype=torch.float64)])
    joint = lift @ cov @ lift.T
    z = fam.sample(20_000, torch.Generator().manual_seed(1))[:, 1:, 0].double()
    v = torch.cat([z[:, :split] @ project, z], dim=1)
    total = torch.zeros(z.shape[0], dtype=torch.float64)
    for i in range(split, fam.seq_len):
        given_state = list(range(d)) + [d + j for j in range(split, i)]
        w_state, var_state = _conditional(joint, d + i, given_state)
        w_all, var_all = _conditional(cov, i, list(range(i)))
        total += _gaussian_kl(v[:, given_state] @ w_state, torch.tensor(var_state), z[:, :i] @ w_all, torch.tensor(var_all))
    bound = fam.linear_state_bound(d, split)
    assert 0 < bound < fam.bipartite_mi(split)
    assert float(total.mean()) == pytest.approx(bound, abs=3 * float(total.std()) / 141)
