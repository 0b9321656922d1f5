"""What l2m's training, callbacks and reports ask of a data module: the `L2MData` protocol.

The Gaussian, recall and text DataModules subclass it; a new task is a DataModule that does (and,
for a new kind of token, one pair of adapters in l2m.models.adapters). A subclass inherits the
defaults below (the state measured at L/2, no answer positions, ...) and overrides what its task
knows better; the generic layers (callbacks, reports, the sweep, resume) read these members and
nothing else, never the task's name. Batches follow the adapters' contract: BOS + L tokens under
the input adapter's key, plus what its loss reads.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from l2m.checks import UserError


@runtime_checkable
class L2MData(Protocol):
    task: str  # a label for summaries and reports ("gaussian", "recall", "text"); nothing branches on it
    seq_len: int  # L: predicted positions per sequence
    history_split_label: str = "L/2"  # how reports name `history_split`
    length_options: str = "data.seq_len"  # the options that set L, for error messages
    # Options that change how the data is read, not what is trained (free to change on resume), and
    # options that may name a local path (kept absolute in checkpoints, which are read from anywhere).
    runtime_options: tuple[str, ...] = ("num_workers", "epoch_size")
    path_options: tuple[str, ...] = ()

    @property
    def history_split(self) -> int:
        """The split where the history state is measured against I_BP (dim(z), i_bp_half): L/2."""
        return self.seq_len // 2

    def reference_family(self) -> str:
        """What fixes the exact references besides L: runs that share it and L share their window-k
        curves (the sweep draws them once)."""
        return self.task

    def answer_positions(self) -> Tensor | None:
        """(L,) bool positions where the state is tested (their KL and top-1 accuracy are reported); None: none."""
        return None

    def answer_chance(self) -> float | None:
        """Top-1 accuracy at the answer positions of a guess among the values in context that knows none of
        their keys (associative recall: 1/P), reported beside the accuracy; None where there is none."""
        return None

    def io_config(self) -> dict:
        """The token kind the model must read and write, e.g. {"kind": "gaussian", "dim": 64}."""

    def bipartite_mi_half(self) -> float | None:
        """Exact I_BP at `history_split` in nats per sequence, None where unknown (natural text)."""

    def nll_floor(self) -> Tensor | None:
        """(L,) exact H_p(W_i | W_<i) in nats per token, None where unknown; with it KL_i = NLL_i - floor_i."""

    def window_kl(self, k: int) -> Tensor | None:
        """(L,) exact KL_i of the best predictor that sees only the last k tokens, None where unknown."""

    def window_prediction(self, k: int, batch: Any) -> Any:
        """What the exact best predictor that sees only the last k tokens predicts for a batch, in the
        output adapter's form (mean, std for Gaussian tokens); None where unknown. Evaluated on the
        held-out sequences themselves, it gives references paired with the model's KL."""
        return None

    def linear_state_prediction(self, dim: int, split: int, batch: Any) -> Any:
        """What the best predictor that keeps `dim` scalars linear in the first `split` tokens predicts
        for a batch, in the output adapter's form; None where unknown or not cheap. On the held-out
        sequences it pairs the model's KL after the split with `state_bound` on those very sequences."""
        return None

    def state_bound(self, dim: int, split: int) -> float | None:
        """Least KL over positions split+1..L of any predictor that keeps `dim` scalars of the first
        `split` tokens (the linear-state form of the L²M bound), None where unknown."""

    def val_dataloader(self) -> Any:
        """The fixed held-out set (this DDP rank's share)."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any: ...

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any: ...


_MEMBERS = ("task", "seq_len", "history_split", "history_split_label", "length_options", "runtime_options",
            "path_options", "reference_family", "answer_positions", "answer_chance", "io_config", "bipartite_mi_half", "nll_floor",
            "window_kl", "window_prediction", "linear_state_prediction", "state_bound", "val_dataloader", "on_before_batch_transfer", "on_after_batch_transfer")


def check_data(datamodule: object) -> L2MData:
    """`datamodule` if it implements L2MData, else a UserError naming what it lacks."""
    missing = [name for name in _MEMBERS if not hasattr(datamodule, name)]
    if missing:
        raise UserError(
            f"{type(datamodule).__qualname__} is not an l2m data module: it lacks {missing}; subclass "
            "l2m.data.contract.L2MData (beside LightningDataModule) for the defaults of all but the task's own"
        )
    return datamodule
