"""The W&B logger of the `logger` config group (conf/logger/wandb.yaml), and what every run does
with its loggers: say how to upload an offline W&B run, close W&B runs between multirun jobs.

W&B runs online when an API key is available (WANDB_API_KEY or a netrc entry for the W&B host)
and offline otherwise, saying in one line how to upload the run later. A run directory keeps its
W&B run id, so a resumed run (online or offline) continues the same W&B run and its curves.
"""

from __future__ import annotations

import netrc
import secrets
import os
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from l2m.checks import UserError


def wandb_has_credentials() -> bool:
    """True when W&B can authenticate without prompting."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str | None) -> str:
    """The config's mode, else WANDB_MODE, else online with credentials and offline without."""
    mode = requested or os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
    if mode not in ("online", "offline", "disabled"):
        raise UserError(f"logger.mode={mode!r}: expected online, offline or disabled")
    return mode


def wandb_logger(
    save_dir: str | Path,
    project: str | None = "l2m",
    entity: str | None = None,
    mode: str | None = None,
    group: str | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
) -> WandbLogger:
    """A WandbLogger whose run is started here, on rank 0 only (other ranks log nothing):
    WandbLogger's own wandb.init passes settings that current wandb versions warn about. The run id
    is kept in <save_dir>/wandb/run-id and reopened by a run resumed in that directory."""
    mode = wandb_mode(mode)
    if mode == "offline":
        os.environ.setdefault("WANDB_SILENT", "true")  # our one line replaces W&B's banner
    settings = {"project": project, "entity": entity, "group": group or None, "name": name or None,
                "tags": list(tags or [])}
    experiment = None
    if rank_zero_only.rank == 0:
        import wandb

        id_file = Path(save_dir) / "wandb" / "run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        experiment = wandb.init(**settings, dir=str(save_dir), mode=mode, id=run_id, resume="allow")
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
    return WandbLogger(experiment=experiment, save_dir=str(save_dir), **settings)


@rank_zero_only
def announce_offline(loggers: list[Logger]) -> None:
    """One line per offline W&B run saying how to upload it."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger.experiment.settings.mode == "offline":
            run_dir = Path(logger.experiment.dir).parent  # .../wandb/offline-run-<time>-<id>
            print(f"W&B logged offline; upload this run with: wandb sync {run_dir}")


@rank_zero_only
def finish(loggers: list[Logger]) -> None:
    """Close the W&B runs, so that the next job of a multirun starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
