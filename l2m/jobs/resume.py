"""Resuming runs: which checkpoint `ckpt_path` names (auto: the run directory's newest valid one),
whether it may continue under this config, and what a run stopped by a signal does next (requeue
under SLURM, else a non-zero exit with the command that resumes it)."""

from __future__ import annotations

import dataclasses
import inspect
import shlex
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import OmegaConf

from l2m.checks import UserError
from l2m.data import with_current_target
from l2m.data.contract import L2MData
from l2m.jobs.cluster import requeue, slurm_job_id
from l2m.models import model_config, read_checkpoint
from l2m.training.checkpoints import latest_checkpoint, remove_partial_files
from l2m.training.preemption import Preempted

AUTO = "auto"
# Keys that change how a run executes or reads its data, not what it trains: free to change on resume.
# (A data module says its own: L2MData.runtime_options.)
RUNTIME_MODEL_KEYS = ("name", "backend", "chunk_size")
# Exit status of a run stopped by a signal, as a shell reports a process killed by it (128 + number).
SIGNAL_EXIT_BASE = 128


class RunStopped(Exception):
    """The run stopped before its end and can be resumed: exit with `exit_status`, not 0."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def checkpoint_path(path: str | None) -> str | None:
    """Absolute path of an existing checkpoint, or a clear error."""
    if path is None:
        return None
    ckpt = Path(path).expanduser().absolute()
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"ckpt_path={path}: no such checkpoint. Checkpoints are in <run dir>/checkpoints/, e.g. "
            "outputs/<date>/<time>/checkpoints/last.ckpt; ckpt_path=auto takes the run directory's newest"
        )
    return str(ckpt)


def choose_checkpoint(requested: str | None, checkpoint_dir: Path) -> tuple[Path, dict] | None:
    """(path, contents) of the checkpoint to resume from: the one named, the newest valid one in
    `checkpoint_dir` for `auto` (None when there is none: a fresh start), or None."""
    if requested is None:
        return None
    if requested != AUTO:
        path = Path(checkpoint_path(requested))
        return path, read_checkpoint(path)
    if not checkpoint_dir.is_dir():
        return None
    remove_partial_files(checkpoint_dir)
    return latest_checkpoint(checkpoint_dir)


def data_class(data: Mapping[str, Any]) -> type:
    """The data module class that `data` configures (a moved `_target_` mapped); L2MData where it cannot
    be imported (building it says why)."""
    try:
        return get_class(with_current_target(dict(data))["_target_"])
    except Exception:  # noqa: BLE001  ImportError, ValueError, KeyError: reported when it is built
        return L2MData


def data_option(data: Mapping[str, Any], name: str) -> Any:
    """A class attribute of L2MData (runtime_options, path_options, ...) as the data module that `data`
    configures sets it; the contract's default where it does not."""
    return getattr(data_class(data), name, getattr(L2MData, name))


def data_arguments(data: Mapping[str, Any]) -> list[str]:
    """The keyword arguments of the data module that `data` configures (none where it cannot be imported)."""
    parameters = inspect.signature(data_class(data)).parameters.values()
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def with_absolute_paths(data: Mapping[str, Any]) -> dict:
    """The data config with its local paths (those that exist here) made absolute."""
    paths = data_option(data, "path_options")

    def absolute(key: str, value: Any) -> Any:
        if key in paths and isinstance(value, str) and Path(value).expanduser().exists():
            return str(Path(value).expanduser().absolute())
        return value

    return {key: absolute(key, value) for key, value in data.items()}


def with_defaults(section: str, config: Mapping[str, Any]) -> dict:
    """A model or data config with every option its class takes, the defaults filled in: a checkpoint of
    an earlier version lacks the options added since, and a relative path there is absolute now."""
    if section == "model":
        return {"name": config.get("name"), **dataclasses.asdict(model_config(dict(config)))}
    config = with_current_target(config)
    parameters = inspect.signature(get_class(config["_target_"])).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return with_absolute_paths({**defaults, **config})


def training_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What a checkpoint's training-module arguments and this run's disagree on, in the model or the
    data: keys that change what is trained (runtime keys are free to change)."""
    differences = []
    runtime_data = {key for config in (saved, current) for key in data_option(config.get("data") or {}, "runtime_options")}
    for section, free in (("model", RUNTIME_MODEL_KEYS), ("data", runtime_data)):
        old, new = (with_defaults(section, config.get(section) or {}) for config in (saved, current))
        if old.get("arch") != new.get("arch"):  # another architecture: its options say nothing more
            old, new = {"arch": old.get("arch")}, {"arch": new.get("arch")}
        for key in sorted(set(old) | set(new)):
            if key not in free and old.get(key) != new.get(key):
                differences.append(f"{section}.{key} is {old.get(key)!r} there and {new.get(key)!r} here")
    return differences


def check_resumable(path: Path, contents: Mapping[str, Any], current: Mapping[str, Any], max_steps: int | None) -> None:
    """A clear error unless this config may continue the checkpoint's run."""
    differences = training_differences(contents["hyper_parameters"], current)
    if differences:
        raise UserError(
            f"cannot resume from {path}: it trained another model or data ({'; '.join(differences)}). Resume "
            "with the settings it was trained with, or start a new run: another run_id or hydra.run.dir, or "
            "ckpt_path=null in a fresh directory"
        )
    step = int(contents["global_step"])
    if max_steps is not None and 0 <= max_steps <= step:
        raise UserError(
            f"trainer.max_steps={max_steps}, but {path} is already at step {step}: nothing is left to train. "
            f"Raise trainer.max_steps above {step} to train on, or evaluate it: python evaluate.py ckpt_path={path}"
        )


def stopped_by_signal(stop: Preempted, run_dir: Path, global_rank: int) -> RunStopped:
    """What a run stopped by a signal ends with: under SLURM it is requeued (it resumes from its
    checkpoint with ckpt_path=auto), otherwise the message names the command that resumes it."""
    status = SIGNAL_EXIT_BASE + int(signal.Signals[stop.signal_name])
    job_id = slurm_job_id()
    if job_id is not None:
        failure = requeue(job_id) if global_rank == 0 else None
        if failure is None:
            return RunStopped(f"stopped by {stop}; SLURM job {job_id} requeued, it resumes from there", status)
        return RunStopped(f"stopped by {stop}; requeueing SLURM job {job_id} failed ({failure}). Resume with: "
                          f"{resume_command(run_dir)}", status)
    message = f"stopped by {stop}\nresume with: {resume_command(run_dir)}"
    not_run = sweep_jobs_not_run()
    if not_run:
        message += ("\nthe sweep stopped here; these jobs did not run (the command above runs them):\n  "
                    + "\n  ".join(not_run))
    return RunStopped(message, status)


def resume_command(run_dir: Path) -> str:
    """The command that continues this run (or sweep) where it stopped: the same overrides, the same
    directory, and ckpt_path=auto (the default) to find the checkpoint there."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return f"train(cfg, run_dir={str(run_dir)!r}) with ckpt_path=auto"
    hydra_cfg = HydraConfig.get()
    script = f"{hydra_cfg.job.name}.py"  # the entry point (sys.argv[0] is submitit's inside its jobs)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = _sweep_config(hydra_cfg).hydra.overrides if multirun else hydra_cfg.overrides
    directory = f"hydra.sweep.dir={hydra_cfg.sweep.dir}" if multirun else f"hydra.run.dir={run_dir}"
    kept = [a for a in (*overrides.hydra, *overrides.task)
            if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir=", "hydra.mode=", "ckpt_path="))]
    return " ".join(["python", script, *(["-m"] if multirun else []), *map(shlex.quote, [*kept, directory])])


def _sweep_config(hydra_cfg: Any) -> Any:
    return OmegaConf.load(Path(hydra_cfg.sweep.dir) / "multirun.yaml")


def sweep_jobs_not_run() -> list[str]:
    """The jobs after this one in a sweep that runs its jobs one after another (Hydra's basic
    launcher), as `#<num> <overrides>`; [] outside such a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or hydra_cfg.runtime.choices.get("hydra/launcher") != "basic":
        return []
    arguments = OverridesParser.create().parse_overrides(list(_sweep_config(hydra_cfg).hydra.overrides.task))
    jobs = [job for batch in BasicSweeper.split_arguments(arguments, None) for job in batch]
    return [f"#{num} {' '.join(job)}" for num, job in enumerate(jobs) if num > hydra_cfg.job.num]
