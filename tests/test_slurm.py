"""Sweeps on a real SLURM cluster: the one-node cluster scripts/slurm-local.sh starts on this machine
(slurmctld, slurmd, munge). A sweep through hydra/launcher=slurm, a job preempted by SIGUSR1 that
requeues itself and resumes from the checkpoint it wrote, and a 2-task DDP job under srun."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from l2m.jobs.run import train

FAST = ["logger=none", "data.levels=2", "data.val_size=8", "data.batch_size=4", "+trainer.enable_progress_bar=false"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def slurm():
    """Start the cluster; skip (saying why) only where it cannot be started here: not root, no apt."""
    result = subprocess.run(["bash", str(REPO / "scripts" / "slurm-local.sh")], capture_output=True, text=True, timeout=900)
    if result.returncode == 2:
        pytest.skip(f"no SLURM cluster: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def job_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%t"], capture_output=True, text=True).stdout.strip()


def test_a_slurm_sweep_whose_preempted_job_requeues_and_resumes_from_its_signal_checkpoint(slurm, compose_train, tmp_path):
    sweep = tmp_path / "sweep"
    job = [*FAST, "trainer.max_steps=300", "callbacks.checkpoint.every_n_train_steps=50"]
    process = subprocess.Popen(
        [sys.executable, "train.py", "-m", "hydra/launcher=slurm", *job, "model=tiny-gpt,tiny-mamba", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(sweep.glob("0_*/checkpoints/step*.ckpt")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.2)
    (job0,) = sweep.glob("0_*")
    job_id = next(p.name for p in (sweep / ".submitit").iterdir() if p.name.endswith("_0"))
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    while job_state(job_id) != "PD":  # requeued by the job itself
        assert time.monotonic() < deadline, "the job was not requeued"
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True)  # skip SLURM's requeue delay
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]

    log = "\n".join(p.read_text() for p in (sweep / ".submitit" / job_id).glob("*.err"))
    signal_line = next(line for line in log.splitlines() if line.startswith("stopped by SIGUSR1 at step "))
    stopped_at = int(signal_line.split("at step ")[1].split(";")[0])
    assert f"SLURM job {job_id} requeued" in signal_line and 0 < stopped_at < 300
    assert f"resuming from {job0 / 'checkpoints' / 'last.ckpt'} (step {stopped_at})" in log
    uninterrupted = train(compose_train(*job, "model=tiny-gpt"), run_dir=tmp_path / "uninterrupted")
    assert read_summary(job0)["avg_kl"] == pytest.approx(uninterrupted["avg_kl"], rel=1e-6)
    assert read_summary(job0)["step"] == 300
    assert read_summary(next(sweep.glob("1_*")))["model"] == "tiny-mamba"


def test_a_two_task_ddp_job_under_srun(slurm, tmp_path):
    """Run as `sbatch` + `srun python train.py` with no run directory given: both tasks, and the job
    after a requeue, use outputs/slurm-<job id>."""
    command = f"srun {sys.executable} {REPO / 'train.py'} trainer=ddp-cpu trainer.max_steps=8 {' '.join(FAST)}"
    result = subprocess.run(["sbatch", "--parsable", "--wait", "--ntasks-per-node=2", "--cpus-per-task=1",
                             f"--output={tmp_path / 'log'}", "--wrap", command], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=400)
    log = (tmp_path / "log").read_text()
    assert result.returncode == 0, log[-3000:]
    job_id = result.stdout.strip()
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == [f"slurm-{job_id}"]
    summary = read_summary(tmp_path / "outputs" / f"slurm-{job_id}")
    assert summary["step"] == 8 and summary["num_sequences"] == 8  # the held-out set, split over the 2 ranks
    assert "MEMBER: 2/2" in log  # both ranks, placed by SLURM's environment


def test_ddp_inside_a_sweep_of_the_slurm_launcher(slurm, tmp_path):
    """Two tasks per node from trainer.devices=2, ranks from SLURM's environment, one summary."""
    sweep = tmp_path / "sweep"
    result = subprocess.run([sys.executable, "train.py", "-m", "hydra/launcher=slurm", "trainer=ddp-cpu", "trainer.max_steps=8",
                             *FAST, f"hydra.sweep.dir={sweep}"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = sweep.glob("0_*")
    assert read_summary(job)["step"] == 8 and read_summary(job)["num_sequences"] == 8
    log = "\n".join(p.read_text() for p in (sweep / ".submitit").rglob("*.err"))
    assert "MEMBER: 2/2" in log and "#SBATCH --ntasks-per-node=2" in next((sweep / ".submitit").rglob("*.sh")).read_text()


def test_a_job_whose_nodes_disagree_with_trainer_num_nodes_is_a_clear_error(slurm, tmp_path):
    command = f"srun {sys.executable} train.py trainer.max_steps=2 {' '.join(FAST)} hydra.run.dir={tmp_path / 'run'}"
    result = subprocess.run(["sbatch", "--wait", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={tmp_path / 'log'}",
                             "--wrap", command], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    log = (tmp_path / "log").read_text()
    assert result.returncode != 0
    assert ("error: trainer.devices=1, but this SLURM job runs 2 task(s) per node: Lightning runs one task per device, "
            "so submit it with --ntasks-per-node=1") in log
    assert "Traceback" not in log


def test_a_job_past_max_requeues_is_not_requeued_and_the_sweep_names_it_as_failed(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    process = subprocess.Popen(
        [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "hydra.launcher.max_requeues=0", *FAST,
         "trainer.max_steps=300", "callbacks.checkpoint.every_n_train_steps=50", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(sweep.glob("0_*/checkpoints/step*.ckpt")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    job_id = min(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir())  # one job: not an array
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert "1 of 1 sweep jobs failed:\n  #0 " in stderr and "Traceback" not in stderr
    assert "stopped by SIGUSR1 at step" in stderr
    assert (f"requeueing SLURM job {job_id} failed (it was requeued 0 times already, hydra.launcher.max_requeues=0). "
            "Resume with: python train.py -m") in stderr
