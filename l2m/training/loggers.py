"""Loggers from the `logger` config group: wandb (default), csv or none.

W&B runs online when an API key is available (WANDB_API_KEY or a netrc entry for the W&B host)
and offline otherwise, saying in one line how to upload the run later.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

LOGGERS = ("wandb", "csv", "none")


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
        raise ValueError(f"logger.mode={mode!r}: expected online, offline or disabled")
    return mode


def build_logger(cfg: Any, run_dir: Path, config: dict, group: str | None, name: str | None) -> Logger | bool:
    """The Lightning logger for `cfg` (the `logger` config group); False for none."""
    kind = cfg.get("name")
    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(save_dir=run_dir, name="csv", version="")
    if kind != "wandb":
        raise ValueError(f"logger.name={kind!r}: expected one of {LOGGERS}")
    mode = wandb_mode(cfg.get("mode"))
    if mode == "offline":
        os.environ.setdefault("WANDB_SILENT", "true")  # our one line replaces W&B's banner
    settings = {
        "project": cfg.get("project"),
        "entity": cfg.get("entity"),
        "group": cfg.get("group") or group,
        "name": cfg.get("run_name") or name,
        "tags": list(cfg.get("tags") or []),
    }
    # The run is started here, on rank 0 only (other ranks log nothing): WandbLogger's own
    # wandb.init passes settings that current wandb versions warn about.
    experiment = None
    if rank_zero_only.rank == 0:
        import wandb

        experiment = wandb.init(**settings, dir=str(run_dir), mode=mode, config=config)
    return WandbLogger(experiment=experiment, save_dir=str(run_dir), **settings)


@rank_zero_only
def announce_offline(logger: Logger | bool) -> None:
    """One line saying how to upload an offline W&B run."""
    if isinstance(logger, WandbLogger) and logger.experiment.settings.mode == "offline":
        run_dir = Path(logger.experiment.dir).parent  # .../wandb/offline-run-<time>-<id>
        print(f"W&B logged offline; upload this run with: wandb sync {run_dir}")


@rank_zero_only
def finish(logger: Logger | bool) -> None:
    """Close the W&B run, so that the next job of a multirun starts its own."""
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()
