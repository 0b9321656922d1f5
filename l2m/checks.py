"""Input checks shared by every layer (math, models, data), with messages that name the fix."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(ValueError):
    """A user's mistake (a config value, option, path, dataset, checkpoint), with a message that says
    what to do: every l2m command prints it as one line and exits with status 1. A ValueError, so
    that library callers catch it as one; other ValueErrors (a bug's: a tensor of the wrong shape
    passed between l2m's own functions) keep their traceback."""


def is_int(value: object) -> bool:
    """True for an int; bools are rejected (True is not a length)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: object, low: int = 1, high: int | None = None, what: str = "an int") -> int:
    """`value` if it is an int in low..high (high None: no upper bound), else a UserError naming it,
    e.g. "d_state must be an int >= 1, got 0" or "i must be a 1-based position in 1..16, got 17"."""
    if not is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise UserError(f"{name} must be {what} {bound}, got {value!r}")
    return value


def check_ints(**bounds: tuple[object, int]) -> None:
    """check_int for every name=(value, low)."""
    for name, (value, low) in bounds.items():
        check_int(name, value, low)


def check_device(option: str, device: str) -> str:
    """`device` if torch can use it here, else a UserError naming the option, e.g. device=cuda on a
    machine without CUDA."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise UserError(f"{option}={device!r} is not a device: use cpu, cuda or cuda:<index>") from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option}={device}, but torch sees no CUDA device here: use {option}=cpu")
    return device


def error_chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then the error it was raised from or during (`__cause__`, else `__context__`), and so on:
    libraries that re-raise their own error (OmegaConf, torch.save) keep the one that says what happened there."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


# Bad input: what every l2m command reports in one line. ConnectionError: a hub dataset or model that
# cannot be reached; ImportError: an optional package a chosen option needs.
BAD_INPUT = (UserError, FileNotFoundError, ImportError, ConnectionError)


@contextmanager
def one_line_errors(*more: type[BaseException], path_hint: str) -> Iterator[None]:
    """Bad input (and `more`) ends with `error: <message>` and exit status 1, not a traceback. An error
    of the operating system about a path (missing, not writable, read-only) names the path and
    `path_hint` (the options that move it). L2M_FULL_ERROR=1 or HYDRA_FULL_ERROR=1 shows the traceback."""
    try:
        yield
    except (*BAD_INPUT, *more, OSError) as error:
        if os.environ.get("L2M_FULL_ERROR") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raised_by_the_system = isinstance(error, OSError) and error.errno is not None and error.filename is not None
        if raised_by_the_system:
            error = f"{error.filename}: {error.strerror}; {path_hint}"
        elif not isinstance(error, (*BAD_INPUT, *more)):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
