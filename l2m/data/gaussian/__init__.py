"""The exact sub-volume Gaussian family (math only, no Lightning; its MI table: `python -m
l2m.data.gaussian`) and the DataModule that streams it for training (`l2m.data.gaussian.GaussianDataModule`,
imported on first use)."""

from l2m.data.gaussian.family import KINDS, MAX_LEVELS, GaussianFamily, levels_of_length, mi_table

__all__ = ["KINDS", "MAX_LEVELS", "GaussianDataModule", "GaussianFamily", "levels_of_length", "mi_table"]


def __getattr__(name: str):
    if name == "GaussianDataModule":
        from l2m.data.gaussian.datamodule import GaussianDataModule

        return GaussianDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
