"""DDP on the CPU with 2 processes (gloo), as a single run and inside a Hydra multirun.

The multirun is the known trap: Lightning re-launches ranks 1.. with the script's argv, which in a
sweep would start the whole sweep again, in the wrong directory; and the second job would hang on
the first job's distributed state. Both runs must finish, with one output directory per job.
The training loop's cost between ranks: collectives per step, and a signal to one rank.
"""

import csv
import json
import math
import signal

import pytest
import torch

from conftest import run_script

DDP = ["trainer=ddp-cpu", "trainer.max_steps=8", "data.levels=2", "data.batch_size=4", "data.val_size=8",
       "+trainer.enable_progress_bar=false"]


def test_single_ddp_run_with_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("train.py", *DDP, "logger=csv", f"hydra.run.dir={run_dir}", timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stderr
    assert list(tmp_path.iterdir()) == [run_dir]  # rank 1 ran in the same directory
    assert (run_dir / "train_ddp_process_1.log").is_file()  # ... and wrote no second .hydra config
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 8 and summary["num_sequences"] == 8  # the held-out set, split over 2 ranks
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_ddp_inside_a_multirun_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_script(
        "train.py", "-m", *DDP, "model=tiny-gpt,tiny-mamba",
        f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}",
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (result.stdout + result.stderr).count("Launching 2 jobs") == 1  # no child re-launched the sweep
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    assert all((sweep / job / "train_ddp_process_1.log").is_file() for job in ("0", "1"))  # rank 1 in its job's dir
    gpt, mamba = (json.loads((sweep / job / "summary.json").read_text()) for job in ("0", "1"))
    assert (gpt["model"], mamba["model"]) == ("tiny-gpt", "tiny-mamba")
    # Mamba's history state is constant in L: per layer d_inner x (d_state + d_conv - 1), d_inner = 128
    assert (mamba["dim_z_half_ssm"], mamba["dim_z_half_conv"]) == (2 * 128 * 16, 2 * 128 * 3)
    assert mamba["dim_z_half"] == mamba["dim_z_half_ssm"] + mamba["dim_z_half_conv"]
    assert result.stdout.count("wandb sync") == 2  # one offline W&B run per job ...
    groups = {(next((sweep / job / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()) for job in ("0", "1")}
    group = f"multirun {sweep.parts[-2]}/{sweep.parts[-1]}".encode()
    assert all(group in records for records in groups)  # ... grouped by sweep


def test_a_ddp_step_calls_no_collective_beyond_the_gradients_all_reduce(tmp_path):
    """Counted in the steps from 10 to 60 on both ranks: at most one collective per 10 steps (the
    preemption check, every 5 s by default), none for the NaN check, logging or Lightning's
    per-step SIGTERM broadcast."""
    run_dir = tmp_path / "run"
    result = run_script("train.py", *DDP, "trainer.max_steps=60", "logger=csv", "callbacks=[default,collectives]",
                        "callbacks.positionwise.every_n_steps=0", f"hydra.run.dir={run_dir}", timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((run_dir / f"collectives_rank{rank}.json").read_text())
        assert report["steps"] == 49 and report["world_size"] == 2
        assert sum(report["calls"].values()) <= math.ceil(report["steps"] / 10), report["origins"]
        assert set(report["origins"]) <= {"all_reduce"}, report["origins"]
    with open(run_dir / "csv" / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("train/loss")]
    assert [int(row["step"]) for row in logged] == [9, 19, 29, 39, 49, 59]  # Lightning's rows, 0-based
    assert all(math.isfinite(float(row["train/grad_norm"])) and float(row["train/grad_norm"]) > 0 for row in logged)


def test_a_signal_to_one_rank_stops_both_at_the_same_step_and_the_resumed_run_ends_as_an_uninterrupted_one(tmp_path):
    common = [*DDP, "trainer.max_steps=16", "logger=none", "callbacks.preemption.check_every_seconds=null",
              "callbacks.preemption.check_every_n_steps=4", "callbacks.checkpoint.every_n_train_steps=100"]
    signal_rank_1 = ["+callbacks.signal._target_=tests.run_callbacks.SignalRankAt", "+callbacks.signal.step=5",
                     "+callbacks.signal.rank=1"]
    stopped = run_script("train.py", *common, *signal_rank_1, f"hydra.run.dir={tmp_path / 'run'}", timeout=240)
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-4000:]
    # checks at the ends of steps 1, 5, 9: the signal of step 6 stops both ranks at the check of step 9
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"stopped by SIGUSR1 at step 9; checkpoint written: {last}" in stopped.stderr
    assert torch.load(last, weights_only=False)["global_step"] == 9
    resumed = run_script("train.py", *common, "ckpt_path=auto", f"hydra.run.dir={tmp_path / 'run'}", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    full = run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'full'}", timeout=240)
    assert full.returncode == 0, full.stderr[-4000:]
    summary, uninterrupted = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("run", "full"))
    assert summary["step"] == 16 and summary["avg_kl"] == pytest.approx(uninterrupted["avg_kl"], rel=1e-6)
