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


def readable_log_ticks(fig) -> None:
    """Plain-number tick labels on every log axis of a matplotlib figure that spans under two decades,
    where matplotlib labels one tick or none (`9×10¹` between 68 and 91): under one decade every
    minor tick is labelled, under two the 2s and 5s. Call it once the figure is drawn in."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for ax in fig.axes:
        for axis, scale, limits in ((ax.xaxis, ax.get_xscale(), ax.get_xlim()), (ax.yaxis, ax.get_yscale(), ax.get_ylim())):
            low, high = sorted(limits)
            if scale != "log" or axis.get_transform().base != 10 or low <= 0 or high / low >= 100:
                continue  # a base-2 axis has its own ticks, the powers of two
            subs = np.arange(2, 10) if high / low < 10 else (2, 5)
            axis.set_minor_locator(LogLocator(subs=subs))
            axis.set_minor_formatter(plain)
            axis.set_major_formatter(plain)
