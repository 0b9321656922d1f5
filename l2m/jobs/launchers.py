"""Hydra launchers for sweeps that outgrow one process (conf/hydra/launcher/):

* `SlurmLauncher` (hydra/launcher=slurm): one SLURM job per sweep job, through submitit.
* `LocalLauncher` (hydra/launcher=local): up to `max_parallel` sweep jobs at once on this machine,
  each in its own process with its own GPUs (CUDA_VISIBLE_DEVICES), or on the CPU with its own threads.

Both wait for every job and end with one line per failed job (its last line of output and its log)
instead of stopping at the first failure. They need hydra-submitit-launcher (`pip install 'l2m[slurm]'`).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from omegaconf import OmegaConf

from l2m.checks import UserError

try:
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
except ImportError as error:  # the launcher configs name these classes; say what to install
    raise ImportError("hydra/launcher=slurm and hydra/launcher=local need hydra-submitit-launcher: "
                      "pip install 'l2m[slurm]'") from error


class SweepJobsFailed(CompactHydraException):
    """Some jobs of a sweep failed (Hydra prints this message alone, without a traceback)."""


def _last_line(path: Path) -> str:
    """The job's last line of output (srun's own lines about the task's exit status left out)."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines()
                 if line.strip() and not line.startswith("srun: ")]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


class _SweepLauncher(BaseSubmititLauncher):
    """Submits the jobs (how: `_submit`), waits for all of them and reports the failed ones."""

    def _job_params(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[tuple]:
        return [(list(overrides), "hydra.sweep.dir", initial_job_idx + i, f"job_id_for_{initial_job_idx + i}",
                 Singleton.get_state()) for i, overrides in enumerate(job_overrides)]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        params = self._job_params(job_overrides, initial_job_idx)
        for overrides, _, num, _, _ in params:
            print(f"  #{num}: {' '.join(filter_overrides(overrides))}", flush=True)
        jobs = self._submit(params)
        results, failed = [], []
        for job, (overrides, _, num, _, _) in zip(jobs, params):
            name = f"#{num} {' '.join(filter_overrides(overrides))}"
            try:
                result = job.results()[0] if self._wait(job) else None
            except Exception:  # submitit's errors for a job that died or exited without a result
                result = None
            if result is None:
                failed.append(f"{name}: {_last_line(Path(job.paths.stderr))} (log: {job.paths.stderr})")
                continue
            if result.status == JobStatus.FAILED:
                failed.append(f"{name}: {result._return_value!r} (log: {job.paths.stderr})")
                continue
            results.append(result)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        template = Path(str(self.params["submitit_folder"]))  # submitit makes the folder of its %j template too
        if "%j" in template.name and template.is_dir() and not any(template.iterdir()):
            template.rmdir()
        print(f"{len(results)} of {len(jobs)} jobs finished under {sweep_dir}; the report: "
              f"python -m l2m.sweep {sweep_dir}", flush=True)
        if failed:
            raise SweepJobsFailed(f"{len(failed)} of {len(jobs)} sweep jobs failed:\n  " + "\n  ".join(failed))
        return results

    def _logs(self) -> str:
        """Where a job's output goes: its run directory's train.log, and submitit's folder per job."""
        folder = str(self.params["submitit_folder"]).replace("%j", "<job id>")
        return f"each run directory's train.log, and submitit's under {folder}"

    def _submit(self, params: list[tuple]) -> list:
        raise NotImplementedError

    def _wait(self, job: Any) -> bool:
        """Wait for the job to end; whether it left a result to read."""
        return True


class SlurmLauncher(_SweepLauncher):
    """One SLURM job per sweep job (a job array), resources from conf/hydra/launcher/slurm.yaml."""

    _EXECUTOR = "slurm"

    def _executor(self) -> Any:
        """submitit's SLURM executor with the settings of slurm.yaml (submitit's generic names as they
        are, the others with the prefix `slurm_`)."""
        own = ("submitit_folder", "max_requeues")
        executor = submitit.AutoExecutor(cluster="slurm", folder=self.params["submitit_folder"],
                                         slurm_max_num_timeout=self.params["max_requeues"])
        generic = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in self.params.items() if k not in own})
        return executor

    def _submit(self, params: list[tuple]) -> list:
        executor = self._executor()
        print(f"submitting {len(params)} SLURM jobs; their logs: {self._logs()}", flush=True)
        return executor.map_array(self, *zip(*params))

    def _wait(self, job: Any) -> bool:
        """Wait until the job wrote its result or left the queue (a job that stopped with an error, or
        was not requeued, writes none). submitit would ask sacct, which never answers on clusters
        without accounting: a job that ended without a result would be waited for forever."""
        while not job.paths.result_pickle.exists():
            queue = subprocess.run(["squeue", "-h", "-j", str(job.job_id), "-o", "%t"], capture_output=True, text=True)
            if (queue.returncode == 0 and not queue.stdout.strip()) or "Invalid job id" in queue.stderr:
                time.sleep(2)  # a result written just before the job left the queue may still be arriving
                return job.paths.result_pickle.exists()
            time.sleep(2)
        return True


class LocalLauncher(_SweepLauncher):
    """Runs up to `max_parallel` jobs at once, each with `gpus_per_job` GPUs of its own (0: CPU jobs).
    max_parallel null: as many as the GPUs allow, or for CPU jobs the cores over `threads`."""

    _EXECUTOR = "local"

    def _slots(self) -> list[tuple[int, ...]]:
        gpus = int(self.params.get("gpus_per_job") or 0)
        if gpus:
            import torch

            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = [int(i) for i in visible.split(",") if i.strip()] if visible else list(range(torch.cuda.device_count()))
            if len(ids) < gpus:
                raise UserError(f"hydra.launcher.gpus_per_job={gpus}, but this machine shows {len(ids)} GPU(s)")
            slots = [tuple(ids[i:i + gpus]) for i in range(0, len(ids) - gpus + 1, gpus)]
        else:
            slots = [()] * max(1, (os.cpu_count() or 1) // max(1, int(self.params.get("threads") or 1)))
        limit = self.params.get("max_parallel")
        return slots[:limit] if limit else slots

    def _submit(self, params: list[tuple]) -> list:
        executor = submitit.LocalExecutor(folder=self.params["submitit_folder"])
        executor.update_parameters(timeout_min=self.params["timeout_min"])
        free, running, jobs = self._slots(), {}, []
        print(f"running {len(params)} jobs, {len(free)} at a time; their logs: {self._logs()}", flush=True)
        for job_params in params:
            while not free:
                time.sleep(0.5)
                for job in [job for job in running if job.done()]:
                    free.append(running.pop(job))
            slot = free.pop(0)
            executor.update_parameters(visible_gpus=slot, gpus_per_node=len(slot))
            job = executor.submit(self, *job_params)
            running[job] = slot
            jobs.append(job)
        return jobs
