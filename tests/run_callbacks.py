"""Callbacks that train.py subprocesses of the tests load by import path (`+callbacks.<name>._target_=`),
so no conftest import here."""

import os
import signal

import lightning as L


class SignalRankAt(L.Callback):
    """Sends the process of rank `rank` a real signal just before step `step` is trained."""

    def __init__(self, step: int, rank: int, signum: str = "SIGUSR1"):
        self.step, self.rank, self.signum = step, rank, signal.Signals[signum]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)
