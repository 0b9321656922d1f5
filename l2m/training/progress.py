"""The training progress bar in optimizer steps out of trainer.max_steps.

l2m's train streams are endless and an "epoch" is a nominal chunk of `epoch_size` batches, so
Lightning's per-epoch bar showed "Epoch 0/-2" and counted the batches of one chunk (799/1000 with
max_steps=3000, 7/34 after a resume).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


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

    def _show(self, step: int) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.n = step
            self.train_progress_bar.refresh()
