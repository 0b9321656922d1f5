"""Run identity and cluster plumbing: stable run directories (`run_id`), W&B names, the SLURM job a
run is part of, its requeue, and the SLURM resources that follow from the trainer config (what the
resolvers of conf/train.yaml and conf/hydra/launcher/*.yaml compute, l2m.jobs.resolvers)."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from l2m.checks import UserError


# hydra/launcher options whose sweeps get stable directories (and so resume where they stopped).
CLUSTER_LAUNCHERS = ("slurm", "local")


def checked_run_id(run_id: str | None) -> str | None:
    """A run id names a directory under outputs/ (multirun/): one that is a path would write elsewhere."""
    if run_id is not None and (not str(run_id).strip() or "/" in str(run_id) or "\\" in str(run_id)
                               or str(run_id) in (".", "..")):
        raise UserError(f"run_id={run_id!r} is not a name: a run id names outputs/<run_id> (a sweep: "
                        "multirun/<run_id>), without '/' or '..'; to put a run elsewhere, give "
                        "hydra.run.dir=<path> (a sweep: hydra.sweep.dir=<path>)")
    return run_id


def run_name(run_id: str | None) -> str:
    """A run's directory under outputs/: its run_id; in a SLURM job slurm-<job id>, which a requeued job
    keeps and every task of the job shares; else <date>/<time>."""
    job_id = slurm_job_id()
    return checked_run_id(run_id) or (f"slurm-{job_id}" if job_id else datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))


def sweep_id(run_id: str | None, _root_: Any = None) -> str | None:
    """A sweep's stable name: its run_id; under a cluster launcher the experiment's name (or `sweep`),
    so that a relaunched sweep finds its jobs; else None (run_name then gives <date>/<time>). The
    choices are read from the config being composed: Hydra resolves the sweep directory before it sets
    HydraConfig."""
    choices = OmegaConf.select(_root_, "hydra.runtime.choices", default=None) if _root_ is not None else None
    if not run_id and choices is not None and choices.get("hydra/launcher") in CLUSTER_LAUNCHERS:
        return choices.get("experiment") or "sweep"
    return checked_run_id(run_id)


def wandb_names() -> tuple[str | None, str | None]:
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


def devices_per_node(accelerator: str, devices: Any) -> int:
    """trainer.devices as a count: SLURM runs one task per device and must know how many."""
    if isinstance(devices, int) and devices > 0:
        return devices
    raise UserError(f"trainer.devices={devices!r}: the cluster launchers need the number of devices per node "
                     f"(one process each), e.g. trainer.devices=8 ({accelerator})")


def gpus_per_node(accelerator: str, devices: Any) -> int:
    return devices_per_node(accelerator, devices) if accelerator in ("gpu", "cuda") else 0


def cpus_per_task(threads: int | None, num_workers: int | None) -> int:
    """A task's CPUs: its torch threads and its DataLoader workers."""
    return max(1, threads or 1) + (num_workers or 0)


def in_slurm_job() -> bool:
    """Whether SLURM started this process as a task of a batch job, Lightning's rule (tasks known, not an
    interactive shell) without the srun hint its SLURMEnvironment.detect() warns with everywhere else."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def slurm_job_id() -> str | None:
    """The SLURM batch job this process runs in (array jobs as <array id>_<task>), else None."""
    if not in_slurm_job():
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue(job_id: str) -> str | None:
    """Put the SLURM job back in the queue; None on success, else why not. A job started from a sweep
    of hydra/launcher=slurm is requeued at most hydra.launcher.max_requeues times."""
    from hydra.core.hydra_config import HydraConfig

    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    limit = HydraConfig.get().launcher.get("max_requeues") if HydraConfig.initialized() else None
    if limit is not None and restarts >= limit:
        return f"it was requeued {restarts} times already, hydra.launcher.max_requeues={limit}"
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return None if result.returncode == 0 else (result.stderr.strip() or f"scontrol exited {result.returncode}")


def check_slurm_layout(trainer: Any) -> None:
    """Under SLURM, the job's nodes and tasks per node must be trainer.num_nodes and trainer.devices
    (Lightning takes each task for one device's process)."""
    if not in_slurm_job():
        return
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    tasks = int(os.environ.get("SLURM_NTASKS", nodes)) // nodes
    if trainer.get("num_nodes", 1) != nodes:
        raise UserError(f"trainer.num_nodes={trainer.get('num_nodes', 1)}, but this SLURM job has {nodes} node(s): "
                         f"set trainer.num_nodes={nodes} (hydra/launcher=slurm takes its nodes from trainer.num_nodes)")
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and devices > 0 and devices != tasks:
        raise UserError(f"trainer.devices={devices}, but this SLURM job runs {tasks} task(s) per node: Lightning runs "
                         f"one task per device, so submit it with --ntasks-per-node={devices} (hydra/launcher=slurm "
                         f"does) or set trainer.devices={tasks}")
