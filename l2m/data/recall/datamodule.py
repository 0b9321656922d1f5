"""Lightning DataModule streaming multi-query associative recall (l2m.data.recall) for training.

Like the Gaussian DataModule: fresh samples every step (batch k of rank r drawn from its own
generator keyed by (seed, r, k)), a fixed held-out set keyed by (val_seed, n), a resumable stream,
disjoint DDP shards. Batches are {"input_ids": (B, L+1)} with BOS first, and with
answer_loss_only a "loss_mask" (B, L) that keeps only the answer positions in the loss (as zoology
trains); the position-wise metrics always cover every position.
"""

from __future__ import annotations

from functools import partial

import torch

from l2m.data.recall.law import AssociativeRecall
from l2m.data.stream import BatchStream, DrawnDataModule, keyed_generator

_TRAIN, _VAL = 0, 1  # stream tags: train and validation samples never share a generator key


def _batch(task: AssociativeRecall, tokens: torch.Tensor, answer_loss_only: bool) -> dict:
    batch = {"input_ids": tokens}
    if answer_loss_only:
        batch["loss_mask"] = task.answer_positions().expand(tokens.shape[0], -1).float()
    return batch


# Module-level, so that functools.partial of them pickles into DataLoader workers.
def _train_batch(task, batch_size, seed, answer_loss_only, rank, index) -> dict:
    return _batch(task, task.sample(batch_size, keyed_generator(seed, _TRAIN, rank, index)), answer_loss_only)


def _val_batch(task, val_seed, answer_loss_only, indices) -> dict:
    tokens = torch.cat([task.sample(1, keyed_generator(val_seed, _VAL, n)) for n in indices])
    return _batch(task, tokens, answer_loss_only)


class RecallDataModule(DrawnDataModule):
    """MQAR with K keys, V values, P pairs and Q queries (L = 2P + 2Q); see l2m.data.recall."""

    task = "recall"
    history_split_label = "the end of the pairs"
    length_options = "data.num_pairs and data.num_queries: L = 2P + 2Q"

    def __init__(
        self,
        num_pairs: int = 4,
        num_queries: int = 4,
        num_keys: int = 64,
        num_values: int = 64,
        answer_loss_only: bool = False,
        batch_size: int = 32,
        seed: int = 0,
        val_size: int = 256,
        val_seed: int = 12345,
        num_workers: int = 0,
        epoch_size: int = 1000,
    ):
        super().__init__()
        self.recall = AssociativeRecall(num_keys, num_values, num_pairs, num_queries)  # checks K, V, P, Q
        self._set_stream(batch_size, seed, val_size, val_seed, num_workers, epoch_size)
        self.save_hyperparameters()
        self.seq_len = self.recall.seq_len
        self.answer_loss_only = answer_loss_only

    # ---- what the training code asks about the data ----

    @property
    def history_split(self) -> int:
        """The end of the pairs: the state must carry them to the queries."""
        return self.recall.pairs_end

    def io_config(self) -> dict:
        return {"kind": "discrete", "vocab_size": self.recall.vocab_size}

    def bipartite_mi_half(self) -> float:
        """Exact I_BP at the end of the pairs (`history_split`), in nats per sequence."""
        return self.recall.bipartite_mi(self.history_split)

    def nll_floor(self) -> torch.Tensor:
        """(L,) exact H(W_i | W_<i): KL_i = NLL_i − floor_i."""
        return self.recall.conditional_entropy()

    def window_kl(self, k: int) -> None:
        return None  # no exact window references for recall

    def state_bound(self, dim: int, split: int) -> None:
        return None

    def answer_positions(self) -> torch.Tensor:
        return self.recall.answer_positions()

    def answer_chance(self) -> float:
        return 1 / self.recall.num_pairs

    # ---- streams ----

    def train_stream(self, rank: int = 0, world_size: int = 1, start: int = 0) -> BatchStream:
        batch_fn = partial(_train_batch, self.recall, self.batch_size, self.seed, self.answer_loss_only, rank)
        return BatchStream(batch_fn, start, self.epoch_size)

    def _val_batch_fn(self):
        return partial(_val_batch, self.recall, self.val_seed, self.answer_loss_only)
