"""Input checks shared by every layer (math, models, data), with messages that name the fix."""

from __future__ import annotations


def is_int(value: object) -> bool:
    """True for an int; bools are rejected (True is not a length)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: object, low: int = 1, high: int | None = None, what: str = "an int") -> int:
    """`value` if it is an int in low..high (high None: no upper bound), else a ValueError naming it,
    e.g. "d_state must be an int >= 1, got 0" or "i must be a 1-based position in 1..16, got 17"."""
    if not is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {what} {bound}, got {value!r}")
    return value


def check_ints(**bounds: tuple[object, int]) -> None:
    """check_int for every name=(value, low)."""
    for name, (value, low) in bounds.items():
        check_int(name, value, low)
