"""Checkpoints that survive crashes: written beside their final name and renamed into place, and the
newest readable one of a run directory found for `ckpt_path=auto`.

Lightning's own writer streams into a temporary file in $TMPDIR and moves it over the old checkpoint;
when the run directory is on another filesystem (NFS, Lustre, a tmpfs), that move is a copy that
truncates the old file first, so a kill during it leaves an empty `last.ckpt` and a full disk a
truncated one under a normal name.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from l2m.checks import error_chain
from l2m.models import UnreadableCheckpointError, read_checkpoint

PARTIAL_MARK = ".partial-"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); earlier checkpoints are intact."""


def _out_of_space(error: BaseException | None) -> bool:
    """Whether a write failed for want of space: torch.save reports ENOSPC as the context of its own error."""
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in error_chain(error))


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `<dir>/.<name>.partial-<pid>`, fsyncs it, renames it to `<dir>/<name>` (atomic within one
    filesystem) and fsyncs the directory: a checkpoint name only ever holds a whole checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
            _fsync_directory(path.parent)
        except BaseException as error:
            partial.unlink(missing_ok=True)
            if _out_of_space(error):
                raise CheckpointWriteError(
                    f"no space left on the device writing the checkpoint {path}; the earlier checkpoints are "
                    "intact: free space there (or move the run directory) and resume"
                ) from error
            raise


def remove_partial_files(directory: Path) -> None:
    """Delete the temporary files of checkpoint writes that a kill interrupted."""
    for partial in directory.glob(f".*.ckpt{PARTIAL_MARK}*"):
        partial.unlink(missing_ok=True)
        rank_zero_info(f"removed {partial.name}, a checkpoint write that did not finish")


def latest_checkpoint(directory: Path) -> tuple[Path, dict] | None:
    """(path, contents) of the readable checkpoint with the highest step in `directory` (the newest file
    among equal steps), or None. Unreadable files are passed over, each with a line saying so."""
    best = None
    for path in sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            contents = read_checkpoint(path)
        except UnreadableCheckpointError as error:
            rank_zero_info(f"ckpt_path=auto: skipping {error}")
            continue
        if best is None or contents["global_step"] > best[1]["global_step"]:
            best = (path, contents)
    return best
