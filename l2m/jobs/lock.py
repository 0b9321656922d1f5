"""One live run per run directory.

Two processes training into one directory (a re-submitted job beside its requeued twin, two shells
with the same run_id) would write `last.ckpt` and `last-v1.ckpt` and overwrite each other's summary.
The run's first rank holds an exclusive lock on `<run dir>/.lock` while it trains; the OS releases it
when the process ends, however it ends, so a requeued job or a rerun after a crash takes it over. The
other DDP ranks of the run do not take it.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from l2m.checks import UserError

LOCK_FILE = ".lock"
# Where a launcher says which rank a process is; the run's first rank has 0 in each that is set.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_first_rank() -> bool:
    return all(int(os.environ.get(name) or 0) == 0 for name in RANK_VARIABLES)


@contextmanager
def run_directory_lock(run_dir: Path) -> Iterator[None]:
    """Hold `<run_dir>/.lock` for the block (first rank only); UserError naming the holder if a live
    process holds it."""
    if not is_first_rank():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "a process that has not yet written its name"
            raise UserError(f"{run_dir} is in use by another live run ({holder}): wait for it to end, or give this "
                            "run a directory of its own (run_id=<name>, or hydra.run.dir=<path>)") from None
        since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        lock.seek(0)
        lock.truncate()
        lock.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {since}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
