"""What a job prints also goes to its Hydra job log (`<run dir>/train.log`, `evaluate.log`), the file a
cluster user reads after the fact: the setup and resume lines, the progress lines, the summary, the
error or the command that resumes. A progress bar's redraws (lines with a carriage return) stay on the
terminal. Only the run's first rank writes it; DDP's other ranks keep their own logs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from l2m.jobs.lock import is_first_rank

# Loggers whose records reach the terminal through handlers of their own, not the root logger's.
OWN_HANDLER_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class _Copy:
    """A text stream that writes to `stream` and copies whole lines without "\\r" to `log`."""

    def __init__(self, stream: TextIO, log: logging.FileHandler):
        self._stream, self._log, self._partial = stream, log, ""

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        *lines, self._partial = (self._partial + text).split("\n")
        kept = [line for line in lines if "\r" not in line]
        if kept:
            self._log.acquire()
            try:
                self._log.stream.write("\n".join(kept) + "\n")
                self._log.flush()
            finally:
                self._log.release()
        return written

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, flush: the terminal's
        return getattr(self._stream, name)


@contextmanager
def output_in_job_log() -> Iterator[None]:
    """Copy stdout, stderr and Lightning's log records to the root logger's file (Hydra's job log)."""
    log = next((h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)), None)
    if log is None or not is_first_rank():
        yield
        return
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Copy(sys.stdout, log), _Copy(sys.stderr, log)
    for name in OWN_HANDLER_LOGGERS:
        logging.getLogger(name).addHandler(log)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        for name in OWN_HANDLER_LOGGERS:
            logging.getLogger(name).removeHandler(log)
