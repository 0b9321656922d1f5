"""End to end through the real entry points: the main job, evaluation of its checkpoint, resume,
a diverging run, bad input. Real Lightning, Hydra and W&B (offline)."""

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF, run_if, run_script
from l2m.data.gaussian import GaussianFamily
from l2m.training import NonFiniteLossError
from l2m.jobs.run import evaluate, train

FAST = ["logger=none", "data.val_size=8", "data.batch_size=4", "+trainer.enable_progress_bar=false"]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """`python train.py` as shipped (tiny GPT, L = 64, 64 copies, W&B offline) on a small budget."""
    run_dir = tmp_path_factory.mktemp("main") / "run"
    result = run_script(
        "train.py", "trainer.max_steps=300", "data.val_size=64", "callbacks.checkpoint.every_n_train_steps=150",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, result.stdout


def test_main_job_learns_and_reports_the_l2m_numbers(main_run):
    run_dir, stdout = main_run
    s = read_summary(run_dir)
    assert s["avg_kl"] < 0.8 * s["initial_avg_kl"], s
    assert (s["model"], s["seq_len"], s["step"], s["num_sequences"]) == ("tiny-gpt", 64, 300, 64)
    assert s["dim_z_half"] == s["dim_z_half_kv"] == 2 * 2 * 64 * 32  # K and V, 2 layers, d_model 64, 32 tokens
    assert s["i_bp_half"] == pytest.approx(64 * 2.730142214888428, rel=1e-9)  # spec reference x 64 copies
    assert s["ratio"] == pytest.approx(s["i_bp_half"] / s["dim_z_half"])
    for key in ("kl_first_quarter", "kl_last_quarter", "avg_nll", "params"):
        assert math.isfinite(s[key])
    # held against the exact references: a KV cache of 8,192 scalars carries I_BP = 175 nats, so this
    # tiny, briefly trained GPT is limited by its training, seeing about as much as a few-token window
    assert s["bound_half"] == 0.0 and s["tail_kl_half"] > 0 and s["dim_z_half_bound"] == s["dim_z_half_kv"]
    assert s["training_limited"] and not s["state_limited"] and 0 <= s["effective_context"] <= 4
    # paired on the held-out sequences: the windows it does better than, and those it does not
    k = s["effective_context"]
    assert s["paired_references"] and s["utilization"] == k / 64 and s["receptive_field"] is None
    for window, (difference, se) in s["kl_minus_window"].items():
        assert (difference < 0) if int(window) < k else (difference >= 0), (window, difference)
    assert s["floor_reference"] == "exact" and s["kl_minus_floor"] == s["avg_kl"]
    assert 0 < s["avg_kl_se"] < 0.1 * s["avg_kl"]
    assert len(s["heldout_history"]) == 21 and s["heldout_history"][0] == [0, s["initial_avg_kl"]]  # every 15 steps
    assert s["slope_last20"] is not None and s["still_falling"] == (s["slope_last20"] < -2 * s["slope_last20_se"])
    # the table it ends with, and where its files are
    assert "I_BP / dim(z)" in stdout and "kl_last_quarter" in stdout and str(run_dir / "positionwise.png") in stdout


def test_main_job_writes_positionwise_metrics_checkpoints_config(main_run):
    run_dir, _ = main_run
    with open(run_dir / "positionwise.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["position", "kl", "nll", "nll_floor", "kl_nocontext", "kl_window1", "kl_window4",
                             "kl_window16", "heldout_nocontext", "heldout_window1", "heldout_window4",
                             "heldout_window16", "heldout_linear_state", "tail_kl", "tail_bound"] and len(rows) == 64
    family = GaussianFamily(3, copies=64)
    floor = family.conditional_entropy()
    tail = 0.0
    for i, row in reversed(list(enumerate(rows))):  # tail_kl at split i: the model's KL after position i
        assert float(row["tail_kl"]) == pytest.approx(tail, rel=1e-9, abs=1e-9)
        tail += float(row["kl"])
        assert float(row["kl_window4"]) == pytest.approx(float(family.window_kl(4)[i]), rel=1e-12)
        assert float(row["heldout_window4"]) == 0.0 if i <= 4 else float(row["heldout_window4"]) > 0
        # a linear state of 8,192 scalars holds all 32 x 64 scalars of the history: the exact conditional
        assert abs(float(row["heldout_linear_state"])) < 1e-9
    # the bound at L/2 for the model's KV cache there (2 x 2 layers x 64 x 32 tokens = 8,192 scalars)
    assert float(rows[31]["tail_bound"]) == family.linear_state_bound(8192, 32) == 0.0
    assert rows[7]["tail_bound"] == rows[39]["tail_bound"] == ""  # off the grid of splits (8 and 40)
    for i, row in enumerate(rows):
        assert int(row["position"]) == i + 1
        assert float(row["nll_floor"]) == pytest.approx(float(floor[i]), rel=1e-12)
        assert float(row["nll"]) == pytest.approx(float(row["kl"]) + float(row["nll_floor"]), rel=1e-6)
        assert float(row["kl"]) >= 0
    assert (run_dir / "positionwise.png").stat().st_size > 10_000
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "levels: 3" in (run_dir / "config.yaml").read_text()  # the resolved config
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"last.ckpt", "step300.ckpt"}


def test_main_job_logs_an_offline_wandb_run_with_the_l2m_summary(main_run):
    run_dir, stdout = main_run
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    sync_lines = [line for line in stdout.splitlines() if "wandb sync" in line]
    assert sync_lines == [f"W&B logged offline; upload this run with: wandb sync {wandb_run}"]
    records = next(wandb_run.glob("run-*.wandb")).read_bytes()
    for key in (b"initial_avg_kl", b"i_bp_half", b"dim_z_half", b"kl_last_quarter", b"positionwise/plot"):
        assert key in records, key
    assert any((wandb_run / "files" / "media" / "images").rglob("*.png"))


def test_evaluate_recomputes_the_same_metrics_from_the_checkpoint(main_run, tmp_path):
    run_dir, _ = main_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    result = run_script("evaluate.py", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'same'}")
    assert result.returncode == 0, result.stderr[-4000:]
    trained, evaluated = read_summary(run_dir), read_summary(tmp_path / "same")
    for key in ("avg_kl", "kl_first_quarter", "kl_last_quarter", "avg_nll", "initial_avg_kl", "ratio"):
        assert evaluated[key] == pytest.approx(trained[key], rel=1e-6), key
    assert (tmp_path / "same" / "positionwise.png").is_file() and (tmp_path / "same" / "positionwise.csv").is_file()
    # what the checkpoint remembers of training is marked as such, in summary.json and the table
    assert evaluated["from_training"] == ["initial_avg_kl", "initial_avg_nll", "slope_last20", "slope_last20_se",
                                          "still_falling", "heldout_history"]
    assert "│ initial_avg_kl *" in result.stdout and "│ avg_kl *" not in result.stdout
    assert "*: from the training run; the rest measured again on the held-out set" in result.stdout

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt_path={ckpt}", "data.val_size=16"])
    assert evaluate(cfg, run_dir=tmp_path / "small")["num_sequences"] == 16


def test_evaluate_rejects_data_options_the_checkpoint_data_does_not_take(main_run, tmp_path):
    ckpt = main_run[0] / "checkpoints" / "last.ckpt"
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt_path={ckpt}", "+data.tokenizer=byte"])
    with pytest.raises(ValueError, match=r"data.tokenizer is not an option of the checkpoint's data .*GaussianDataModule.*it takes: .*levels"):
        evaluate(cfg, run_dir=tmp_path)


def test_resumed_run_ends_where_an_uninterrupted_run_ends(compose_train, tmp_path):
    common = [*FAST, "data.levels=2", "schedule.warmup_steps=3", "callbacks.checkpoint.every_n_train_steps=100"]
    train(compose_train(*common, "trainer.max_steps=12"), run_dir=tmp_path / "full")
    # the first half stops at 6 steps of the same 12-step LR schedule
    train(compose_train(*common, "trainer.max_steps=6", "schedule.total_steps=12"), run_dir=tmp_path / "half")
    half = tmp_path / "half" / "checkpoints" / "last.ckpt"
    train(compose_train(*common, "trainer.max_steps=12", f"ckpt_path={half}"), run_dir=tmp_path / "resumed")

    def weights(run):
        return torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    full, resumed, first_half = weights("full"), weights("resumed"), weights("half")
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(first_half[n], full[n]) for n in full)  # the second half did train
    resumed_summary = read_summary(tmp_path / "resumed")
    assert resumed_summary["initial_avg_kl"] == read_summary(tmp_path / "half")["initial_avg_kl"]
    assert resumed_summary["avg_kl"] == pytest.approx(read_summary(tmp_path / "full")["avg_kl"], rel=1e-5)


class PoisonWeightsAt(L.Callback):
    """A real divergence: the weights become NaN just before step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(math.nan)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(compose_train, tmp_path):
    cfg = compose_train(*FAST, "data.levels=2", "trainer.max_steps=20", "callbacks.checkpoint.every_n_train_steps=4")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 6.*\n.*last good checkpoint: .*last.ckpt"):
        train(cfg, run_dir=tmp_path, callbacks=[PoisonWeightsAt(6)])
    good = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert good["global_step"] == 4
    assert all(torch.isfinite(w).all() for w in good["state_dict"].values())
    assert not (tmp_path / "summary.json").exists()


def test_nan_gradients_with_a_finite_loss_stop_training_too(compose_train, tmp_path):
    """The gradients count as well as the loss: an overflow in the backward pass is a bad update."""

    class PoisonGradientsAt(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 3:
                next(pl_module.parameters()).grad.fill_(math.inf)

    cfg = compose_train(*FAST, "data.levels=2", "trainer.max_steps=20", "trainer.log_every_n_steps=5")
    with pytest.raises(NonFiniteLossError, match=r"gradients are not finite at step 3 \(loss \d.*; stopped at step 4,"):
        train(cfg, run_dir=tmp_path, callbacks=[PoisonGradientsAt()])


class SyncsAreErrors(L.Callback):
    """Steps other than logging steps (and the first two, and the last) run under
    torch.cuda.set_sync_debug_mode("error"): a host-device sync in them raises."""

    def on_train_batch_start(self, trainer, *args):
        step = trainer.global_step + 1
        checked = step % trainer.log_every_n_steps == 0 or step >= trainer.max_steps or step <= 2
        torch.cuda.set_sync_debug_mode("default" if checked else "error")

    def on_train_end(self, *args):
        torch.cuda.set_sync_debug_mode("default")


@run_if(cuda=True)
@pytest.mark.parametrize("model", ["tiny-gpt", "tiny-mamba2"])
def test_a_gpu_step_other_than_a_logging_step_never_waits_for_the_device(compose_train, tmp_path, model):
    cfg = compose_train(*FAST, f"model={model}", "trainer=gpu", "trainer.max_steps=25",
                        "trainer.log_every_n_steps=10", "data.levels=2",
                        "callbacks.positionwise.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=100")
    try:
        summary = train(cfg, run_dir=tmp_path, callbacks=[SyncsAreErrors()])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert summary["step"] == 25


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    result = run_script("train.py", "ckpt_path=nowhere/last.ckpt", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert "error: ckpt_path=nowhere/last.ckpt: no such checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    with initialize_config_dir(str(CONF), version_base="1.3"):
        with pytest.raises(ValueError, match="evaluate needs a checkpoint: ckpt_path="):
            evaluate(compose("evaluate"), run_dir=tmp_path)


def test_gaussian_levels_out_of_range_name_the_allowed_values(compose_train, tmp_path):
    with pytest.raises(ValueError, match=r"data \(.*GaussianDataModule\): levels must be an int in 1..8"):
        train(compose_train(*FAST, "data.levels=9"), run_dir=tmp_path)


def test_every_run_logs_its_tokens_per_second_and_mfu_only_where_the_peak_is_known(compose_train, tmp_path):
    from l2m.training.throughput import peak_flops

    cfg = compose_train(*FAST[1:], "logger=csv", "data.levels=2", "trainer.max_steps=30", "trainer.log_every_n_steps=5")
    train(cfg, run_dir=tmp_path)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    rates = [float(row["perf/tokens_per_sec"]) for row in rows if row.get("perf/tokens_per_sec")]
    assert len(rates) == 6 and all(math.isfinite(r) and r > 0 for r in rates)  # steps 5, 10, ..., 30
    assert "perf/mfu" not in rows[0]  # a CPU has no known peak
    assert peak_flops("NVIDIA H200", "bf16-mixed") == 989e12 and peak_flops("NVIDIA H200", "32-true") == 67e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12 and peak_flops("NVIDIA H100 80GB HBM3", "16-mixed") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "32-true") == 19.5e12
    assert peak_flops("cpu", "32-true") is None and peak_flops("NVIDIA GeForce RTX 4090", "bf16-mixed") is None
