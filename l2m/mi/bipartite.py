"""Bipartite MI I_BP(ℓ; L) of samples, with a causal LM q as density estimator (spec §5).

For each sample W_1..W_L, X = W_1..W_ℓ and Y = W_ℓ+1..W_L:
* direct:  I ≈ mean[log q(Y|X) − log q(Y)], where q(Y) scores Y after BOS. Y then starts
  mid-sentence, so the cross-entropy h₂ = −log q(Y₁Y₂) of its first two tokens is replaced by
  ⅕·h₂ + ⅘·Ĥ_G(Y₁Y₂), the Grassberger 2-gram entropy from corpus counts.
* vCLUB:   I ≈ mean[log q(Y|X)] − mean[log q(Y'|X)], Y' the second half of another sample.

Standard errors. The direct estimator's terms are independent across samples: SE = sd/√N.
vCLUB's are not: the partners follow one random cycle through the samples, so Y_j enters its own
term (+) and its predecessor's (−), and neighbours on the cycle covary. Its variance is the sum of
the terms' variances plus twice their covariance along the cycle (lag 1; terms further apart
share no sample), which the independent-samples formula overstated about 2× (calibrated on
replicate data sets from the exact sources in tests/test_mi.py).

Forward passes. Splits (ℓ, L = rℓ) for all ratios r reuse the same samples' prefixes, and a
causal model's pass over a sequence scores every prefix of it, so per sample:
* one pass over W_1..W_Lmax gives log q(Y|X) for every split (sums of its per-token terms);
* per distinct ℓ, one pass over BOS + W_ℓ+1..W_rmax·ℓ gives log q(Y) for every ratio;
* per distinct ℓ, one pass over X + Y'_ℓ+1..rmax·ℓ gives log q(Y'|X) for every ratio.
That is 1 + 2·|ℓ values| sequences per sample, against 1 + 2·|splits| per sample of each length
L when every length is scored on its own (the paper's script): Σ_L (1 + 2·|splits of L|).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from l2m.checks import UserError
from l2m.fit import fit_power_law
from l2m.mi.scorers import Scorer

CORRECTION_WEIGHT = 0.8  # share of h₂ replaced by the corpus 2-gram entropy (spec §5)


@dataclass
class SplitEstimate:
    ell: int
    seq_len: int
    n: int
    direct: float
    direct_se: float
    direct_uncorrected: float
    direct_uncorrected_se: float
    vclub: float
    vclub_se: float


@dataclass
class BipartiteResult:
    splits: list[SplitEstimate]
    dropped: list[tuple[int, int]]  # (ℓ, L) pairs the samples were too short for
    fits: dict = field(default_factory=dict)  # estimator → ratio → {beta, beta_se, prefactor, points}
    passes: int = 0
    passes_paper: int = 0  # N · Σ_L (1 + 2·|splits of length L|): every length scored on its own
    tokens: int = 0
    tokens_paper: int = 0  # tokens that scoring every length on its own would read
    seconds: float = 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["tokens_per_s"] = self.tokens / self.seconds if self.seconds > 0 else None
        return out


def default_splits(seq_len: int, min_ratio: int = 2) -> list[int]:
    """ℓ = 2, 4, 8, … with min_ratio·ℓ ≤ seq_len."""
    splits, ell = [], 2
    while min_ratio * ell <= seq_len:
        splits.append(ell)
        ell *= 2
    return splits


def _derangement(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random permutation without fixed points (a random cycle through all samples)."""
    order = torch.randperm(n, generator=generator)
    target = torch.empty(n, dtype=torch.long)
    target[order] = order.roll(-1)
    return target


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


def _cycle_mean_se(values: np.ndarray, partner: np.ndarray) -> tuple[float, float]:
    """Mean of terms that covary with their partner's term only (one cycle through them): SE from
    the variance of the sum, Σ c_i² + 2 Σ c_i c_partner(i), c the centred terms. Where that
    estimate is not positive (a handful of samples), the independent-samples SE, which the
    negative covariance makes an upper bound."""
    centred = values - values.mean()
    variance = (centred @ centred + 2 * centred @ centred[partner]) / (values.size - 1)
    if variance <= 0:
        return _mean_se(values)
    return float(values.mean()), float(np.sqrt(variance / values.size))


def _fit(splits: list[SplitEstimate], estimator: str) -> dict:
    """β per ratio r = L/ℓ: weighted least squares of log I on log L over the splits with I > 0,
    the points' standard errors carried into β's."""
    fits = {}
    for r in sorted({s.seq_len // s.ell for s in splits}):
        pts = [(s.seq_len, getattr(s, estimator), getattr(s, f"{estimator}_se")) for s in splits if s.seq_len == r * s.ell]
        good = [(x, y, se) for x, y, se in pts if y > 0]
        entry = {"points": len(good), "nonpositive_dropped": len(pts) - len(good)}
        if len(good) >= 2:
            x, y, se = zip(*good)
            # A zero SE (e.g. identical samples) gives no weight: then ordinary least squares.
            beta, prefactor, beta_se = fit_power_law(x, y, y_stderr=se if min(se) > 0 else None)
            entry.update(beta=beta, beta_se=beta_se, prefactor=prefactor)
        fits[r] = entry
    return fits


def bipartite_mi(
    scorer: Scorer,
    samples: torch.Tensor,
    splits: list[int] | None = None,
    ratios: tuple[int, ...] = (2, 3, 4),
    bigram_entropy: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    progress: Callable | None = None,
) -> BipartiteResult:
    """Direct and vCLUB estimates of I_BP(ℓ; rℓ) for every split ℓ and ratio r.

    samples: (N, T) token ids, N ≥ 2. splits: ℓ values (default 2, 4, … that fit T). Splits
    with rℓ > T are dropped (warned and listed in `dropped`). bigram_entropy: (Ĥ_G(Y₁Y₂), SE)
    for the 2-gram correction of the direct estimator; without it `direct` is uncorrected.
    progress: optional wrapper of an iterable (e.g. a progress bar).
    """
    samples = torch.as_tensor(samples)
    if samples.ndim != 2 or samples.shape[0] < 2:
        raise ValueError(f"samples must be (N, T) token ids with N ≥ 2, got shape {tuple(samples.shape)}")
    if not ratios or any(int(r) != r or r < 2 for r in ratios):
        raise UserError(f"ratios L/ℓ must be integers ≥ 2, got {ratios}")
    n, length = samples.shape
    splits = default_splits(length, min(ratios)) if splits is None else sorted(set(splits))
    if not splits or min(splits) < 2:
        raise UserError(f"splits must be integers ≥ 2 (Y needs two tokens); samples of {length} tokens allow ℓ ≤ {length // 2}")
    wanted = [(ell, r * ell) for ell in splits for r in sorted(ratios)]
    kept = [(ell, seq) for ell, seq in wanted if seq <= length]
    dropped = [(ell, seq) for ell, seq in wanted if seq > length]
    if dropped:
        warnings.warn(f"samples have {length} tokens: dropped {len(dropped)} of {len(wanted)} splits (ℓ, L) = {dropped}")
    if not kept:
        raise UserError(f"samples of {length} tokens are shorter than every split L = rℓ requested ({wanted})")

    passes_before, tokens_before, seconds_before = scorer.sequences, scorer.tokens, scorer.seconds
    max_len = max(seq for _, seq in kept)
    conditional = scorer(samples[:, :max_len]).numpy()  # log q(w_i | w_<i), (N, Lmax)
    prefix = np.concatenate([np.zeros((n, 1)), np.cumsum(conditional, axis=1)], axis=1)
    partner = _derangement(n, generator)
    partner_ids = partner.numpy()

    estimates = []
    ells = sorted({ell for ell, _ in kept})
    for ell in progress(ells) if progress else ells:
        end = max(seq for e, seq in kept if e == ell)
        marginal = scorer(samples[:, ell:end]).numpy()  # log q(y_j | BOS, y_<j), (N, end − ℓ)
        crossed = torch.cat([samples[:, :ell], samples[partner, ell:end]], dim=1)
        shuffled = scorer(crossed).numpy()[:, ell:]  # log q(y'_j | x, y'_<j)
        h2 = -(marginal[:, 0] + marginal[:, 1])
        for seq in sorted(seq for e, seq in kept if e == ell):
            log_y_given_x = prefix[:, seq] - prefix[:, ell]
            raw = log_y_given_x - marginal[:, : seq - ell].sum(1)
            raw_mean, raw_se = _mean_se(raw)
            direct, direct_se = raw_mean, raw_se
            if bigram_entropy is not None:
                h_g, h_g_se = bigram_entropy
                direct, direct_se = _mean_se(raw - CORRECTION_WEIGHT * (h2 - h_g))
                direct_se = float(np.hypot(direct_se, CORRECTION_WEIGHT * h_g_se))
            vclub, vclub_se = _cycle_mean_se(log_y_given_x - shuffled[:, : seq - ell].sum(1), partner_ids)
            estimates.append(SplitEstimate(ell, seq, n, direct, direct_se, raw_mean, raw_se, vclub, vclub_se))

    result = BipartiteResult(
        splits=estimates,
        dropped=dropped,
        passes=scorer.sequences - passes_before,
        passes_paper=n * (len({seq for _, seq in kept}) + 2 * len(kept)),
        tokens_paper=n * (sum({seq for _, seq in kept}) + sum(2 * seq - ell for ell, seq in kept)),
        tokens=scorer.tokens - tokens_before,
        seconds=scorer.seconds - seconds_before,
    )
    result.fits = {name: _fit(estimates, name) for name in ("direct", "direct_uncorrected", "vclub")}
    return result
