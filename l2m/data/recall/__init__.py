"""Multi-query associative recall: its exact law (math only, no Lightning) and the DataModule that
streams it for training (`l2m.data.recall.RecallDataModule`, imported on first use)."""

from l2m.data.recall.law import AssociativeRecall

__all__ = ["AssociativeRecall", "RecallDataModule"]


def __getattr__(name: str):
    if name == "RecallDataModule":
        from l2m.data.recall.datamodule import RecallDataModule

        return RecallDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
