"""The exact sub-volume Gaussian family (math only, no Lightning); its MI table: `python -m l2m.data.gaussian`."""

from l2m.data.gaussian.family import KINDS, MAX_LEVELS, GaussianFamily, levels_of_length, mi_table

__all__ = ["KINDS", "MAX_LEVELS", "GaussianFamily", "levels_of_length", "mi_table"]
