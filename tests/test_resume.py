"""Runs that survive being stopped: a signal checkpoints the step in flight and exits non-zero with the
command that resumes; ckpt_path=auto continues exactly where the run stopped; checkpoints are written
crash-safe; resuming checks what the config changes; W&B continues the same run; sweeps run jobs in
parallel with the results of a sequential sweep. Real signals, processes, Lightning and Hydra."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO, run_script
from l2m.jobs.resume import RunStopped
from l2m.jobs.run import train
from l2m.training.checkpoints import AtomicCheckpointIO, CheckpointWriteError, latest_checkpoint

FAST = ["logger=none", "data.levels=2", "data.val_size=8", "data.batch_size=4", "+trainer.enable_progress_bar=false"]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def checkpoint_step(path: Path) -> int:
    return torch.load(path, weights_only=False, map_location="cpu")["global_step"]


class SignalAt(L.Callback):
    """Sends this process a real signal just before step `step` is trained."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_checkpoints_the_step_in_flight_and_auto_resume_ends_as_an_uninterrupted_run(compose_train, tmp_path, signum):
    common = [*FAST, "trainer.max_steps=12", "schedule.warmup_steps=3", "callbacks.checkpoint.every_n_train_steps=100"]
    full = train(compose_train(*common), run_dir=tmp_path / "full")
    with pytest.raises(RunStopped) as stopped:
        train(compose_train(*common), run_dir=tmp_path / "run", callbacks=[SignalAt(5, signum)])
    name = signal.Signals(signum).name
    assert stopped.value.exit_status == 128 + signum
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert str(stopped.value).startswith(f"stopped by {name} at step 6; checkpoint written: {last}")
    assert "resume with: " in str(stopped.value)
    assert checkpoint_step(last) == 6 and not (tmp_path / "run" / "summary.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers of before the fit are back

    resumed = train(compose_train(*common), run_dir=tmp_path / "run")  # ckpt_path=auto is the default
    assert resumed["avg_kl"] == pytest.approx(full["avg_kl"], rel=1e-6)
    assert resumed["initial_avg_kl"] == full["initial_avg_kl"] and resumed["step"] == 12
    assert [step for step, _ in resumed["heldout_history"]] == [step for step, _ in full["heldout_history"]]
    # the same command once more: already finished, nothing trained again
    assert train(compose_train(*common), run_dir=tmp_path / "run") == read_summary(tmp_path / "run")


@pytest.mark.parametrize("optim, state_key", [("adamw", "exp_avg_sq"), ("sgd", "momentum_buffer")])
def test_each_shipped_optimizer_trains_and_resumes_exactly(compose_train, tmp_path, optim, state_key):
    common = [*FAST, f"optim={optim}", "schedule.warmup_steps=2", "schedule.total_steps=8",
              "callbacks.checkpoint.every_n_train_steps=100"]
    full = train(compose_train(*common, "trainer.max_steps=8"), run_dir=tmp_path / "full")
    train(compose_train(*common, "trainer.max_steps=4"), run_dir=tmp_path / "run")
    resumed = train(compose_train(*common, "trainer.max_steps=8"), run_dir=tmp_path / "run")
    assert resumed["avg_kl"] < resumed["initial_avg_kl"]  # it trained
    assert resumed["avg_kl"] == full["avg_kl"]  # to the last bit: the same weights, evaluated alike
    ends = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
            for run in ("full", "run")]
    assert all(end["global_step"] == 8 for end in ends)
    for name, weights in ends[0]["state_dict"].items():
        torch.testing.assert_close(ends[1]["state_dict"][name], weights, rtol=0, atol=0, msg=name)
    states = [end["optimizer_states"][0] for end in ends]
    assert states[0]["param_groups"] == states[1]["param_groups"]
    assert all(state_key in per_parameter for per_parameter in states[1]["state"].values())
    for index, per_parameter in states[0]["state"].items():
        torch.testing.assert_close(states[1]["state"][index][state_key], per_parameter[state_key], rtol=0, atol=0)


def test_a_new_optimizer_is_one_yaml_file_in_the_users_own_config_folder(compose_train, tmp_path):
    (tmp_path / "conf" / "optim").mkdir(parents=True)
    (tmp_path / "conf" / "optim" / "adagrad.yaml").write_text("_target_: torch.optim.Adagrad\nlr: 0.05\nweight_decay: 0.01\n")
    cfg = compose_train(*FAST, "trainer.max_steps=3", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "optim=adagrad",
                        "optim.lr=0.02", "~schedule")
    train(cfg, run_dir=tmp_path / "run")
    end = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    decayed, other = end["optimizer_states"][0]["param_groups"]
    assert (decayed["lr"], decayed["weight_decay"], other["weight_decay"]) == (0.02, 0.01, 0.0)  # constant rate
    assert all("sum" in state for state in end["optimizer_states"][0]["state"].values())  # Adagrad's own state
    assert end["lr_schedulers"] == [] and end["l2m_schedule"]["optimizer"] == "torch.optim.Adagrad"


def wait_for(pattern: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list(Path(pattern.anchor).glob(str(pattern.relative_to(pattern.anchor)))):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no {pattern} after {timeout} s"
        time.sleep(0.2)


def test_sigterm_stops_a_sweep_with_a_nonzero_exit_naming_the_jobs_not_run_and_the_resume_command(tmp_path):
    sweep = tmp_path / "sweep"
    job = [*FAST, "trainer.max_steps=300", "callbacks.checkpoint.every_n_train_steps=50"]
    args = ["-m", *job, "model=tiny-gpt,tiny-mamba", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(sweep / "0_*" / "checkpoints" / "step*.ckpt", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    (job0,) = sweep.glob("0_*")
    assert checkpoint_step(job0 / "checkpoints" / "last.ckpt") >= 50
    assert "stopped by SIGTERM at step" in stderr and "the sweep stopped here; these jobs did not run" in stderr
    (not_run,) = [line for line in stderr.splitlines() if line.startswith("  #")]
    assert not_run.startswith("  #1 ") and "model=tiny-mamba" in not_run.split()
    assert not list(sweep.glob("1_*"))  # the second job never started
    command = shlex.split(stderr.split("resume with: ")[1].splitlines()[0])
    assert command[:3] == ["python", "train.py", "-m"] and f"hydra.sweep.dir={sweep}" in command

    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    uninterrupted = run_script("train.py", *job, "model=tiny-gpt", f"hydra.run.dir={tmp_path / 'single'}")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert read_summary(job0)["avg_kl"] == pytest.approx(read_summary(tmp_path / "single")["avg_kl"], rel=1e-6)
    assert read_summary(next(sweep.glob("1_*")))["model"] == "tiny-mamba"


def test_sigkill_while_writing_a_checkpoint_across_filesystems_keeps_the_previous_one(tmp_path):
    """The run directory on a tmpfs (/dev/shm), $TMPDIR on disk: the layout where Lightning's writer
    left an empty last.ckpt. Kill a process that rewrites a 40 MB checkpoint in a loop."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary directory")
    run_dir = Path(tempfile_dir := os.path.join(shm, f"l2m-test-{os.getpid()}"))
    try:
        writer = (
            "import sys, torch\n"
            "from l2m.training.checkpoints import AtomicCheckpointIO\n"
            "io = AtomicCheckpointIO()\n"
            "step = 0\n"
            "while True:\n"
            "    io.save_checkpoint({'global_step': step, 'w': torch.full((10_000_000,), float(step))}, sys.argv[1])\n"
            "    print(step, flush=True); step += 1\n"
        )
        process = subprocess.Popen([sys.executable, "-c", writer, str(run_dir / "last.ckpt")], cwd=REPO,
                                   stdout=subprocess.PIPE, text=True)
        for _ in range(3):  # a few whole writes, then kill it in the middle of one
            process.stdout.readline()
        time.sleep(0.05)
        process.kill()
        process.wait()
        checkpoint = torch.load(run_dir / "last.ckpt", weights_only=False)
        assert checkpoint["w"][0] == checkpoint["global_step"] >= 2  # whole, and one of the finished writes
        path, contents = latest_checkpoint(run_dir)  # what ckpt_path=auto reads, and it removes the partial file
        assert path == run_dir / "last.ckpt" and contents["global_step"] == checkpoint["global_step"]
    finally:
        subprocess.run(["rm", "-rf", tempfile_dir])


def test_a_full_disk_is_one_clear_error_and_earlier_checkpoints_stay(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs to mount a small tmpfs (root) to fill a disk")
    try:
        io = AtomicCheckpointIO()
        io.save_checkpoint({"global_step": 1, "w": torch.zeros(100_000)}, disk / "last.ckpt")  # 0.4 MB
        with pytest.raises(CheckpointWriteError, match=r"no space left on the device writing the checkpoint .*last.ckpt; "
                                                       r"the earlier checkpoints are intact"):
            io.save_checkpoint({"global_step": 2, "w": torch.zeros(2_000_000)}, disk / "last.ckpt")  # 8 MB
        assert [p.name for p in disk.iterdir()] == ["last.ckpt"]  # no partial file left behind
        assert torch.load(disk / "last.ckpt", weights_only=False)["global_step"] == 1
    finally:
        subprocess.run(["umount", str(disk)])


def test_auto_resume_skips_a_corrupt_checkpoint_and_takes_the_previous_valid_one(compose_train, tmp_path):
    common = [*FAST, "trainer.max_steps=8", "callbacks.checkpoint.every_n_train_steps=4", "callbacks.checkpoint.save_top_k=-1"]
    train(compose_train(*common, "schedule.total_steps=12"), run_dir=tmp_path)
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 100)  # a checkpoint destroyed by a crash
    (tmp_path / "summary.json").unlink()
    summary = train(compose_train(*common[:-2], "trainer.max_steps=12", "schedule.total_steps=12",
                                  "callbacks.checkpoint.every_n_train_steps=4"), run_dir=tmp_path)
    assert summary["step"] == 12
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 12


def test_resume_rejects_another_model_or_data_and_a_run_length_already_reached(compose_train, tmp_path):
    common = [*FAST, "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=100"]
    train(compose_train(*common), run_dir=tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"cannot resume from .*last.ckpt: it trained another model or data "
                                         r"\(model.arch is 'gpt' there and 'mamba' here.*\)"):
        train(compose_train(*common, "model=tiny-mamba", "trainer.max_steps=8"), run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"data.kind is 'subvolume' there and 'log' here"):
        train(compose_train(*common, "data.kind=log", "trainer.max_steps=8", f"ckpt_path={ckpt}"), run_dir=tmp_path / "b")
    with pytest.raises(ValueError, match=r"trainer.max_steps=3, but .*last.ckpt is already at step 4: nothing is left to "
                                         r"train. Raise trainer.max_steps above 4"):
        train(compose_train(*common, "trainer.max_steps=3", f"ckpt_path={ckpt}"), run_dir=tmp_path / "c")
    # runtime keys may change: more workers, another backend
    assert train(compose_train(*common, "trainer.max_steps=6", "data.num_workers=1", f"ckpt_path={ckpt}"),
                 run_dir=tmp_path / "d")["step"] == 6


def test_resume_applies_a_new_learning_rate_and_schedule(compose_train, tmp_path, caplog):
    common = [*FAST, "callbacks.checkpoint.every_n_train_steps=100", "schedule.warmup_steps=2"]
    train(compose_train(*common, "trainer.max_steps=4"), run_dir=tmp_path)
    with caplog.at_level("INFO"):
        train(compose_train(*common, "trainer.max_steps=10", "optim.lr=1e-4", "schedule.min_lr_ratio=0.5"), run_dir=tmp_path)
    assert ("resuming at step 4 with new optimizer settings, the LR schedule rebuilt on them: lr 0.003 -> 0.0001, "
            "total_steps (schedule.total_steps, else trainer.max_steps) 4 -> 10, min_lr_ratio 0.1 -> 0.5") in caplog.text
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [1e-4, 1e-4]
    # at the end of the new cosine schedule: lr x min_lr_ratio
    assert [g["lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]] == pytest.approx([5e-5, 5e-5])


def test_a_resumed_wandb_run_keeps_its_run_id(compose_train, tmp_path):
    common = [*FAST[1:], "logger=wandb", "callbacks.checkpoint.every_n_train_steps=100", "schedule.total_steps=8"]
    train(compose_train(*common, "trainer.max_steps=4"), run_dir=tmp_path)
    train(compose_train(*common, "trainer.max_steps=8"), run_dir=tmp_path)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "wandb" / "run-id").read_text()
    # wandb adds -1 to the folder of a run that starts in the same second as the one before
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d+_\d+-{run_id}(-\d+)?", run.name) for run in runs)


def test_local_launcher_runs_jobs_at_once_with_the_results_of_a_sequential_sweep(tmp_path):
    sweep = ["-m", *FAST, "model=tiny-gpt,tiny-mamba", "trainer.max_steps=30"]
    parallel = run_script("train.py", *sweep, "hydra/launcher=local", f"hydra.sweep.dir={tmp_path / 'parallel'}")
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert (f"running 2 jobs, 2 at a time; their logs: each run directory's train.log, and submitit's under "
            f"{tmp_path / 'parallel' / '.submitit' / '<job id>'}") in parallel.stdout
    logs = sorted((tmp_path / "parallel").glob("*/train.log"))
    assert len(logs) == 2
    for log in logs:  # the run's own output, submitit's lines once each
        text = log.read_text()
        assert "L²M run summary" in text and text.count("Job completed successfully") == 1, text
    assert f"2 of 2 jobs finished under {tmp_path / 'parallel'}; the report: python -m l2m.sweep" in parallel.stdout
    assert not (tmp_path / "parallel" / ".submitit" / "%j").exists()  # submitit's template folder, empty
    sequential = run_script("train.py", *sweep, f"hydra.sweep.dir={tmp_path / 'sequential'}")
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    for job in ("0_*", "1_*"):
        a, b = (read_summary(next((tmp_path / kind).glob(job))) for kind in ("parallel", "sequential"))
        assert a["avg_kl"] == b["avg_kl"] and a["model"] == b["model"]


def test_a_second_live_run_in_one_directory_stops_naming_the_holder_and_a_dead_runs_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    endless = [*FAST, "trainer.max_steps=100000", "callbacks.checkpoint.every_n_train_steps=100000"]
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *endless, f"hydra.run.dir={run_dir}"], cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while f"pid {first.pid}," not in ((run_dir / ".lock").read_text() if (run_dir / ".lock").exists() else ""):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = run_script("train.py", *FAST, "trainer.max_steps=4", f"hydra.run.dir={run_dir}")
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert (f"error: {run_dir} is in use by another live run (host {socket.gethostname()}, pid {first.pid}, since "
                in second.stderr), second.stderr[-2000:]
        assert "give this run a directory of its own (run_id=<name>, or hydra.run.dir=<path>)" in second.stderr
    finally:
        first.kill()  # SIGKILL: nothing of it runs on, and the OS drops its lock
        first.wait()
    third = run_script("train.py", *FAST, "trainer.max_steps=4", f"hydra.run.dir={run_dir}")
    assert third.returncode == 0, third.stderr[-2000:]
    assert read_summary(run_dir)["step"] == 4


def test_run_directories_are_stable_where_a_job_may_come_back(compose_train, monkeypatch):
    def directories(*overrides):  # resolved as Hydra does, before it sets HydraConfig
        cfg = compose_train(*overrides, return_hydra_config=True)
        return str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)

    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    run, sweep = directories()
    assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", run) and re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", sweep)
    assert directories("run_id=mamba-L4096") == ("outputs/mamba-L4096", "multirun/mamba-L4096")
    assert directories("hydra/launcher=local", "experiment=gaussian-tiny")[1] == "multirun/gaussian-tiny"
    assert directories("hydra/launcher=slurm")[1] == "multirun/sweep"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a batch job (SLURM_NTASKS set), kept by a requeue
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert directories()[0] == "outputs/slurm-4242"


def test_a_checkpoint_of_an_earlier_version_resumes_and_takes_a_new_learning_rate(compose_train, tmp_path, caplog):
    """tests/data/checkpoints/gpt.ckpt (5 steps of a tiny GPT) records neither its schedule nor the data and
    model options added since; it resumes under today's config of the same run."""
    from conftest import REPO

    old = REPO / "tests" / "data" / "checkpoints" / "gpt.ckpt"
    same_run = ["logger=none", "+trainer.enable_progress_bar=false", "model.d_model=32", "data.levels=2",
                "data.copies=4", "data.batch_size=4", "data.val_size=8", "schedule.warmup_steps=2",
                "callbacks.checkpoint.every_n_train_steps=100"]
    with caplog.at_level("INFO"):
        summary = train(compose_train(*same_run, "trainer.max_steps=7", "optim.lr=1e-4", f"ckpt_path={old}"), run_dir=tmp_path)
    assert summary["step"] == 7
    assert "resuming at step 5 with new optimizer settings, the LR schedule rebuilt on them: lr 0.003 -> 0.0001" in caplog.text
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["lr_schedulers"][0]["base_lrs"] == [1e-4, 1e-4]


@pytest.mark.parametrize("visible, gpus_per_job, max_parallel, slots", [
    ("0,1,2,3", 1, None, [(0,), (1,), (2,), (3,)]),
    ("0,1,2,3", 2, None, [(0, 1), (2, 3)]),
    ("4,5,6", 2, None, [(4, 5)]),               # the devices this process may see, by their ids
    ("0,1,2,3,4,5,6,7", 1, 3, [(0,), (1,), (2,)]),
])
def test_local_launcher_gives_each_job_gpus_of_its_own(monkeypatch, visible, gpus_per_job, max_parallel, slots):
    from hydra_plugins.l2m_launchers.l2m_launchers import LocalLauncher

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    launcher = LocalLauncher(submitit_folder="x", gpus_per_job=gpus_per_job, max_parallel=max_parallel, threads=1,
                             timeout_min=1)
    assert launcher._slots() == slots
    cpu = LocalLauncher(submitit_folder="x", gpus_per_job=0, max_parallel=None, threads=1, timeout_min=1)
    assert cpu._slots() == [()] * os.cpu_count()  # CPU jobs: one per core at threads=1
    with pytest.raises(ValueError, match="gpus_per_job=16, but this machine shows"):
        LocalLauncher(submitit_folder="x", gpus_per_job=16, max_parallel=None, threads=1, timeout_min=1)._slots()
