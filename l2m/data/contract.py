"""What l2m's training, callbacks and reports ask of a data module: the `L2MData` protocol.

GaussianDataModule and TextDataModule implement it; a new task is a DataModule that does (and,
for a new kind of token, one pair of adapters in l2m.models.adapters). Batches follow the
adapters' contract: BOS + L tokens under the input adapter's key, plus what its loss reads.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from l2m.checks import UserError


@runtime_checkable
class L2MData(Protocol):
    task: str  # a label for summaries and reports ("gaussian", "text"); nothing branches on it
    seq_len: int  # L: predicted positions per sequence
    # Optional: history_split, the split where dim(z) meets I_BP (default L/2; recall: the end of
    # the pairs); answer_positions(), (L,) bool positions whose top-1 accuracy summaries report;
    # length_options, the options that set L, for error messages (default "data.seq_len").

    def io_config(self) -> dict:
        """The token kind the model must read and write, e.g. {"kind": "gaussian", "dim": 64}."""

    def bipartite_mi_half(self) -> float | None:
        """Exact I_BP(L/2; L) in nats per sequence, None where unknown (natural text)."""

    def nll_floor(self) -> Tensor | None:
        """(L,) exact H_p(W_i | W_<i) in nats per token, None where unknown; with it KL_i = NLL_i - floor_i."""

    def window_kl(self, k: int) -> Tensor | None:
        """(L,) exact KL_i of the best predictor that sees only the last k tokens, None where unknown."""

    def state_bound(self, dim: int, split: int) -> float | None:
        """Least KL over positions split+1..L of any predictor that keeps `dim` scalars of the first
        `split` tokens (the linear-state form of the L²M bound), None where unknown."""

    def val_dataloader(self) -> Any:
        """The fixed held-out set (this DDP rank's share)."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any: ...

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any: ...


def check_data(datamodule: object) -> L2MData:
    """`datamodule` if it implements L2MData, else a ValueError naming what it lacks."""
    missing = [name for name in ("task", "seq_len", *_METHODS) if not hasattr(datamodule, name)]
    if missing:
        raise UserError(
            f"{type(datamodule).__qualname__} is not an l2m data module: it lacks {missing} "
            "(see l2m.data.contract.L2MData)"
        )
    return datamodule


_METHODS = ("io_config", "bipartite_mi_half", "nll_floor", "window_kl", "state_bound", "val_dataloader",
            "on_before_batch_transfer", "on_after_batch_transfer")
