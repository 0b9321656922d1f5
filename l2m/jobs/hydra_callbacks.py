"""Hydra callbacks of train.py and evaluate.py (conf: hydra.callbacks)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class WritableOutputDirectory(Callback):
    """Hydra creates the run (or sweep) directory before any l2m code runs, and a directory it cannot
    create ended in its traceback: check it first and end with one line."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(directory: str, option: str) -> None:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            print(f"error: cannot create the output directory {directory} ({error.strerror}): give a place you can "
                  f"write to, {option}=...", file=sys.stderr)
            sys.exit(1)
