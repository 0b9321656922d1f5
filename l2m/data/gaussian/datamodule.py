"""Lightning DataModule streaming the exact Gaussian family (spec §2) for training.

Only the noise ε travels through the DataLoader (CPU, float64, device-independent); the
sequences z = R ε and their exact conditionals are computed in `on_after_batch_transfer` on the
model's device — one (L×L)·(L×B·copies) float64 product per batch, the Cholesky factor cached
per device.

Train stream: batch k of rank r is drawn from its own generator, keyed by (seed, r, k), so it
is fresh every step, deterministic given `seed`, distinct on every DDP rank, and independent of
how batches are split over DataLoader workers. The train DataLoader records how many batches
were consumed and is resumable in Lightning's sense (`state_dict` / `load_state_dict`, saved
with the fit loop in every checkpoint), so a resumed run — even from mid-epoch — sees exactly
the batches an uninterrupted run would see. An "epoch" is just `epoch_size` consecutive batches
of the endless stream (so any Trainer validation schedule works).

Validation: `val_size` fixed sequences keyed by (val_seed, n), identical in every run and
epoch, sharded across ranks without overlap (rank r takes n = r, r + world_size, ...; when
world_size does not divide val_size, ranks hold one sequence more or less — nothing is padded
or repeated).

Precision: z and μ are computed in float64 even on GPU, because the exact targets must not
inherit TF32/bf16 matmul error; the batch is then cast to float32. At L = 16,384, B = 4 and 64
copies that is a 137-GFLOP float64 GEMM per step: a few ms at data-centre FP64 rates (estimate,
not measured here), much slower on consumer GPUs with cut-down FP64.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch

from l2m.checks import UserError
from l2m.data.gaussian.family import GaussianFamily, available_memory, levels_of_length
from l2m.data.stream import BatchStream, DrawnDataModule, keyed_generator

log = logging.getLogger(__name__)

_TRAIN, _VAL = 0, 1  # stream tags: train and validation noise never share a generator key


# Bytes per number of a train batch at the step's peak: float64 noise, sequences and conditional means
# (from_noise), their float32 copies (x, mean, std), the model's float32 predicted mean and std with their
# gradients, and the adapters' activations: 59 measured (peak RSS 6.9 GB at B=16, L=64, 100,000 copies).
BYTES_PER_BATCH_NUMBER = 60
LARGE_BATCH_BYTES = 1e9
# Longest L with a paired linear-state reference: its (d + L/2)-square factor is 2 GB at L = 16,384
LINEAR_STATE_MAX_LEN = 4096

# Module-level, so that functools.partial of them pickles into DataLoader workers.
def _train_batch(family: GaussianFamily, batch_size: int, seed: int, rank: int, index: int) -> dict:
    return {"eps": family.noise(batch_size, keyed_generator(seed, _TRAIN, rank, index))}


def _val_batch(family: GaussianFamily, val_seed: int, indices: list[int]) -> dict:
    return {"eps": torch.cat([family.noise(1, keyed_generator(val_seed, _VAL, n)) for n in indices])}


class GaussianDataModule(DrawnDataModule):
    """The Gaussian family of `levels` (or of length `seq_len`, a power of 4, which then sets levels).

    Batches {"x": (B, L+1, copies), "mean": (B, L, copies), "std": (1, L, copies)} (float32).

    x[:, 0] is the all-zero BOS token; the model reads x[:, :-1] and predicts z = x[:, 1:],
    whose exact conditional p(z_i | z_<i) is N(mean_i, std_i²).
    """

    task = "gaussian"

    def __init__(
        self,
        levels: int | None = None,
        kind: str = "subvolume",
        copies: int = 64,
        batch_size: int = 4,
        seed: int = 0,
        val_size: int = 64,
        val_seed: int = 12345,
        num_workers: int = 0,
        epoch_size: int = 1000,
        seq_len: int | None = None,
    ):
        super().__init__()
        if seq_len is not None:
            length_levels = levels_of_length(seq_len)
            if levels is not None and levels != length_levels:
                raise UserError(f"seq_len={seq_len} (levels={length_levels}) and levels={levels} (L = {4**levels}) "
                                 "disagree: give one of them")
            levels = length_levels
        self.family = GaussianFamily(levels, kind, copies)  # validates levels, kind, copies
        seq_len = self.family.seq_len  # recorded by save_hyperparameters beside levels
        self._set_stream(batch_size, seed, val_size, val_seed, num_workers, epoch_size)
        self._require_batch_memory()
        self.save_hyperparameters()
        self.seq_len = self.family.seq_len

    def _require_batch_memory(self) -> None:
        """Stop before the first batch, with the numbers, where one batch cannot fit in memory: the
        process would otherwise compute silently for minutes, then be killed."""
        numbers = self.batch_size * self.family.seq_len * self.family.copies
        needed, available = numbers * BYTES_PER_BATCH_NUMBER, available_memory()
        batch = (f"a batch of {self.batch_size} sequences x L={self.family.seq_len} x {self.family.copies:,} copies needs "
                 f"about {needed / 1e9:.0f} GB of memory (its noise, sequences and conditionals, the model's predictions "
                 "and their gradients)")
        if available is not None and needed > available:
            raise UserError(f"{batch}, only {available / 1e9:.0f} GB available: lower data.copies or data.batch_size")
        if needed > LARGE_BATCH_BYTES:  # else the first line would come minutes later
            log.info(f"{batch}: every step takes a while, and so does the held-out evaluation before the first "
                     f"({math.ceil(self.val_size / self.batch_size)} batches)")

    # ---- what the training code asks about the data ----

    def io_config(self) -> dict:
        return {"kind": "gaussian", "dim": self.family.copies}

    def reference_family(self) -> str:
        return f"gaussian {self.family.kind} ×{self.family.copies}"

    def bipartite_mi_half(self) -> float:
        """Exact I_BP(L/2; L) in nats per sequence (all copies)."""
        return self.family.bipartite_mi()

    def nll_floor(self) -> torch.Tensor:
        """(L,) float64: exact H_p(Z_i | Z_<i) in nats per token, summed over copies."""
        return self.family.conditional_entropy()

    def window_kl(self, k: int) -> torch.Tensor:
        """(L,) float64: exact KL_i of the best predictor that sees the last k tokens."""
        return self.family.window_kl(k)

    def window_prediction(self, k: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact window-k predictor's (mean, std) for a batch of sequences: its KL averages to window_kl(k)."""
        return self.family.window_prediction(k, batch["x"])

    def linear_state_prediction(self, dim: int, split: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The best linear state of dim scalars' (mean, std) for a batch (its KL after split averages to
        state_bound(dim, split)); None above LINEAR_STATE_MAX_LEN tokens, where its factor stops being cheap."""
        if self.seq_len > LINEAR_STATE_MAX_LEN:
            return None
        return self.family.linear_state_prediction(dim, batch["x"], split)

    def state_bound(self, dim: int, split: int) -> float:
        """Least KL over positions split+1..L of a predictor that keeps dim scalars, linear in z_1..z_split."""
        return self.family.linear_state_bound(dim, split)

    # ---- noise: the only randomness; everything else is a deterministic function of it ----

    def train_noise(self, index: int, rank: int = 0) -> torch.Tensor:
        """ε of train batch `index` on DDP rank `rank`: (batch_size, L, copies) float64."""
        return _train_batch(self.family, self.batch_size, self.seed, rank, index)["eps"]

    def val_noise(self, indices: list[int]) -> torch.Tensor:
        """ε of the validation sequences `indices` (each keyed by (val_seed, n)): (len, L, copies)."""
        return _val_batch(self.family, self.val_seed, indices)["eps"]

    # ---- streams (the DataLoaders and batch bookkeeping are StreamDataModule's) ----

    def train_stream(self, rank: int = 0, world_size: int = 1, start: int = 0) -> BatchStream:
        """Rank `rank`'s train batches `start`, start+1, ... (`epoch_size` of them); keyed by rank alone."""
        batch_fn = partial(_train_batch, self.family, self.batch_size, self.seed, rank)
        return BatchStream(batch_fn, start, self.epoch_size)

    def _val_batch_fn(self):
        return partial(_val_batch, self.family, self.val_seed)

    def setup(self, stage: str) -> None:
        self.family.cholesky  # the O(L³) factorisation, once per process, before the first step

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return self.family.from_noise(super().on_after_batch_transfer(batch, dataloader_idx)["eps"])
