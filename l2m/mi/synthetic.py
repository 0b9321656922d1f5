"""Discrete sources whose bipartite MI is exactly computable: validation targets for the estimators.

`MarkovMixture`: every sequence draws a latent k ~ weights, then W_1 W_2 … is the stationary
Markov chain with transition matrix P_k (W_1 from its stationary law π_k). The latent carries
information from X to Y, so I_BP(ℓ; L) grows with L; exact values come from enumerating all V^L
sequences (kept small). `MarkovChain` is the one-component case, where the Markov property gives
closed forms: I_BP(ℓ; L) = I(W_ℓ; W_{ℓ+1}) for every ℓ, L.

Both are exact scorers too: `log_prob` runs the forward algorithm over the latent.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import logsumexp

from l2m.checks import UserError

MAX_ENUMERATION = 1 << 22  # sequences; V^L above this is refused


def _stationary(transition: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eig(transition.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
    return pi / pi.sum()


def _check_split(ell: int, seq_len: int) -> None:
    if not (1 <= ell < seq_len):
        raise UserError(f"split ell must lie in 1..L−1 = 1..{seq_len - 1}, got {ell}")


class MarkovMixture:
    """Mixture over a per-sequence latent of stationary Markov chains; transitions (K, V, V)."""

    def __init__(self, transitions, weights=None):
        p = np.asarray(transitions, dtype=np.float64)
        if p.ndim == 2:
            p = p[None]
        if p.ndim != 3 or p.shape[1] != p.shape[2]:
            raise UserError(f"transitions must have shape (K, V, V) or (V, V), got {p.shape}")
        if np.any(p <= 0) or not np.allclose(p.sum(-1), 1.0, atol=1e-10):
            raise UserError("transitions must be row-stochastic with all entries > 0 (every sequence possible)")
        w = np.full(p.shape[0], 1.0 / p.shape[0]) if weights is None else np.asarray(weights, np.float64)
        if w.shape != (p.shape[0],) or np.any(w <= 0) or not np.isclose(w.sum(), 1.0):
            raise UserError(f"weights must be {p.shape[0]} positive numbers summing to 1, got {w}")
        self.transitions = p
        self.weights = w
        self.stationary = np.stack([_stationary(pk) for pk in p])  # (K, V)
        self.vocab_size = p.shape[1]

    @property
    def n_components(self) -> int:
        return self.transitions.shape[0]

    # --- sampling and exact scoring -------------------------------------------------------
    def sample(self, n: int, seq_len: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, seq_len) int64 token ids."""
        if n < 1 or seq_len < 1:
            raise UserError(f"n and seq_len must be ≥ 1, got {n} and {seq_len}")
        weights = torch.from_numpy(self.weights)
        k = torch.multinomial(weights, n, replacement=True, generator=generator)
        start_cdf = torch.from_numpy(self.stationary).cumsum(-1)[k]  # (n, V)
        step_cdf = torch.from_numpy(self.transitions).cumsum(-1)[k]  # (n, V, V)
        u = torch.rand(seq_len, n, 1, generator=generator, dtype=torch.float64)
        out = torch.empty(n, seq_len, dtype=torch.int64)
        last = self.vocab_size - 1  # clamp guards against cdf rounding just below 1
        out[:, 0] = torch.searchsorted(start_cdf, u[0]).squeeze(1).clamp_(max=last)
        rows = torch.arange(n)
        for t in range(1, seq_len):
            cdf = step_cdf[rows, out[:, t - 1]]
            out[:, t] = torch.searchsorted(cdf, u[t]).squeeze(1).clamp_(max=last)
        return out

    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        """Exact log p(w_i | w_<i) for (B, T) ids → (B, T) float64 (forward algorithm over the latent)."""
        w = np.asarray(torch.as_tensor(tokens).cpu(), dtype=np.int64)
        if w.ndim != 2 or w.size == 0 or w.min() < 0 or w.max() >= self.vocab_size:
            raise UserError(f"tokens must be a non-empty (B, T) array of ids in [0, {self.vocab_size})")
        log_p = np.log(self.transitions)
        # log p_k(w_≤t): start term, then cumulative transition terms. (K, B, T)
        per_step = np.concatenate(
            [np.log(self.stationary)[:, w[:, 0]][..., None], log_p[:, w[:, :-1], w[:, 1:]]], axis=-1
        )
        joint = logsumexp(np.log(self.weights)[:, None, None] + np.cumsum(per_step, -1), axis=0)  # (B, T)
        return torch.from_numpy(np.diff(joint, axis=-1, prepend=0.0))

    # --- exact information quantities ------------------------------------------------------
    def _log_prob_all(self, seq_len: int) -> np.ndarray:
        """log p(w) of all V^seq_len sequences, index w_1·V^(n−1) + … + w_n."""
        v = self.vocab_size
        if v**seq_len > MAX_ENUMERATION:
            raise UserError(
                f"exact values enumerate V^L = {v}^{seq_len} sequences, more than {MAX_ENUMERATION}; "
                "use a smaller L or vocabulary"
            )
        log_p = np.log(self.transitions)
        per_k = np.log(self.stationary)  # (K, V^1)
        for _ in range(seq_len - 1):
            last = np.arange(per_k.shape[1]) % v
            per_k = (per_k[:, :, None] + log_p[:, last, :]).reshape(self.n_components, -1)
        return logsumexp(np.log(self.weights)[:, None] + per_k, axis=0)

    def _split_tables(self, ell: int, seq_len: int):
        _check_split(ell, seq_len)
        log_xy = self._log_prob_all(seq_len).reshape(self.vocab_size**ell, -1)  # (V^ℓ, V^(L−ℓ))
        log_x = logsumexp(log_xy, axis=1, keepdims=True)
        log_y = logsumexp(log_xy, axis=0, keepdims=True)
        return log_xy, log_x, log_y

    def bipartite_mi(self, ell: int, seq_len: int) -> float:
        """Exact I(W_1..W_ℓ; W_ℓ+1..W_L) in nats."""
        log_xy, log_x, log_y = self._split_tables(ell, seq_len)
        return float(np.sum(np.exp(log_xy) * (log_xy - log_x - log_y)))

    def vclub_limit(self, ell: int, seq_len: int) -> float:
        """What vCLUB converges to with the exact scorer: E_p(x,y) log p(y|x) − E_p(x)p(y) log p(y|x).

        This is I_BP + KL(p(x)p(y) ‖ p(x,y)) ≥ I_BP (CLUB is an upper bound): the gap is the
        lautum information, comparable to I_BP itself when the dependence is weak.
        """
        log_xy, log_x, log_y = self._split_tables(ell, seq_len)
        log_y_given_x = log_xy - log_x
        return float(np.sum((np.exp(log_xy) - np.exp(log_x + log_y)) * log_y_given_x))

    def two_point_mi(self, d: int) -> float:
        """Exact I(W_i; W_{i+d}) in nats."""
        if d < 1:
            raise UserError(f"distance d must be ≥ 1, got {d}")
        joint = sum(
            w * pi[:, None] * np.linalg.matrix_power(p, d)
            for w, pi, p in zip(self.weights, self.stationary, self.transitions)
        )
        marginal = joint.sum(1)  # stationary: the same law for W_i and W_{i+d}
        return float(np.sum(joint * np.log(joint / np.outer(marginal, marginal))))


class MarkovChain(MarkovMixture):
    """Stationary Markov chain with transition matrix (V, V): closed-form exact quantities."""

    def __init__(self, transition):
        transition = np.asarray(transition, dtype=np.float64)
        if transition.ndim != 2:
            raise UserError(f"transition must have shape (V, V), got {transition.shape}")
        super().__init__(transition[None])

    def bipartite_mi(self, ell: int, seq_len: int) -> float:
        """I_BP(ℓ; L) = I(W_ℓ; W_ℓ+1) by the Markov property, independent of ℓ and L."""
        _check_split(ell, seq_len)
        return self.two_point_mi(1)

    def vclub_limit(self, ell: int, seq_len: int) -> float:
        """I(W_ℓ; W_ℓ+1) + Σ_a π_a Σ_b π_b log(π_b / P_ab): only the first transition of Y differs."""
        _check_split(ell, seq_len)
        pi, p = self.stationary[0], self.transitions[0]
        return self.two_point_mi(1) + float(pi @ np.log(pi[None, :] / p) @ pi)


def example_source(name: str) -> MarkovMixture:
    """Built-in validation sources: "markov" (a 3-state chain, I_BP constant in L) and "mixture"
    (a sticky and a switchy 2-state chain picked per sequence, I_BP growing with L)."""
    if name == "markov":
        return MarkovChain([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    if name == "mixture":
        return MarkovMixture([[[0.9, 0.1], [0.2, 0.8]], [[0.3, 0.7], [0.6, 0.4]]], weights=[0.4, 0.6])
    raise UserError(f"unknown exact source {name!r}; available: markov, mixture")
