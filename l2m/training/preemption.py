"""Stop cleanly when the machine is taken away: SIGTERM (preemption, `kill`, `scancel`), SIGUSR1
(SLURM's warning before a time limit, `--signal=USR1@<s>`) or SIGUSR2 (submitit's) ends training at the
end of a step with a checkpoint of that step (weights, optimizer, data-stream and callback state), so
that a resumed run loses nothing and continues exactly as an uninterrupted one would.

In one process the signal is seen at the end of the step in flight. Under DDP every rank must stop at
the same step, which takes a collective: the ranks agree every `check_every_seconds` (or every
`check_every_n_steps`), not every step, so a signal costs at most the steps since the last check of the
grace time before the kill (SLURM's KillWait, 30 s by default), and no step pays a network round trip.

What happens next is the job's (l2m.jobs): requeue under SLURM, else a non-zero exit naming the
checkpoint and the command that resumes.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from l2m.checks import UserError

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
    signal that reaches any rank stops every rank at the same step: the ranks agree in one all-reduce
    at each check, which also agrees the steps to the next check (each rank proposes the steps that
    take it `check_every_seconds`; the fewest win).

    Args:
        dirpath: where last.ckpt is written.
        check_every_seconds: under DDP, the time between agreements.
        check_every_n_steps: under DDP, agree every this many steps instead (then check_every_seconds
            must be null).
    """

    def __init__(self, dirpath: str | Path, check_every_seconds: float | None = 5.0,
                 check_every_n_steps: int | None = None):
        if (check_every_seconds is None) == (check_every_n_steps is None):
            raise UserError("callbacks.preemption: set one of check_every_seconds and check_every_n_steps, "
                            f"the other null (got {check_every_seconds} and {check_every_n_steps})")
        if (check_every_seconds is not None and check_every_seconds <= 0) or (
                check_every_n_steps is not None and check_every_n_steps < 1):
            raise UserError("callbacks.preemption: check_every_seconds must be > 0 and check_every_n_steps >= 1")
        self.dirpath = Path(dirpath)
        self.check_every_seconds, self.check_every_n_steps = check_every_seconds, check_every_n_steps
        self.received: int | None = None

    def _note(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a SIGTERM Lightning's handler caught before training (setup, sanity checks) is not lost
        self.received = signal.SIGTERM if trainer.received_sigterm else None
        for signum in SIGNALS:
            signal.signal(signum, self._note)
        # Lightning broadcasts, every step under DDP, a flag that only its own SIGTERM handler sets:
        # with l2m's handlers in place it is always 0, and this callback's checks take its place.
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None
        self._next_check = trainer.global_step + 1  # the first step's time is not yet known
        self._last_check = (trainer.global_step, time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        signum = self.received or 0
        if trainer.world_size > 1:
            if trainer.global_step < self._next_check:
                return
            signum = self._agree(trainer, pl_module.device, signum)
        if not signum:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        raise Preempted(signal.Signals(signum).name, trainer.global_step, path)

    def _agree(self, trainer: L.Trainer, device: torch.device, signum: int) -> int:
        """The largest signal number any rank received, and the step of the next check, agreed by all
        ranks in one all-reduce."""
        step, now = trainer.global_step, time.perf_counter()
        if self.check_every_n_steps is not None:
            interval = self.check_every_n_steps
        else:
            seconds_per_step = (now - self._last_check[1]) / max(step - self._last_check[0], 1)
            interval = max(1, int(self.check_every_seconds / max(seconds_per_step, 1e-9)))
        votes = torch.tensor([signum, -interval], dtype=torch.int64, device=device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)  # the largest signal, the fewest steps to the next check
        signum, negative_interval = votes.tolist()
        self._next_check, self._last_check = step - negative_interval, (step, now)
        return signum
