"""Lightning glue: the training module, L²M callbacks, position-wise evaluation, train/evaluate jobs."""

from l2m.training.callbacks import HistoryStateCallback, PositionwiseCallback, history_state_summary
from l2m.training.metrics import Positionwise, evaluate_positionwise, gaussian_kl
from l2m.training.module import L2MModule, NonFiniteLossError

__all__ = [
    "HistoryStateCallback",
    "L2MModule",
    "NonFiniteLossError",
    "Positionwise",
    "PositionwiseCallback",
    "evaluate_positionwise",
    "gaussian_kl",
    "history_state_summary",
]
