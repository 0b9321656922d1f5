"""The train/validation streams shared by l2m's DataModules (Gaussian and text).

Train: an endless stream of batches per DDP rank, batch k a deterministic function of k (and of
the rank), so it does not matter how DataLoader workers split the batches. An "epoch" is
`epoch_size` consecutive batches. The stream remembers where it stands (`start`, the first batch
not yet consumed), and its DataLoader is resumable in Lightning's sense: Lightning saves
`state_dict()` with the fit loop in every checkpoint and, on resume, calls `load_state_dict()`
after `train_dataloader()` and before iterating it, so a resumed run — even from mid-epoch —
sees exactly the batches an uninterrupted run would see.

Validation: a fixed list of sample indices, sharded across ranks (rank r takes r, r + world_size,
...), read in consecutive chunks of `batch_size`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from l2m.checks import UserError, check_ints
from l2m.data.contract import L2MData


def keyed_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative ints (e.g. (seed, stream, rank, k)).

    numpy's SeedSequence hashes the whole key, so nearby keys give independent streams.
    """
    words = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) | int(words[1]) << 32)


def worker_share() -> tuple[int, int]:
    """(offset, step): this DataLoader worker takes items offset, offset + step, ...; (0, 1) in-process."""
    worker = get_worker_info()
    return (0, 1) if worker is None else (worker.id, worker.num_workers)


def rank_share(items: Sequence, rank: int, world_size: int) -> Sequence:
    """Items rank, rank + world_size, ...: disjoint across ranks, together all of them."""
    if len(items) < world_size:
        raise UserError(f"val_size ({len(items)}) must be >= the number of DDP ranks ({world_size})")
    return items[rank::world_size]


class BatchStream(IterableDataset):
    """Batches {**batch_fn(k), "index": k} for k = start, ..., start + length - 1.

    batch_fn must pickle (it travels into DataLoader workers): a module-level function, a
    functools.partial of one, or a small callable object. "index" marks a train batch and says
    where the stream continues once it is consumed.
    """

    def __init__(self, batch_fn: Callable[[int], dict], start: int, length: int):
        self.batch_fn, self.start, self.length = batch_fn, start, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        offset, step = worker_share()
        # Workers take batches round-robin; the DataLoader returns them in index order.
        for k in range(self.start + offset, self.start + self.length, step):
            yield {**self.batch_fn(k), "index": k}


class ChunkStream(IterableDataset):
    """Batches batch_fn(indices[b * batch_size : (b + 1) * batch_size]), b = 0, 1, ... (the last may be short)."""

    def __init__(self, batch_fn: Callable[[Sequence], dict], indices: Sequence, batch_size: int):
        self.batch_fn, self.indices, self.batch_size = batch_fn, indices, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        offset, step = worker_share()
        for b in range(offset, len(self), step):
            yield self.batch_fn(self.indices[b * self.batch_size : (b + 1) * self.batch_size])


def loader(dataset: IterableDataset, num_workers: int, cls: type[DataLoader] = DataLoader) -> DataLoader:
    # batch_size=None: the datasets yield whole batches. Workers must not be persistent: every
    # epoch's iteration re-reads the stream position (`start`) from this process.
    return cls(dataset, batch_size=None, num_workers=num_workers)


class ResumableLoader(DataLoader):
    """DataLoader over a BatchStream with Lightning's resumable-loader interface (see above)."""

    def state_dict(self) -> dict:
        return {"batches_served": self.dataset.start}

    def load_state_dict(self, state_dict: dict) -> None:
        self.dataset.start = int(state_dict["batches_served"])


class StreamDataModule(L.LightningDataModule, L2MData):
    """Base DataModule: a resumable train stream per rank and a validation set sharded by rank.

    Subclasses set `batch_size`, `num_workers`, `epoch_size` and define `train_stream`,
    `val_indices` and `_val_batch_fn` (the picklable function of a chunk of val indices).
    """

    _train_loader: ResumableLoader | None = None

    @property
    def batches_served(self) -> int:
        """Train batches consumed so far on this rank (where the stream continues)."""
        return 0 if self._train_loader is None else self._train_loader.dataset.start

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> ResumableLoader:
        stream = self.train_stream(*self._rank(), start=self.batches_served)
        self._train_loader = loader(stream, self.num_workers, ResumableLoader)
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        indices = self.val_indices(*self._rank())
        return loader(ChunkStream(self._val_batch_fn(), indices, self.batch_size), self.num_workers)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if "index" in batch and self._train_loader is not None:  # a train batch, now consumed
            # Where the stream continues: in the next epoch, and in a checkpoint taken now.
            self._train_loader.dataset.start = int(batch["index"]) + 1
        return batch


class DrawnDataModule(StreamDataModule):
    """Base of the synthetic DataModules, whose samples are drawn from a known law: batch k of rank r
    from a generator keyed by (seed, r, k), the held-out sequence n keyed by (val_seed, n)."""

    def _set_stream(self, batch_size: int, seed: int, val_size: int, val_seed: int, num_workers: int,
                    epoch_size: int) -> None:
        check_ints(batch_size=(batch_size, 1), seed=(seed, 0), val_size=(val_size, 1), val_seed=(val_seed, 0),
                   num_workers=(num_workers, 0), epoch_size=(epoch_size, 1))
        self.batch_size, self.seed, self.val_size, self.val_seed = batch_size, seed, val_size, val_seed
        self.num_workers, self.epoch_size = num_workers, epoch_size

    def val_indices(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's share of the held-out set: disjoint across ranks, together all of it."""
        return list(rank_share(range(self.val_size), rank, world_size))
