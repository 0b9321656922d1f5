"""DDP on the CPU with 2 processes (gloo), as a single run and inside a Hydra multirun.

The multirun is the known trap: Lightning re-launches ranks 1.. with the script's argv, which in a
sweep would start the whole sweep again, in the wrong directory; and the second job would hang on
the first job's distributed state. Both runs must finish, with one output directory per job.
"""

import json

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
