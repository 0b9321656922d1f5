"""Lightning glue: the training module, the L²M callbacks and the W&B logger."""

from l2m.training.callbacks import HistoryStateCallback, PositionwiseCallback, history_state_summary
from l2m.training.module import L2MModule, NonFiniteLossError

__all__ = ["HistoryStateCallback", "L2MModule", "NonFiniteLossError", "PositionwiseCallback", "history_state_summary"]
