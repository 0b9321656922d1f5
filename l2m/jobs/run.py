"""The two jobs behind train.py and evaluate.py, callable with any composed config.

`train(cfg)` / `evaluate(cfg)` take the config that conf/train.yaml / conf/evaluate.yaml compose;
the run directory is `cfg.run_dir` (Hydra's output directory) unless `run_dir` is given (e.g.
with Hydra's compose API). Callbacks and loggers are whatever the `callbacks` and `logger`
groups name by `_target_`.
"""

from __future__ import annotations

import json
import logging
import re
import signal
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
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from l2m.checks import BAD_INPUT, UserError, check_device, check_int, error_chain, one_line_errors
from l2m.data import with_current_target
from l2m.data.contract import L2MData, check_data
from l2m.data.text.hub import looks_like_local_path
from l2m.evaluation import analyse_state
from l2m.jobs import resolvers  # noqa: F401  (registers the resolvers conf/ uses)
from l2m.jobs import schemas  # noqa: F401  (stores the schemas conf/ inherits, before Hydra composes it)
from l2m.jobs.cluster import check_slurm_layout, in_slurm_job
from l2m.jobs.lock import run_directory_lock
from l2m.jobs.multirun_ddp import ddp_job
from l2m.jobs.resume import (AUTO, SIGNAL_EXIT_BASE, RunStopped, check_resumable, checkpoint_path, choose_checkpoint,
                             data_arguments, data_option, stopped_by_signal, with_absolute_paths)
from l2m.models import load_checkpoint, load_pretrained
from l2m.report.run import print_summary, write_outputs
from l2m.training.callbacks import PositionwiseCallback, evaluate_heldout, model_name, run_summary
from l2m.training.checkpoints import AtomicCheckpointIO, CheckpointWriteError
from l2m.training.loggers import announce_offline, finish
from l2m.training.module import L2MModule, NonFiniteLossError
from l2m.training.preemption import Preempted
from l2m.training.progress import progress_bar

# Lightning warns about two things l2m does on purpose: the held-out set is evaluated by the
# PositionwiseCallback (so there is no validation_step), and the stream datasets define __len__
# while every DataLoader worker takes its own batches (l2m.data.stream); a run resumes in its own
# checkpoint folder (ckpt_path=auto). The others are not the user's business: a hint to use srun on
# any machine with SLURM installed, and Lightning's own use of a deprecated torch API.
EXPECTED_WARNINGS = (
    "You passed in a `val_dataloader` but have no `validation_step`",
    "Your `IterableDataset` has `__len__` defined",
    "Checkpoint directory",
    "The `srun` command is available on your system but is not used",
    "`isinstance(treespec, LeafSpec)` is deprecated",
)
# Lightning's advertisements, logged at every Trainer start.
LIGHTNING_TIPS = "💡 Tip:"


class _WithoutTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIPS)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node




@contextmanager
def report_errors() -> Iterator[None]:
    """Bad input, a diverged run and an unwritable or full disk end with one line and exit status 1
    (l2m.checks.one_line_errors). A run stopped by a signal exits with 128 + the signal's number, as if
    killed by it, saying how it resumes. Both exit with SystemExit, so that a sweep stops there instead
    of going on to the next job."""
    try:
        with one_line_errors(NonFiniteLossError, CheckpointWriteError,
                             path_hint="check the path, or choose one you can write to (hydra.run.dir=..., "
                                       "data.cache_dir=...)"):
            try:
                yield
            except InterpolationResolutionError as error:  # an l2m resolver's check of a config value
                cause = next((e for e in error_chain(error) if isinstance(e, UserError)), None)
                if cause is None:
                    raise
                raise UserError(f"{error.full_key}: {cause}") from error
    except RunStopped as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_status)


@contextmanager
def expected_warnings_silenced() -> Iterator[None]:
    lightning_log, tips = logging.getLogger("lightning.pytorch.utilities.rank_zero"), _WithoutTips()
    lightning_log.addFilter(tips)
    try:
        with warnings.catch_warnings():
            for message in EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=re.escape(message))
            yield
    finally:
        lightning_log.removeFilter(tips)


def with_run_dir(cfg: DictConfig, run_dir: str | Path | None) -> Path:
    """The run directory (cfg.run_dir unless given), written back into cfg for the callbacks and
    loggers that interpolate ${run_dir}."""
    if run_dir is not None:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
    return Path(cfg.run_dir)


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads: on a loaded 2-core machine its default (every core) made a tiny
    Mamba step 30x slower than one thread (12.8 s against 0.42 s at L = 64)."""
    if threads is not None:
        torch.set_num_threads(check_int("threads", threads))


@rank_zero_only
def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """The fully resolved config of this run (Hydra's .hydra/config.yaml keeps interpolations)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def instantiate_group(group: str, node: DictConfig | None) -> list:
    """The objects of a config group such as `callbacks` or `logger`: one per entry with a `_target_`;
    an entry's refused settings are one line naming it."""
    objects = []
    for name, entry in (node or {}).items():
        if not (isinstance(entry, DictConfig) and "_target_" in entry):
            continue
        try:
            objects.append(instantiate(entry))
        except InstantiationException as error:
            cause = error.__cause__
            if isinstance(cause, UserError):
                raise cause from error
            if isinstance(cause, (ValueError, TypeError)):
                raise UserError(f"{group}.{name} ({entry._target_}): {cause}") from error
            raise
    return objects


def instantiate_data(data: dict) -> L2MData:
    """The datamodule of a data config; its bad input (ValueError, a missing file, an unreachable hub)
    comes out as such, its message prefixed with the datamodule."""
    try:
        datamodule = instantiate(data)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, BAD_INPUT):
            raise type(cause)(f"data ({data.get('_target_')}): {cause}") from cause
        if isinstance(cause, (ValueError, TypeError)):  # a library's check of a data argument
            raise UserError(f"data ({data.get('_target_')}): {cause}") from cause
        raise
    return check_data(datamodule)


# Kept from the preset when init_from brings the same architecture: how it runs, not what it computes.
RUNTIME_KEYS = ("backend", "chunk_size")


def adopt_imported(source: str, preset: dict, imported: dict) -> dict:
    """The imported model config, with the preset's runtime keys where the architectures agree; one
    line says which preset values it replaced."""
    config = dict(imported)
    if preset.get("arch") == imported.get("arch"):
        config.update({k: preset[k] for k in RUNTIME_KEYS if k in preset})
    replaced = [f"{k}={preset[k]!r} (now {config.get(k)!r})" for k in sorted(preset)
                if k != "name" and preset[k] != config.get(k, preset[k])]
    replaced += [f"{k} (dropped)" for k in sorted(set(preset) - set(config))]
    if replaced:
        rank_zero_info(f"init_from {source}: its model config replaces the preset's " + ", ".join(replaced))
    return config


def build(cfg: DictConfig) -> tuple[L2MData, L2MModule]:
    data = with_absolute_paths(_plain(cfg.data))
    datamodule = instantiate_data(data)
    model_config, initial = _plain(cfg.model), None
    if cfg.get("init_from"):
        initial, imported = load_pretrained(cfg.init_from, max_seq_len=datamodule.seq_len)
        model_config = adopt_imported(cfg.init_from, model_config, imported)
        if initial.io != datamodule.io_config():
            raise UserError(
                f"init_from={cfg.init_from} reads {initial.io}, but the data gives {datamodule.io_config()}: use its "
                "tokenizer (data.tokenizer=...) and vocabulary (data.vocab_size=...)"
            )
    module = L2MModule(
        model=model_config,
        io=datamodule.io_config(),
        seq_len=datamodule.seq_len,
        optim=_plain(cfg.optim),
        schedule=_plain(cfg.get("schedule")),
        compile=cfg.compile,
        data=data,
    )
    if initial is not None:
        module.model.load_state_dict(initial.state_dict())  # weights only: the optimizer starts fresh
    return datamodule, module


def checkpoint_directory(callbacks: Sequence[L.Callback], run_dir: Path) -> Path:
    """Where the run's checkpoints go: the checkpoint callback's folder, else <run_dir>/checkpoints."""
    folders = [c.dirpath for c in callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    return Path(folders[0]) if folders else run_dir / "checkpoints"


def finished_summary(run_dir: Path, step: int, max_steps: int | None) -> dict | None:
    """The summary of a run that already trained to max_steps and wrote it, else None."""
    summary = run_dir / "summary.json"
    if max_steps is None or not 0 <= max_steps <= step or not summary.is_file():
        return None
    return json.loads(summary.read_text())


def check_run_length(cfg: DictConfig) -> int:
    """trainer.max_steps: a step count, or -1 (until stopped; the LR schedule then needs schedule.total_steps).
    Lightning's own check of a negative count is a traceback from inside fit."""
    max_steps = cfg.trainer.get("max_steps")
    if max_steps != -1:
        # 0 trains nothing, and its schedule would ask for the length that was given
        check_int("trainer.max_steps", max_steps, low=1,
                  what="a step count (or -1: until stopped; evaluate.py evaluates a checkpoint without training)")
    return max_steps


def train(cfg: DictConfig, run_dir: str | Path | None = None, callbacks: Sequence[L.Callback] = ()) -> dict:
    """Train per `cfg`; return the run summary (also in <run_dir>/summary.json). With ckpt_path=auto a
    run continues from its directory's newest valid checkpoint, and one that has finished is not
    trained again. A run directory that another live run holds is an error."""
    run_dir = with_run_dir(cfg, run_dir)
    with run_directory_lock(run_dir):
        return _train_in(cfg, run_dir, callbacks)


def _train_in(cfg: DictConfig, run_dir: Path, callbacks: Sequence[L.Callback]) -> dict:
    check_slurm_layout(cfg.trainer)
    set_threads(cfg.get("threads"))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module = build(cfg)
    configured = instantiate_group("callbacks", cfg.callbacks)
    max_steps = check_run_length(cfg)
    resume = choose_checkpoint(cfg.ckpt_path, checkpoint_directory(configured, run_dir))
    ckpt_path = None
    if resume is not None:
        ckpt_path, contents = resume
        step = int(contents["global_step"])
        finished = finished_summary(run_dir, step, max_steps) if cfg.ckpt_path == AUTO else None
        if finished is not None:
            rank_zero_info(f"already finished: {run_dir} trained to step {step}; its summary: {run_dir / 'summary.json'}")
            return finished
        check_resumable(ckpt_path, contents, module.hparams, max_steps)
        rank_zero_info(f"resuming from {ckpt_path} (step {step})")
    save_config(cfg, run_dir)

    loggers = instantiate_group("logger", cfg.logger)
    for logger in loggers:
        logger.log_hyperparams(_plain(cfg))
    with ddp_job(), expected_warnings_silenced():
        trainer = instantiate(
            cfg.trainer,
            logger=loggers or False,
            callbacks=[*configured, *callbacks, *([progress_bar()] if cfg.trainer.get("enable_progress_bar") is not False else [])],
            # l2m's PreemptionCallback checkpoints and requeues; Lightning's SLURM requeue would compete with it
            plugins=[AtomicCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if in_slurm_job() else [])],
            default_root_dir=run_dir,
            limit_val_batches=0,  # held-out evaluation is the PositionwiseCallback's
            num_sanity_val_steps=0,
            _convert_="all",
        )
        try:
            announce_offline(loggers)
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except NonFiniteLossError as error:
            checkpoints = [c for c in configured if isinstance(c, ModelCheckpoint)]
            last = (checkpoints and checkpoints[0].last_model_path) or "none saved yet"
            raise NonFiniteLossError(f"{error}\nlast good checkpoint: {last}") from error
        except Preempted as stop:
            raise stopped_by_signal(stop, run_dir, trainer.global_rank) from stop
        except SIGTERMException as stop:  # Lightning's, for a SIGTERM before l2m's handlers took over
            raise RunStopped("stopped by SIGTERM before the first step; nothing was lost: run the same command "
                             "again", SIGNAL_EXIT_BASE + signal.SIGTERM) from stop
        finally:
            finish(loggers)
    summary = next((c.summary for c in configured if isinstance(c, PositionwiseCallback)), None) or {}
    if trainer.is_global_zero and summary:
        files = {"plot": run_dir / "positionwise.png", "metrics": run_dir / "summary.json"}
        if trainer.checkpoint_callback is not None:
            files["ckpt"] = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        print_summary(summary, files)
    return summary


HF_PREFIX = "hf:"


# Summary keys computed from the training run's periodic held-out evaluations (convergence).
TRAINING_HISTORY_KEYS = ("slope_last20", "slope_last20_se", "still_falling", "heldout_history")


def evaluate(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Recompute position-wise metrics of `cfg.ckpt_path` on its held-out set (an l2m checkpoint),
    or of a Hugging Face causal LM (ckpt_path=hf:<folder or id>) on the text data given in
    cfg.data; write the run files."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path is None:
        raise UserError("evaluate needs a checkpoint: ckpt_path=<run dir>/checkpoints/last.ckpt (or hf:<folder>)")
    run_dir = with_run_dir(cfg, run_dir)
    set_threads(cfg.get("threads"))
    overrides = _plain(cfg.data)
    source = str(cfg.ckpt_path)
    if source.startswith(HF_PREFIX):
        model, data, name, step, callback_state = _hf_model_and_data(source[len(HF_PREFIX):], overrides)
    else:
        checkpoint = load_checkpoint(checkpoint_path(source))
        model, name, step = checkpoint.model, model_name(checkpoint.hparams["model"]), checkpoint.step
        callback_state = checkpoint.callbacks.get(PositionwiseCallback.__qualname__, {})
        data = _trained_on_data(checkpoint.hparams["data"], overrides)
        source = str(checkpoint.path)
    save_config(cfg, run_dir)
    device = torch.device(check_device("device", cfg.device) if cfg.device != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    datamodule = instantiate_data(data)
    if datamodule.io_config() != model.io:
        raise UserError(f"the model reads {model.io}, but the data gives {datamodule.io_config()}")
    positions = getattr(model, "max_positions", None)
    if positions is not None and datamodule.seq_len > positions:
        raise UserError(f"the model has learned positions for {positions} tokens, but the data gives L = "
                         f"{datamodule.seq_len}: evaluate it at L <= {positions} ({datamodule.length_options}), "
                         "or train a model with model.positional=rotary, which holds any length")
    datamodule.prepare_data()
    datamodule.setup("validate")

    with expected_warnings_silenced():
        metrics = evaluate_heldout(model, datamodule, device, keep_heldout=True)
    analysis = analyse_state(metrics, model, datamodule, **_plain(cfg.analysis))
    history, initial = callback_state.get("history"), callback_state.get("initial") or {}
    summary = run_summary(model, name, datamodule, metrics, step, analysis, history)
    # what the checkpoint remembers of its training, not measured here: said so in the table and the summary
    from_training = [*initial, *(TRAINING_HISTORY_KEYS if history else ())]
    summary = {**summary, **initial, "ckpt_path": source, "from_training": from_training}
    paths = write_outputs(run_dir, metrics, summary, analysis, title=name, smooth=cfg.smooth)
    print_summary(summary, {"plot": paths["plot"], "metrics": paths["summary"]})
    return summary


def _trained_on_data(trained_on: dict, overrides: dict) -> dict:
    """The data config a checkpoint was trained on, updated by the keys given (val_size...): any
    argument of its data module, also those added to it since the checkpoint was written."""
    trained_on = with_current_target(trained_on)
    options = set(trained_on) | set(data_arguments(trained_on))
    unknown = sorted(set(overrides) - options)
    if unknown:
        raise UserError(
            f"data.{unknown[0]} is not an option of the checkpoint's data ({trained_on.get('_target_')}); "
            f"it takes: {', '.join(sorted(k for k in options if not k.startswith('_')))}"
        )
    data = {**trained_on, **overrides}
    for key in data_option(data, "path_options"):
        value = data.get(key)
        if isinstance(value, str) and looks_like_local_path(value) and not Path(value).expanduser().exists():
            raise FileNotFoundError(f"the checkpoint's data.{key}={value} is not found from {Path.cwd()}: give its place "
                                    f"here, data.{key}=<path>")
    return data


def _hf_model_and_data(path_or_id: str, overrides: dict) -> tuple:
    """(model, text data config, name, step, callback state) to evaluate a Hugging Face causal LM."""
    from l2m.models.hf import load_causal_lm

    if "source" not in overrides:
        raise UserError(f"evaluate.py ckpt_path=hf:{path_or_id} needs the text to evaluate on: data.source=<folder of "
                         ".txt, .jsonl or .parquet, or a hub dataset id> (and data.tokenizer, default the model's)")
    seq_len = overrides.get("seq_len", 128)
    model = load_causal_lm(path_or_id, max_seq_len=seq_len)
    data = {"_target_": "l2m.data.text.TextDataModule", "tokenizer": path_or_id, "seq_len": seq_len,
            "vocab_size": model.io["vocab_size"], **overrides}
    return model, data, Path(path_or_id).name, 0, {}
