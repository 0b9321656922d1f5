"""Stop cleanly when the machine is taken away: SIGTERM (preemption, `kill`, `scancel`), SIGUSR1
(SLURM's warning before a time limit, `--signal=USR1@<s>`) or SIGUSR2 (submitit's) ends training at the
end of the step in flight with a checkpoint of that step (weights, optimizer, data-stream and callback
state), so that a resumed run loses nothing and continues exactly as an uninterrupted one would.

What happens next is the job's (l2m.jobs): requeue under SLURM, else a non-zero exit naming the
checkpoint and the command that resumes.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """Training stopped at a signal, after writing `checkpoint` at `step`."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(f"{signal_name} at step {step}; checkpoint written: {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class PreemptionCallback(L.Callback):
    """Checkpoint to `<dirpath>/last.ckpt` and raise Preempted when one of SIGNALS arrives in training.

    The handlers are installed when training starts, over Lightning's (whose SIGTERM handling stops
    without a checkpoint); Lightning restores the handlers of before the fit at its end. Under DDP a
    signal that reaches any rank stops every rank at the same step.
    """

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)
        self.received: int | None = None

    def _note(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        for signum in SIGNALS:
            signal.signal(signum, self._note)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        signum = self.received or 0
        if trainer.world_size > 1:  # every rank stops at the same step, whichever got the signal
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device), reduce_op="max"))
        if not signum:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        raise Preempted(signal.Signals(signum).name, trainer.global_step, path)
