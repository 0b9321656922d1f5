"""How numbers read in the terminal tables of runs and sweeps."""

from __future__ import annotations

import math


def format_number(value: object) -> str:
    """4 significant digits for floats, thousands separators for ints, yes/no, '-' for missing values."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
