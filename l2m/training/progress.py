"""Training progress in optimizer steps out of trainer.max_steps: a bar on a terminal, plain lines
at a bounded rate elsewhere.

l2m's train streams are endless and an "epoch" is a nominal chunk of `epoch_size` batches, so
Lightning's per-epoch bar showed "Epoch 0/-2" and counted the batches of one chunk (799/1000 with
max_steps=3000, 7/34 after a resume).
"""

from __future__ import annotations

import datetime
import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run: `training steps  450/2000`, the logged progress-bar metrics beside it;
    a resumed run starts at its step."""

    @property
    def train_description(self) -> str:
        """The bar's name from its first draw (a bar drawn as "Training" and renamed left that line behind)."""
        return "training steps"

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.train_progress_bar.reset(total=total)
        self._show(trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        """Nothing: an epoch is not a unit of an l2m run."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._should_update(trainer.global_step, self.train_progress_bar.total):
            self._show(trainer.global_step)
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """End the bars' lines, so that the run's one-line error (on stderr, the same terminal) starts a
        line of its own instead of being glued to the last redraw."""
        for bar in (self._train_progress_bar, self._val_progress_bar):
            if bar is not None:
                bar.close()

    def _show(self, step: int) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.n = step
            self.train_progress_bar.refresh()


class StepLines(ProgressBar):
    """Progress where no terminal reads it (a SLURM log, `> file`): a plain line every `every` steps and
    at the last, `step 450/2000 (22%)  kl_per_token 10.40  tokens/s 12,345  elapsed 0:01:23`, instead
    of a bar's redraws (about two per step). `every` defaults to a twentieth of the run, rounded up to
    a multiple of the logging interval so that each line shows values logged at its step."""

    def __init__(self, every: int | None = None):
        super().__init__()
        self.every = every
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start = time.perf_counter()
        if self.every is None:
            log_every = max(trainer.log_every_n_steps, 1)
            twentieth = math.ceil(trainer.max_steps / 20) if trainer.max_steps > 0 else 10 * log_every
            self.every = math.ceil(twentieth / log_every) * log_every

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if not (self._enabled and trainer.is_global_zero and (step % self.every == 0 or step == total)):
            return
        done = f"step {step}/{total} ({step / total:.0%})" if total > 0 else f"step {step}"
        values = [f"{name.split('/')[-1]} {value:.4g}" for name, value in self.get_metrics(trainer, pl_module).items()
                  if name != "v_num"]
        rate = trainer.callback_metrics.get("perf/tokens_per_sec")
        if rate is not None:
            values.append(f"tokens/s {float(rate):,.0f}")
        elapsed = datetime.timedelta(seconds=round(time.perf_counter() - self._start))
        print("  ".join([done, *values, f"elapsed {elapsed}"]), flush=True)


def progress_bar() -> ProgressBar:
    """The step bar on a terminal, plain lines elsewhere."""
    return StepProgressBar() if sys.stderr.isatty() else StepLines()
