"""Make Lightning's DDP process launcher safe inside Hydra runs and multiruns.

Lightning's `ddp` strategy starts ranks 1..N-1 by re-running the script with `sys.argv` plus
`hydra.run.dir=<HydraConfig.run.dir>`. Inside a Hydra multirun that is wrong twice over: the
children get `-m` and the sweep's comma lists, so each re-launches the whole sweep, and
`run.dir` is not the job's output directory. Between jobs of a multirun, the parent also keeps
LOCAL_RANK and friends in its environment and an initialised process group, so the next job
believes its processes were created externally and waits for ranks that never come.

`ddp_job()` wraps one job: the children re-run exactly this job (its own overrides, no `-m`) in
this job's output directory, and the parent leaves no distributed state to the next job.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist

# Set by Lightning's launcher in the parent process for its children.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def single_job_argv(argv: list[str], task_overrides: list[str]) -> list[str]:
    """argv that re-runs one job: the script and its config-location flags, then the job's overrides."""
    kept = [argv[0]]
    args = iter(argv[1:])
    for arg in args:
        if arg in _CONFIG_FLAGS:
            kept += [arg, next(args)]
        elif arg.startswith(tuple(f"{flag}=" for flag in _CONFIG_FLAGS)):
            kept.append(arg)
    return kept + list(task_overrides)


@contextmanager
def ddp_job() -> Iterator[None]:
    """Wrap one (Hydra) training job that may launch DDP child processes."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    launched_here = "LOCAL_RANK" not in os.environ  # False in a child, or under torchrun / SLURM
    if not (launched_here and HydraConfig.initialized()):
        yield
        return
    hydra_cfg = HydraConfig.get()
    saved_argv, saved_env = sys.argv, {k: os.environ.get(k) for k in _LAUNCH_ENV}
    sys.argv = single_job_argv(sys.argv, list(hydra_cfg.overrides.task))
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # Lightning passes this to the children
    try:
        yield
    finally:
        sys.argv = saved_argv
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
