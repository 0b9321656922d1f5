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

import math

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from l2m.data.gaussian import GaussianFamily

_TRAIN, _VAL = 0, 1  # stream tags: train and validation noise never share a generator key


def noise_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative ints (e.g. (seed, stream, rank, k)).

    numpy's SeedSequence hashes the whole key, so nearby keys give independent streams.
    """
    words = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) | int(words[1]) << 32)


def _train_noise(family: GaussianFamily, batch_size: int, seed: int, rank: int, index: int) -> torch.Tensor:
    return family.noise(batch_size, noise_generator(seed, _TRAIN, rank, index))


def _val_noise(family: GaussianFamily, val_seed: int, indices: list[int]) -> torch.Tensor:
    return torch.cat([family.noise(1, noise_generator(val_seed, _VAL, n)) for n in indices])


def _worker_share() -> tuple[int, int]:
    worker = get_worker_info()
    return (0, 1) if worker is None else (worker.id, worker.num_workers)


class _TrainStream(IterableDataset):
    """`length` consecutive train batches of one rank, starting at batch `start`."""

    def __init__(self, family: GaussianFamily, batch_size: int, seed: int, rank: int, start: int, length: int):
        self.family, self.batch_size, self.seed, self.rank = family, batch_size, seed, rank
        self.start, self.length = start, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        offset, step = _worker_share()
        # Workers take batches round-robin; the DataLoader returns them in index order.
        for k in range(self.start + offset, self.start + self.length, step):
            yield {"eps": _train_noise(self.family, self.batch_size, self.seed, self.rank, k), "index": k}


class _StreamLoader(DataLoader):
    """DataLoader over a `_TrainStream` with Lightning's resumable-loader interface.

    Lightning saves `state_dict()` with the fit loop in every checkpoint and, on resume, calls
    `load_state_dict()` after `train_dataloader()` and before iterating it, so the resumed run
    continues with the first batch the interrupted one never consumed.
    """

    def state_dict(self) -> dict:
        return {"batches_served": self.dataset.start}

    def load_state_dict(self, state_dict: dict) -> None:
        self.dataset.start = int(state_dict["batches_served"])


class _ValSet(IterableDataset):
    """The validation sequences `indices`, in batches of `batch_size`."""

    def __init__(self, family: GaussianFamily, batch_size: int, val_seed: int, indices: list[int]):
        self.family, self.batch_size, self.val_seed, self.indices = family, batch_size, val_seed, indices

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        offset, step = _worker_share()
        for b in range(offset, len(self), step):
            chunk = self.indices[b * self.batch_size : (b + 1) * self.batch_size]
            yield {"eps": _val_noise(self.family, self.val_seed, chunk)}


class GaussianDataModule(L.LightningDataModule):
    """Batches {"x": (B, L+1, copies), "mean": (B, L, copies), "std": (1, L, copies)} (float32).

    x[:, 0] is the all-zero BOS token; the model reads x[:, :-1] and predicts z = x[:, 1:],
    whose exact conditional p(z_i | z_<i) is N(mean_i, std_i²).
    """

    task = "gaussian"

    def __init__(
        self,
        levels: int,
        kind: str = "subvolume",
        copies: int = 64,
        batch_size: int = 4,
        seed: int = 0,
        val_size: int = 64,
        val_seed: int = 12345,
        num_workers: int = 0,
        epoch_size: int = 1000,
    ):
        super().__init__()
        self.family = GaussianFamily(levels, kind, copies)  # validates levels, kind, copies
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("seed", seed, 0),
            ("val_size", val_size, 1),
            ("val_seed", val_seed, 0),
            ("num_workers", num_workers, 0),
            ("epoch_size", epoch_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.save_hyperparameters()
        self.seq_len = self.family.seq_len
        self.batch_size, self.seed, self.val_size, self.val_seed = batch_size, seed, val_size, val_seed
        self.num_workers, self.epoch_size = num_workers, epoch_size
        self._train_stream: _TrainStream | None = None

    @property
    def batches_served(self) -> int:
        """Train batches consumed so far on this rank (where the stream continues)."""
        return 0 if self._train_stream is None else self._train_stream.start

    # ---- what the training code asks about the data ----

    def io_config(self) -> dict:
        return {"kind": "gaussian", "dim": self.family.copies}

    def bipartite_mi_half(self) -> float:
        """Exact I_BP(L/2; L) in nats per sequence (all copies)."""
        return self.family.bipartite_mi()

    def nll_floor(self) -> torch.Tensor:
        """(L,) float64: exact H_p(Z_i | Z_<i) in nats per token, summed over copies."""
        return self.family.conditional_entropy()

    # ---- noise: the only randomness; everything else is a deterministic function of it ----

    def train_noise(self, index: int, rank: int = 0) -> torch.Tensor:
        """ε of train batch `index` on DDP rank `rank`: (batch_size, L, copies) float64."""
        return _train_noise(self.family, self.batch_size, self.seed, rank, index)

    def val_noise(self, indices: list[int]) -> torch.Tensor:
        """ε of the validation sequences `indices` (each keyed by (val_seed, n)): (len, L, copies)."""
        return _val_noise(self.family, self.val_seed, indices)

    def val_indices(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's share of the validation set: disjoint across ranks, together all of it."""
        if self.val_size < world_size:
            raise ValueError(f"val_size ({self.val_size}) must be >= the number of DDP ranks ({world_size})")
        return list(range(rank, self.val_size, world_size))

    # ---- Lightning hooks ----

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str) -> None:
        self.family.cholesky  # the O(L³) factorisation, once per process, before the first step

    def train_dataloader(self) -> DataLoader:
        rank = self._rank()[0]
        self._train_stream = _TrainStream(
            self.family, self.batch_size, self.seed, rank, self.batches_served, self.epoch_size
        )
        # batch_size=None: the dataset yields whole batches. Workers must not be persistent:
        # every epoch's iteration re-reads `start` from this process.
        return _StreamLoader(self._train_stream, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        val_set = _ValSet(self.family, self.batch_size, self.val_seed, self.val_indices(*self._rank()))
        return DataLoader(val_set, batch_size=None, num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if "index" in batch and self._train_stream is not None:  # a train batch, now consumed
            # Where the stream continues: in the next epoch, and in a checkpoint taken now.
            self._train_stream.start = int(batch["index"]) + 1
        return self.family.from_noise(batch["eps"])
