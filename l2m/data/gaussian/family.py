"""The sub-volume Gaussian family: synthetic sequences whose mutual information is known exactly.

One copy is a zero-mean, unit-variance Gaussian vector of length L = 4**levels built by a
hierarchy of 4×4 rotations (spec §2). Its covariance Σ is built directly in covariance form,
level by level, with Kronecker products; everything else follows from Σ and its Cholesky
factor R (Σ = R Rᵀ, R lower triangular):

* bipartite MI   I(X;Y) = ½ [log det Σ_XX + log det Σ_YY − log det Σ]
* two-point MI   I(Z_i; Z_j) = −½ log(1 − Σ_ij²)
* sampling       z = R ε,  ε ~ N(0, I)
* conditionals   p(z_i | z_<i) = N(μ_i, σ_i²),  σ_i = R_ii,  μ = z − σ ⊙ (R⁻¹ z)
                 (= z − σ ⊙ ε for a sample drawn from its noise ε: no solve needed).

Σ and R are float64, computed once per (levels, kind) and shared by every instance, whatever
its `copies`. They are cached: treat `.covariance` and `.cholesky` as read-only.

Cost of the one-off build of Σ and R (float64; one L×L matrix is 8·L² bytes), measured on a
2-core CPU; resident memory of the process at its peak:

=======  =======  ==========  ==================================================
levels   L        one matrix  build
=======  =======  ==========  ==================================================
6        4,096    134 MB      ~1 s, 0.7 GB
7        16,384   2.1 GB      Σ ~9 s + Cholesky ~50 s; 4.8 GB peak, 4.3 GB cached
8        65,536   34 GB       Σ + R need ~75 GB of RAM and ~1 h on 2 cores (64× the
                              flops of levels 7); where memory is short, accessing
                              Σ raises MemoryError at once, with the numbers
=======  =======  ==========  ==================================================

A batch of B sequences costs one (L×L)·(L×B·copies) product, no O(L³) work: at levels 7,
B = 4 and 64 copies that is 137 GFLOP, ~6 s on the 2-core CPU (`sample` / `from_noise`).
"""

from __future__ import annotations

import functools
import math

import torch

from l2m.checks import UserError, check_int

KINDS = ("subvolume", "log")
MAX_LEVELS = 8

_GAMMA = math.sqrt(5.0) / 4.0
_RHO = 0.25
# Rows are unit vectors, so every level keeps unit variances.
_M = torch.tensor(
    [
        [_GAMMA, _GAMMA, _GAMMA, _RHO],
        [-_GAMMA, _GAMMA, -_GAMMA, _RHO],
        [-_GAMMA, -_GAMMA, _GAMMA, _RHO],
        [_GAMMA, -_GAMMA, -_GAMMA, _RHO],
    ],
    dtype=torch.float64,
)


def _validate(levels, kind, copies) -> None:
    check_int("levels", levels, 1, MAX_LEVELS)
    if kind not in KINDS:
        raise UserError(f"kind must be one of {KINDS}, got {kind!r}")
    check_int("copies", copies)


def levels_of_length(seq_len: object) -> int:
    """The `levels` of the family member of length seq_len (L = 4**levels), or a ValueError listing them."""
    lengths = {4**levels: levels for levels in range(1, MAX_LEVELS + 1)}
    if seq_len not in lengths:
        raise UserError(
            f"seq_len={seq_len} is not a length of the Gaussian family, whose lengths are "
            f"L = 4**levels: {', '.join(map(str, lengths))} (levels=1..{MAX_LEVELS})"
        )
    return lengths[seq_len]


def available_memory() -> int | None:
    """Bytes of memory available to this process (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: nothing to check against
        return None


def _require_memory(n_matrices: float, seq_len: int, what: str) -> None:
    """Fail fast, with the numbers, instead of letting the OS kill the process mid-build."""
    needed = n_matrices * 8 * seq_len**2
    available = available_memory()
    if available is not None and needed > available:
        raise MemoryError(
            f"{what} for L={seq_len} needs about {needed / 1e9:.0f} GB of memory (float64 L×L "
            f"matrices), only {available / 1e9:.0f} GB available; use fewer levels "
            f"(levels=7, L=16,384 needs ~5 GB) or a machine with more memory"
        )


def _level_blocks(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with Σ_k = Σ_{k−1} ⊗ A + I_n ⊗ B (spec §2, steps 1–2 in covariance form)."""
    gram = _M @ _M.T
    if kind == "subvolume":  # rows (Y¹_i, Y²_i, Y³_i, W_i): three copies share Σ_{k−1}
        fresh = _RHO**2 * torch.ones(4, 4, dtype=torch.float64)
    else:  # rows (Y_i, W_i1, W_i2, W_i3): one copy, three fresh variables
        m = _M[:, :1]
        fresh = gram - m @ m.T
    return gram - fresh, fresh


def _couple_pairs(
    first: torch.Tensor, second: torch.Tensor, t_diag: torch.Tensor, t_off: torch.Tensor, dim: int
) -> None:
    """In place: (first, second) ← T (first, second) along `dim` for all disjoint pairs at once."""
    shape = [1, 1]
    shape[dim] = -1  # broadcast the per-pair coefficients along the pair index
    td, to = t_diag.view(shape), t_off.view(shape)
    old_first = first.clone()
    first.mul_(td).add_(second * to)
    second.mul_(td).add_(old_first.mul_(to))


@functools.lru_cache(maxsize=2 * MAX_LEVELS)
def _covariance(levels: int, kind: str) -> torch.Tensor:
    """Σ of one copy, (L, L) float64. Recursion reuses the cached smaller levels."""
    if levels == 1:
        return _M @ _M.T
    n, seq_len = 4 ** (levels - 1), 4**levels
    # Before recursing, fail fast. Peak of the build: Σ plus the coupling's half-size temporaries.
    _require_memory(1.6, seq_len, "the covariance")
    prev = _covariance(levels - 1, kind)
    a, b = _level_blocks(kind)
    # Steps 1–2: Σ[(i,p),(j,q)] = Σ_{k−1}[i,j] A[p,q] + δ_ij B[p,q], written straight into (n,4,n,4).
    cov = prev[:, None, :, None] * a[None, :, None, :]
    cov.diagonal(dim1=0, dim2=2).add_(b[..., None])
    cov = cov.view(seq_len, seq_len)

    # Step 3: couple (Z_{i,4}, Z_{i+1,1}) for i = 1..n−1, pairs (4i+3, 4i+4) in 0-based indices.
    p = 4 * torch.arange(n - 1) + 3  # Z_{i,4}
    q = p + 1  # Z_{i+1,1}
    c0, c_left, c_right = cov[p, q], cov[p - 1, p], cov[q, q + 1]  # unit variances: cov = corr
    c1 = 0.4 * (c_left + c_right) + 0.2 * c0
    # T = C1^{1/2} C0^{−1/2}, diagonal in the basis (1,1)/√2, (1,−1)/√2.
    s_plus = torch.sqrt((1 + c1) / (1 + c0))
    s_minus = torch.sqrt((1 - c1) / (1 - c0))
    t_diag, t_off = (s_plus + s_minus) / 2, (s_plus - s_minus) / 2
    rows = cov.view(n, 4, seq_len)
    _couple_pairs(rows[:-1, 3], rows[1:, 0], t_diag, t_off, dim=0)  # Σ ← T Σ
    cols = cov.view(seq_len, n, 4)
    _couple_pairs(cols[:, :-1, 3], cols[:, 1:, 0], t_diag, t_off, dim=1)  # Σ ← Σ Tᵀ
    return cov


@functools.lru_cache(maxsize=4)
def _cholesky(levels: int, kind: str) -> torch.Tensor:
    cov = _covariance(levels, kind)
    _require_memory(1.1, cov.shape[0], "the Cholesky factor")  # R is one more L×L matrix
    return torch.linalg.cholesky(cov)


_WINDOW_VARIANCES: dict[tuple[int, str], torch.Tensor] = {}  # the widest computed per family


def _window_variances(levels: int, kind: str, max_window: int) -> torch.Tensor:
    """(L, max_window + 1) float64: Var(z_i | the last k tokens) for k = 0..max_window (one copy),
    cut from the widest table computed so far for this family."""
    cached = _WINDOW_VARIANCES.get((levels, kind))
    if cached is None or cached.shape[1] <= max_window:
        cached = _WINDOW_VARIANCES[(levels, kind)] = _compute_window_variances(levels, kind, max_window)
    return cached[:, : max_window + 1]


def _past_blocks(levels: int, kind: str, k: int):
    """For chunks of positions, nearest first: (first position, Cholesky factors C of Cov(past) (n, k, k),
    w = C⁻¹ Cov(past, z_i) (n, k)). Positions with a shorter past pad it with independent unit
    variables (w_j = 0 there). Chunks keep each batch of k×k blocks near 64 MB; cost L·k³/3 flops."""
    cov = _covariance(levels, kind)
    seq_len = cov.shape[0]
    padded = torch.eye(seq_len + k, dtype=torch.float64)  # k independent unit variables first
    padded[k:, k:] = cov
    chunk = max(1, (64 << 20) // (8 * max(k, 1) ** 2))
    for start in range(0, seq_len, chunk):
        i = torch.arange(start, min(start + chunk, seq_len)) + k  # positions in the padded matrix
        past = i[:, None] - 1 - torch.arange(k)  # (n, k): nearest first
        factors = torch.linalg.cholesky(padded[past[:, :, None], past[:, None, :]])  # (n, k, k)
        cross = padded[past, i[:, None]]  # (n, k)
        yield start, factors, torch.linalg.solve_triangular(factors, cross[..., None], upper=False)[..., 0]


def _compute_window_variances(levels: int, kind: str, max_window: int) -> torch.Tensor:
    """Var(z_i | the last k tokens) for k = 0..max_window, (L, max_window + 1) (one copy).

    C whitens each position's past nearest-first, so w = C⁻¹ Cov(past, z_i) gives every window at
    once: Var(z_i | last k) = 1 − Σ_{j≤k} w_j².
    """
    seq_len = 4**levels
    out = torch.ones(seq_len, max_window + 1, dtype=torch.float64)
    for start, _, w in _past_blocks(levels, kind, max_window):
        out[start : start + len(w), 1:] = 1.0 - torch.cumsum(w**2, dim=1)
    return out


@functools.lru_cache(maxsize=8)
def _window_coefficients(levels: int, kind: str, k: int) -> torch.Tensor:
    """(L, k) float64: β_i with E[z_i | the last k tokens] = Σ_j β_ij z_{i−1−j} (nearest first):
    β = C⁻ᵀ w from the same factors as the variances."""
    out = torch.zeros(4**levels, k, dtype=torch.float64)
    for start, factors, w in _past_blocks(levels, kind, k):
        beta = torch.linalg.solve_triangular(factors.transpose(-1, -2), w[..., None], upper=True)[..., 0]
        out[start : start + len(w)] = beta
    return out


def _whitened_cross(levels: int, kind: str, split: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_X (the Cholesky factor of Σ_XX), L_X⁻¹ Σ_XY and K = L_X⁻¹ Σ_XY L_Y⁻ᵀ for X = z_1..z_split,
    Y = the rest (one copy): K's singular values are the canonical correlations."""
    cov = _covariance(levels, kind)
    left = _cholesky(levels, kind)[:split, :split]  # the leading block of R factors Σ_XX
    right = torch.linalg.cholesky(cov[split:, split:])
    cross = torch.linalg.solve_triangular(left, cov[:split, split:], upper=False)  # L_X⁻¹ Σ_XY
    return left, cross, torch.linalg.solve_triangular(right, cross.T, upper=False).T  # ... L_Y⁻ᵀ


@functools.lru_cache(maxsize=64)
def _canonical_correlations(levels: int, kind: str, split: int) -> torch.Tensor:
    return torch.linalg.svdvals(_whitened_cross(levels, kind, split)[2]).clamp(max=1.0 - 1e-15)


@functools.lru_cache(maxsize=8)
def _linear_state_factors(levels: int, kind: str, split: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best state of d scalars linear in X = z_1..z_split (one copy): its map A (d, split), s = A X
    along the d leading canonical directions (Cov(s) = I), and the Cholesky factor of Cov([s; Y])."""
    cov = _covariance(levels, kind)
    left, cross, k = _whitened_cross(levels, kind, split)
    directions = torch.linalg.svd(k, full_matrices=False).U[:, :d]  # (split, d), whitened coordinates
    state_map = torch.linalg.solve_triangular(left.T, directions, upper=True).T  # (d, split): s = uᵀ L_X⁻¹ X
    state_y = directions.T @ cross  # (d, L − split): Cov(s, Y)
    joint = torch.cat([torch.cat([torch.eye(d, dtype=torch.float64), state_y], 1),
                       torch.cat([state_y.T, cov[split:, split:]], 1)])
    return state_map, torch.linalg.cholesky(joint)


class GaussianFamily:
    """`copies` independent copies of the sub-volume (or log) Gaussian sequence of length 4**levels.

    Token i of a sequence is the vector (Z_i of copy 1, ..., Z_i of copy `copies`); every copy
    shares Σ, so all MI values and entropies are `copies` times those of one copy.

    >>> fam = GaussianFamily(3)              # L = 64, 64 copies
    >>> x = fam.sample(4)                    # (4, 65, 64) float32, x[:, 0] == 0 (BOS)
    >>> mean, std = fam.conditional(x)       # exact p(z_i | z_<i), each (4, 64, 64)
    >>> fam.bipartite_mi(), fam.two_point_mi(1, 64)   # nats, all copies
    """

    def __init__(self, levels: int, kind: str = "subvolume", copies: int = 64):
        _validate(levels, kind, copies)
        self.levels, self.kind, self.copies = levels, kind, copies
        self.seq_len = 4**levels
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        # DataLoader workers get the family pickled: leave the device copies of R behind.
        return {**self.__dict__, "_on_device": {}}

    def __repr__(self) -> str:
        return f"GaussianFamily(levels={self.levels}, kind={self.kind!r}, copies={self.copies})"

    @property
    def covariance(self) -> torch.Tensor:
        """Σ of one copy, (L, L) float64, unit diagonal. Shared cache: do not modify in place."""
        return _covariance(self.levels, self.kind)

    @property
    def cholesky(self) -> torch.Tensor:
        """Lower-triangular R with Σ = R Rᵀ, (L, L) float64. Shared cache: do not modify in place."""
        return _cholesky(self.levels, self.kind)

    @property
    def conditional_std(self) -> torch.Tensor:
        """(L,) float64: σ_i = R_ii, the std of p(z_i | z_<i) (the same for every sequence)."""
        return self.cholesky.diagonal()

    # ---- exact information quantities ----

    def bipartite_mi(self, split: int | None = None) -> float:
        """I(Z_1..Z_split ; Z_split+1..Z_L) in nats for all copies; default split = L/2."""
        split = self.seq_len // 2 if split is None else split
        check_int("split", split, 1, self.seq_len - 1)
        # log det of the leading m×m block is 2 Σ_{i≤m} log R_ii. Σ is persymmetric
        # (Σ_ij = Σ_{L+1−i, L+1−j}: reversing a sequence maps the family onto itself), so the
        # trailing block Σ_YY of size L − split has the determinant of the leading one.
        log_det_leading = 2 * torch.cumsum(self.conditional_std.log(), 0)
        log_det_x = log_det_leading[split - 1]
        log_det_y = log_det_leading[self.seq_len - split - 1]
        return self.copies * 0.5 * float(log_det_x + log_det_y - log_det_leading[-1])

    def two_point_mi(self, i: int, j: int) -> float:
        """I(Z_i; Z_j) in nats for all copies; positions are 1-based and must differ."""
        for name, pos in (("i", i), ("j", j)):
            check_int(name, pos, 1, self.seq_len, what="a 1-based position")
        if i == j:
            raise UserError(f"i and j must differ (the MI of a variable with itself is infinite), got {i}")
        rho = float(self.covariance[i - 1, j - 1])
        return self.copies * -0.5 * math.log1p(-rho * rho)

    # ---- exact references for bounded predictors (spec §6) ----

    def window_kl(self, k: int) -> torch.Tensor:
        """(L,) float64: expected KL_i, nats summed over copies, of the best predictor of z_i that
        sees only the last k tokens (k = 0: none): ½ log(σ²_{i | last k} / σ²_{i | all past}) per
        copy. The exact floor of a sliding-window model of window k. Cost: L·k³/3 flops."""
        check_int("k", k, 0, self.seq_len - 1)
        variances = _window_variances(self.levels, self.kind, k)[:, k]
        kl = (self.copies * 0.5 * (variances.log() - 2 * self.conditional_std.log())).clamp(min=0.0)
        kl[: k + 1] = 0.0  # positions whose whole past fits in the window: exactly 0, not rounding
        return kl

    def window_prediction(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best predictor of each z_i that sees only the last k tokens, on sequences x shaped like
        `sample`'s output (B, L+1, copies): its (mean (B, L, copies), std (1, L, copies)), float64 on
        x.device. Averaged over sequences its KL to the exact conditional is `window_kl(k)`; on a
        fixed held-out set it is that set's own floor for a window-k model. Cost: L·k³/3 flops once
        per k, then B·L·copies·k."""
        check_int("k", k, 0, self.seq_len - 1)
        if x.dim() != 3 or x.shape[1:] != (self.seq_len + 1, self.copies):
            raise UserError(f"x must have shape (batch, {self.seq_len + 1}, {self.copies}) = (batch, L+1, copies) "
                            f"with BOS at index 0, got {tuple(x.shape)}")
        z = x[:, 1:].to(torch.float64)  # (B, L, copies)
        variance = _window_variances(self.levels, self.kind, k)[:, k].to(z.device)  # (L,)
        mean = torch.zeros_like(z)
        if k:
            beta = _window_coefficients(self.levels, self.kind, k).to(z.device)  # (L, k)
            for j in range(k):  # z_{i-1-j}, zero before the sequence
                mean[:, j + 1 :] += beta[j + 1 :, j, None] * z[:, : self.seq_len - 1 - j]
        return mean, variance.sqrt()[None, :, None].expand(1, self.seq_len, self.copies)

    def canonical_correlations(self, split: int | None = None) -> torch.Tensor:
        """Canonical correlations ρ_1 ≥ ρ_2 ≥ ... (float64) between X = z_1..z_split and
        Y = z_split+1..z_L of one copy (default split L/2): −½ Σ log(1 − ρ²) = I_BP(split; L) per copy."""
        split = self.seq_len // 2 if split is None else check_int("split", split, 1, self.seq_len - 1)
        return _canonical_correlations(self.levels, self.kind, split)

    def linear_state_bound(self, d: int, split: int | None = None) -> float:
        """Least expected KL, summed over positions split+1..L and over copies (default split L/2),
        of any predictor whose only access to X = z_1..z_split is a d-dimensional linear function of
        X: the sum of all copies' −½ log(1 − ρ²) but the d largest (I_BP(split; L) less what d
        scalars can carry).

        The exact Gaussian form of the L²M capacity bound for a state of d scalars. A nonlinear
        state (Mamba's is linear in its inputs only given its input-dependent gates) is not strictly
        held to it: it is what a state of that size can carry linearly.
        """
        check_int("d", d, 0)
        per_direction = -0.5 * torch.log1p(-self.canonical_correlations(split) ** 2)  # descending
        # The sum of the terms not carried, not I_BP less those carried: no cancellation, so a state
        # that carries every direction gets exactly 0 (an empty sum) on any BLAS.
        not_carried = per_direction.repeat_interleave(self.copies)[d:]  # every copy has the spectrum
        return float(not_carried.flip(0).sum())  # smallest first; every term is ≥ 0

    def linear_state_prediction(self, d: int, x: torch.Tensor, split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The best predictor whose only access to X = z_1..z_split is a d-dimensional linear state (the
        d leading canonical directions over all copies, as linear_state_bound counts them), on
        sequences x shaped like `sample`'s output: its (mean (B, L, copies), std (1, L, copies)),
        float64. At positions after the split it predicts z_i from the state and z_split+1..z_i-1,
        before it from the whole past (the exact conditional). Averaged over sequences its KL summed
        over the positions after the split is `linear_state_bound(d, split)`; on a fixed held-out set
        it is that set's own linear-state floor. Where the d-th largest correlation is tied with the
        next (a degenerate spectrum), every choice within the tie is optimal: this takes the SVD's,
        and another optimal state differs from it on each sequence, not in expectation. Cost: an (d + L − split)-square Cholesky factor
        once, then B·(d + L − split)² per copy."""
        split = self.seq_len // 2 if split is None else check_int("split", split, 1, self.seq_len - 1)
        check_int("d", d, 0)
        if x.dim() != 3 or x.shape[1:] != (self.seq_len + 1, self.copies):
            raise UserError(f"x must have shape (batch, {self.seq_len + 1}, {self.copies}) = (batch, L+1, copies) "
                            f"with BOS at index 0, got {tuple(x.shape)}")
        z = x[:, 1:].to(torch.float64)  # (B, L, copies)
        r = self._cholesky_on(z.device)
        noise = torch.linalg.solve_triangular(r, z.transpose(0, 1).reshape(self.seq_len, -1), upper=False)
        sigma = r.diagonal()[None, :, None]  # (1, L, 1)
        mean = z - sigma * noise.view(self.seq_len, z.shape[0], -1).transpose(0, 1)  # the exact conditional
        std = sigma.expand(1, self.seq_len, self.copies).clone()
        rank = min(split, self.seq_len - split)
        for copy in range(self.copies):
            carried = min(rank, len(range(copy, d, self.copies)))  # the leading d of the spectra repeated per copy
            state_map, factor = (t.to(z.device) for t in _linear_state_factors(self.levels, self.kind, split, carried))
            known = torch.cat([z[:, :split, copy] @ state_map.T, z[:, split:, copy]], 1)  # (B, carried + L − split): [s; Y]
            scale = factor.diagonal()
            innovation = torch.linalg.solve_triangular(factor, known.T, upper=False).T
            mean[:, split:, copy] = (known - scale * innovation)[:, carried:]
            std[0, split:, copy] = scale[carried:]
        return mean, std

    def conditional_entropy(self) -> torch.Tensor:
        """(L,) float64: H(Z_i | Z_<i) = ½ log(2πe σ_i²) summed over copies — the NLL floor."""
        return self.copies * (0.5 * math.log(2 * math.pi * math.e) + self.conditional_std.log())

    # ---- sampling and conditionals ----

    def noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """ε ~ N(0, I), (batch, L, copies) float64 on CPU (device-independent randomness)."""
        check_int("batch", batch)
        return torch.randn(batch, self.seq_len, self.copies, dtype=torch.float64, generator=generator)

    def from_noise(self, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sequences z = R ε and their exact conditionals, computed on eps.device in float64.

        eps: (B, L, copies). Returns float32 {"x": (B, L+1, copies) with the all-zero BOS at
        index 0, "mean": (B, L, copies), "std": (1, L, copies)}. Float64 because the targets
        must stay exact: a TF32/bf16 matmul would perturb z by ~1e-3.
        """
        if eps.dim() != 3 or eps.shape[1:] != (self.seq_len, self.copies):
            raise ValueError(f"eps must have shape (batch, {self.seq_len}, {self.copies}), got {tuple(eps.shape)}")
        r = self._cholesky_on(eps.device)
        eps = eps.to(torch.float64)
        batch = eps.shape[0]
        # One GEMM for the whole batch: (L, L) @ (L, B·copies).
        z = (r @ eps.transpose(0, 1).reshape(self.seq_len, -1)).view(self.seq_len, batch, -1).transpose(0, 1)
        sigma = r.diagonal()[None, :, None]  # (1, L, 1)
        mean = z - sigma * eps  # = Σ_{j<i} R_ij ε_j: the part of z_i known from z_<i
        x = torch.zeros(batch, self.seq_len + 1, self.copies, dtype=torch.float32, device=eps.device)
        x[:, 1:] = z
        std = sigma.to(torch.float32).expand(1, self.seq_len, self.copies)
        return {"x": x, "mean": mean.to(torch.float32), "std": std}

    def sample(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch, L+1, copies) float32 sequences with the all-zero BOS token at index 0."""
        return self.from_noise(self.noise(batch, generator))["x"]

    def conditional(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (mean, std) of p(z_i | z_<i) for i = 1..L, each (batch, L, copies) float32.

        x is shaped like `sample`'s output, (batch, L+1, copies) with BOS at index 0. Costs one
        triangular solve R w = z (O(L²) per sequence and copy), in float64 on x.device.
        """
        if x.dim() != 3 or x.shape[1:] != (self.seq_len + 1, self.copies):
            raise UserError(
                f"x must have shape (batch, {self.seq_len + 1}, {self.copies}) = (batch, L+1, copies) "
                f"with BOS at index 0, got {tuple(x.shape)}"
            )
        r = self._cholesky_on(x.device)
        z = x[:, 1:].to(torch.float64)
        batch = z.shape[0]
        eps = torch.linalg.solve_triangular(r, z.transpose(0, 1).reshape(self.seq_len, -1), upper=False)
        eps = eps.view(self.seq_len, batch, -1).transpose(0, 1)
        sigma = r.diagonal()[None, :, None]
        mean = z - sigma * eps
        std = sigma.to(torch.float32).expand(batch, self.seq_len, self.copies)
        return mean.to(torch.float32), std

    def _cholesky_on(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self.cholesky
        if device not in self._on_device:
            self._on_device[device] = self.cholesky.to(device)
        return self._on_device[device]


# ---- command line: the MI table ----


def mi_table(levels: list[int], kind: str, copies: int = 1) -> list[dict]:
    """One row per level: L, I_BP(L/2; L), antipodal I_TP(1, L), σ_L (nats, `copies` copies)."""
    rows = []
    for k in levels:
        fam = GaussianFamily(k, kind, copies)
        rows.append(
            {
                "levels": k,
                "L": fam.seq_len,
                "i_bp": fam.bipartite_mi(),
                "i_tp": fam.two_point_mi(1, fam.seq_len),
                "sigma_last": float(fam.conditional_std[-1]),
            }
        )
    return rows
