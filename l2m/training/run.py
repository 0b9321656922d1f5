"""The two jobs behind train.py and evaluate.py, callable with any composed config.

`train(cfg)` / `evaluate(cfg)` take the config that conf/train.yaml / conf/evaluate.yaml compose;
the run directory is Hydra's output directory unless `run_dir` is given (e.g. with Hydra's
compose API).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from l2m.data.gaussian import MAX_LEVELS
from l2m.training.callbacks import HistoryStateCallback, PositionwiseCallback, evaluate_module, run_summary
from l2m.training.launch import ddp_job
from l2m.training.loggers import announce_offline, build_logger, finish
from l2m.training.module import L2MModule, NonFiniteLossError
from l2m.training.report import print_summary, write_outputs

# Lightning warns about two things l2m does on purpose: the held-out set is evaluated by the
# PositionwiseCallback (so there is no validation_step), and the stream datasets define __len__
# while every DataLoader worker takes its own batches (l2m.data.stream).
warnings.filterwarnings("ignore", message="You passed in a `val_dataloader` but have no `validation_step`")
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

GAUSSIAN_LENGTHS = {4**levels: levels for levels in range(1, MAX_LEVELS + 1)}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


@contextmanager
def report_errors() -> Iterator[None]:
    """Bad input and a diverged run end with their message and exit status 1, not a traceback
    (HYDRA_FULL_ERROR=1 shows it). ConnectionError: a hub dataset that cannot be reached
    (l2m.data.text.sources.SourceUnavailableError, raised while preparing the data); ImportError:
    an optional package a chosen option needs (e.g. backend=kernels without mamba-ssm)."""
    try:
        yield
    except (ValueError, FileNotFoundError, ImportError, ConnectionError, NonFiniteLossError) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def resolve_run_dir(run_dir: str | Path | None) -> Path:
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    return Path(run_dir)


@rank_zero_only
def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """The fully resolved config of this run (Hydra's .hydra/config.yaml keeps interpolations)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def checkpoint_path(path: str | None) -> str | None:
    """Absolute path of an existing checkpoint, or a clear error."""
    if path is None:
        return None
    ckpt = Path(path).expanduser().absolute()
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"ckpt_path={path}: no such checkpoint. Checkpoints are in <run dir>/checkpoints/, "
            "e.g. outputs/<date>/<time>/checkpoints/last.ckpt"
        )
    return str(ckpt)


def data_config(data: Any) -> dict:
    """The data config as a plain dict. For the Gaussian task `seq_len`, if set, picks `levels`."""
    data = dict(_plain(data))
    if str(data.get("_target_", "")).endswith("GaussianDataModule") and "seq_len" in data:
        seq_len = data.pop("seq_len")
        if seq_len is not None:
            if seq_len not in GAUSSIAN_LENGTHS:
                raise ValueError(
                    f"data.seq_len={seq_len} is not a length of the Gaussian family, whose lengths are "
                    f"L = 4**levels: {', '.join(map(str, GAUSSIAN_LENGTHS))} (data.levels=1..{MAX_LEVELS})"
                )
            data["levels"] = GAUSSIAN_LENGTHS[seq_len]
    return data


def run_names() -> tuple[str | None, str | None]:
    """W&B group and run name: runs of one multirun (or one experiment) share a group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hydra_cfg = HydraConfig.get()
    experiment = hydra_cfg.runtime.choices.get("experiment")
    group = experiment
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = "/".join(Path(hydra_cfg.sweep.dir).parts[-2:])  # e.g. 2026-11-23/19-20-00
        group = f"{experiment or 'multirun'} {sweep}"
    return group, hydra_cfg.job.override_dirname or None


def instantiate_data(data: dict) -> L.LightningDataModule:
    """The datamodule of a data config; its bad-input ValueError comes out as such."""
    try:
        return instantiate(data)
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError):
            raise ValueError(f"data ({data.get('_target_')}): {error.__cause__}") from error.__cause__
        raise


def build(cfg: DictConfig, data: dict) -> tuple[L.LightningDataModule, L2MModule]:
    datamodule = instantiate_data(data)
    module = L2MModule(
        model=_plain(cfg.model),
        io=datamodule.io_config(),
        seq_len=datamodule.seq_len,
        task=datamodule.task,
        optim=_plain(cfg.optim),
        compile=cfg.compile,
        data=data,
    )
    return datamodule, module


def train(cfg: DictConfig, run_dir: str | Path | None = None, callbacks: Sequence[L.Callback] = ()) -> dict:
    """Train per `cfg`; return the run summary (also in <run_dir>/summary.json)."""
    run_dir = resolve_run_dir(run_dir)
    ckpt_path = checkpoint_path(cfg.ckpt_path)
    save_config(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module = build(cfg, data_config(cfg.data))

    group, name = run_names()
    logger = build_logger(cfg.logger, run_dir, _plain(cfg), group, name)
    cb_cfg = cfg.callbacks
    positionwise = PositionwiseCallback(run_dir, cb_cfg.positionwise.every_n_steps, cb_cfg.positionwise.smooth)
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step{step}",
        auto_insert_metric_name=False,
        every_n_train_steps=cb_cfg.checkpoint.every_n_steps,
        save_top_k=cb_cfg.checkpoint.save_top_k,
        save_last=True,
    )
    l2m_callbacks = [HistoryStateCallback(), positionwise] if cb_cfg.l2m else []
    extra = [instantiate(c) for c in (cb_cfg.extra or {}).values()]
    trainer = L.Trainer(
        **_plain(cfg.trainer),
        logger=logger,
        callbacks=[*l2m_callbacks, checkpoints, *extra, *callbacks],
        default_root_dir=run_dir,
        limit_val_batches=0,  # held-out evaluation is the PositionwiseCallback's
        num_sanity_val_steps=0,
    )
    with ddp_job():
        try:
            announce_offline(logger)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except NonFiniteLossError as error:
            last = checkpoints.last_model_path or "none saved yet"
            raise NonFiniteLossError(f"{error}\nlast good checkpoint: {last}") from error
        finally:
            finish(logger)
    summary = positionwise.summary or {}
    if trainer.is_global_zero and summary:
        print_summary(summary, {"plot": run_dir / "positionwise.png", "metrics": run_dir / "summary.json",
                                "ckpt": Path(checkpoints.dirpath) / "last.ckpt"})
    return summary


def evaluate(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Recompute position-wise metrics of `cfg.ckpt_path` on its held-out set; write the run files."""
    run_dir = resolve_run_dir(run_dir)
    if cfg.ckpt_path is None:
        raise ValueError("evaluate needs a checkpoint: ckpt_path=<run dir>/checkpoints/last.ckpt")
    ckpt_path = checkpoint_path(cfg.ckpt_path)
    save_config(cfg, run_dir)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    # One read of the file serves the weights, the step and the callbacks' state.
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    module = L2MModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    module.to(device)
    # The data config is the one trained on, updated by the non-null keys given here (val_size...).
    trained_on = module.hparams.data
    overrides = {k: v for k, v in _plain(cfg.data).items() if v is not None}
    unknown = sorted(set(overrides) - set(trained_on))
    if unknown:
        raise ValueError(
            f"data.{unknown[0]} is not an option of the checkpoint's data ({trained_on.get('_target_')}); "
            f"it takes: {', '.join(sorted(k for k in trained_on if not k.startswith('_')))}"
        )
    datamodule = instantiate_data(data_config({**trained_on, **overrides}))
    if datamodule.io_config() != module.hparams.io:
        raise ValueError(
            f"the checkpoint's model reads {module.hparams.io}, but the data gives {datamodule.io_config()}"
        )
    datamodule.prepare_data()
    datamodule.setup("validate")

    metrics = evaluate_module(module, datamodule)
    initial = checkpoint.get("callbacks", {}).get(PositionwiseCallback.__qualname__, {}).get("initial") or {}
    summary = {**run_summary(module, datamodule, metrics, checkpoint["global_step"]), **initial, "ckpt_path": ckpt_path}
    paths = write_outputs(run_dir, metrics, summary, title=summary["model"], smooth=cfg.smooth)
    print_summary(summary, {"plot": paths["plot"], "metrics": paths["summary"]})
    return summary
