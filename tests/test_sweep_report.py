"""The sweep report (paper Fig. 3c) on a real multirun of train.py: tiny GPT and Mamba at L = 16, 64."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, run_script
from l2m.data.gaussian import GaussianFamily


def run_sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "l2m.sweep", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def multirun(tmp_path_factory) -> Path:
    sweep = tmp_path_factory.mktemp("sweep") / "multirun"
    result = run_script(
        "train.py", "-m", "model=tiny-gpt,tiny-mamba", "data.levels=2,3", "trainer.max_steps=10",
        "data.val_size=8", "data.batch_size=4", "logger=none", "+trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return sweep


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sweep_report_of_a_multirun(multirun, tmp_path):
    result = run_sweep(str(multirun), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "sweep.csv")
    assert len(rows) == 4
    for row in rows:
        s = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert (row["model"], int(row["seq_len"]), int(row["params"])) == (s["model"], s["seq_len"], s["params"])
        part = s["dim_z_half_ssm"] if row["model"] == "tiny-mamba" else s["dim_z_half_kv"]
        assert int(row["dim_z"]) == part
        assert float(row["ratio"]) == pytest.approx(s["i_bp_half"] / part, rel=1e-12)
        levels = {16: 2, 64: 3}[s["seq_len"]]
        assert float(row["i_bp_half"]) == pytest.approx(GaussianFamily(levels, copies=64).bipartite_mi(), rel=1e-9)
        for key in ("avg_kl", "kl_first_quarter", "kl_last_quarter", "initial_avg_kl"):
            assert float(row[key]) == pytest.approx(s[key], rel=1e-12)
        if s["seq_len"] == 16:  # both states carry all 8·64 directions of the history: exactly no bound
            assert float(row["bound_half"]) == 0.0
    dim_z = {(r["model"], int(r["seq_len"])): int(r["dim_z"]) for r in rows}
    assert dim_z["tiny-mamba", 16] == dim_z["tiny-mamba", 64] == 2 * 128 * 16  # SSM state only: constant in L
    assert dim_z["tiny-gpt", 64] == 4 * dim_z["tiny-gpt", 16]  # the KV cache grows with L
    assert (tmp_path / "sweep.png").stat().st_size > 20_000
    assert "I_BP/dim(z)" in result.stdout and str(tmp_path / "sweep.png") in result.stdout
    assert "e-14" not in result.stdout and "e-15" not in result.stdout  # no rounding residue printed as a bound


def test_total_state_includes_the_conv_window(multirun, tmp_path):
    result = run_sweep(str(multirun), "--state", "total", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for row in read_rows(tmp_path / "sweep.csv"):
        s = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert int(row["dim_z"]) == s["dim_z_half"]
        assert float(row["ratio"]) == pytest.approx(s["ratio"], rel=1e-12)  # the run's own ratio
    assert (multirun / "sweep.csv").exists() is False  # --out, not the swept directory


def test_bad_input_gives_a_clear_error(multirun, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_sweep(str(empty))
    assert result.returncode == 1
    assert f"no summary.json under {empty}: point at a run or multirun directory" in result.stderr
    # A summary without the exact MI (a text run) is skipped; with nothing usable left, an error.
    text_run = tmp_path / "text" / "run"
    text_run.mkdir(parents=True)
    (text_run / "summary.json").write_text(json.dumps({"model": "tiny-gpt", "seq_len": 64, "avg_nll": 3.0,
                                                       "dim_z_half": 8192, "dim_z_half_kv": 8192}))
    result = run_sweep(str(text_run.parent))
    assert result.returncode == 1 and "none of the 1 summary.json files has i_bp_half" in result.stderr
    result = run_sweep(str(text_run.parent), str(multirun), "--out", str(tmp_path / "mixed"))
    assert result.returncode == 0, result.stderr
    assert len(read_rows(tmp_path / "mixed" / "sweep.csv")) == 4 and "skipped 1 summaries" in result.stdout


def test_the_report_of_real_runs_has_its_figures_table_and_references(multirun, tmp_path):
    result = run_sweep(str(multirun), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report.md").read_text()
    for figure in ("sweep.png", "positionwise_L16.png", "positionwise_L64.png", "learning_curves.png"):
        assert f"]({figure})" in report and (tmp_path / figure).stat().st_size > 10_000, figure
    runs_table = report.split("## Collapse")[0]
    assert runs_table.count("\n| gpt |") == runs_table.count("\n| mamba |") == 2  # one series per architecture
    # the table in the terminal holds every column, however narrow the terminal
    assert "| state-limited | training-limited | converged |" in result.stdout


def make_run(root: Path, name: str, model: dict, summary: dict, seed: int = 0, levels: int = 2, copies: int = 4,
             data: dict | None = None, optim: dict | None = None):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    data = data or {"levels": levels, "copies": copies, "kind": "subvolume", "seed": 0}
    config = {"model": model, "data": data, "seed": seed, "run_dir": str(run_dir), "optim": optim or {"lr": 3e-3},
              "callbacks": {"checkpoint": {"dirpath": f"{run_dir}/checkpoints"}},  # as train.py resolves it
              "logger": {"wandb": {"name": name, "group": root.name, "project": "l2m"}}}  # named by its overrides
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    base = {"model": model.get("name", model["arch"]), "seq_len": 4**levels, "step": 100, "params": 1000,
            "dim_z_half": summary["dim_z"], "dim_z_half_bound": summary["dim_z"], "i_bp_half": 10.0}
    (run_dir / "summary.json").write_text(json.dumps({**base, **summary}))
    return run_dir


def test_collapse_metric_seeds_series_and_crashed_runs_on_runs_whose_answer_is_known(tmp_path):
    # Mamba runs built to collapse: avg KL = 0.3 * (I_BP / dim z)^0.7 exactly, over 3 lengths and 3 states.
    # GPT runs built not to: their KL follows L and not the ratio.
    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for levels in (2, 3, 4):
        for d_state in (1, 4, 16):
            dim_z = 64 * d_state
            ratio = 10.0 * levels / dim_z
            make_run(root, f"mamba-{levels}-{d_state}", {"name": "tiny-mamba", "arch": "mamba", "d_state": d_state},
                     {"dim_z": dim_z, "i_bp_half": 10.0 * levels, "avg_kl": 0.3 * ratio**0.7}, levels=levels)
            make_run(root, f"gpt-{levels}-{d_state}", {"name": "tiny-gpt", "arch": "gpt", "n_layer": d_state},
                     {"dim_z": 50 * d_state * 4**levels, "i_bp_half": 10.0 * levels,
                      "avg_kl": 0.01 * 4**levels * float(rng.uniform(0.9, 1.1))}, levels=levels)
    # two seeds of one configuration, and a run that crashed at step 40
    make_run(root, "seed-a", {"name": "tiny-mamba2", "arch": "mamba2"}, {"dim_z": 100, "avg_kl": 1.0}, seed=1)
    make_run(root, "seed-b", {"name": "tiny-mamba2", "arch": "mamba2"}, {"dim_z": 100, "avg_kl": 2.0}, seed=2)
    crashed = root / "crashed"
    (crashed / "checkpoints").mkdir(parents=True)
    (crashed / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": "mamba"}}))
    (crashed / "checkpoints" / "step40.ckpt").write_bytes(b"")
    torch.save({"global_step": 135}, crashed / "checkpoints" / "last.ckpt")  # a signal's checkpoint, after step 40
    (crashed / "train.log").write_text("starting\nRuntimeError: CUDA out of memory\n\n")

    result = run_sweep(str(root), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "report" / "sweep.csv")
    series = {r["series"] for r in rows}
    assert {"mamba d_state=1", "mamba d_state=4", "mamba d_state=16", "gpt n_layer=1", "gpt n_layer=4",
            "gpt n_layer=16", "mamba2"} == series
    (seeds,) = [r for r in rows if r["series"] == "mamba2"]
    assert int(seeds["seeds"]) == 2 and float(seeds["avg_kl"]) == 1.5
    assert seeds["seq_len"].isdigit() and seeds["params"].isdigit()  # equal over seeds: kept, not averaged to floats
    assert not list((tmp_path / "report").glob("positionwise_L*.0.png"))
    assert float(seeds["avg_kl_spread"]) == pytest.approx(np.std([1.0, 2.0], ddof=1))
    assert len(rows) == 9 + 9 + 1  # only the two mamba2 seeds are merged
    stdout = result.stdout
    mamba_line = next(line for line in stdout.splitlines() if line.startswith("collapse mamba:"))
    gpt_line = next(line for line in stdout.splitlines() if line.startswith("collapse gpt:"))
    assert "R² on log ratio 1," in mamba_line  # exactly a power law of the ratio
    r2_ratio_gpt = float(gpt_line.split("R² on log ratio ")[1].split(",")[0])
    r2_length_gpt = float(gpt_line.split("on log L ")[1].split(",")[0])
    assert r2_ratio_gpt < 0.5 < r2_length_gpt
    assert f"`{crashed}`: crashed or unfinished, last checkpoint step 135; last log line: RuntimeError: CUDA out of memory" in stdout
    assert "crashed or unfinished" in (tmp_path / "report" / "report.md").read_text()


def test_recall_runs_collapse_on_their_answer_kl(tmp_path):
    # Recall summaries carry the KL on the answers, where the state is tested: the collapse and the
    # figures use it (built here to follow the ratio exactly), not the average over all positions.
    root = tmp_path / "runs"
    rng = np.random.default_rng(0)
    for pairs in (2, 4, 8):
        for d_state in (1, 8):
            dim_z, i_bp = 64 * d_state, 5.0 * pairs
            make_run(root, f"mamba2-{pairs}-{d_state}", {"name": "recall-mamba2", "arch": "mamba2", "d_state": d_state},
                     {"dim_z": dim_z, "i_bp_half": i_bp, "seq_len": 4 * pairs, "task": "recall", "answer_accuracy": 0.5,
                      "answer_kl": 0.3 * (i_bp / dim_z) ** 0.7, "avg_kl": float(rng.uniform(1, 3))},
                     data={"num_pairs": pairs, "num_queries": pairs, "seed": 0})
    result = run_sweep(str(root), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("collapse mamba2:"))
    assert "R² on log ratio 1," in line
    for row in read_rows(tmp_path / "report" / "sweep.csv"):
        assert float(row["kl"]) == float(row["answer_kl"]) != float(row["avg_kl"])
        assert float(row["answer_accuracy"]) == 0.5
    assert "| answer KL | answer acc. |" in result.stdout


def test_an_lr_grid_reports_its_best_run_with_the_grids_spread_and_edge(tmp_path):
    # An lr grid under two model configs, KLs built so that mamba's best lr is inside its grid and
    # the sliding-window GPT's at the edge; two seeds at one lr are averaged before the grid is read.
    root = tmp_path / "runs"
    mamba = {"name": "tiny-mamba", "arch": "mamba", "d_state": 4}
    swa = {"name": "tiny-swa", "arch": "gpt", "window": 4}
    for lr, mamba_kl, swa_kl in ((1e-3, 0.9, 0.70), (3e-3, 0.5, 0.60), (1e-2, 0.8, 0.55)):
        make_run(root, f"mamba-{lr}", mamba, {"dim_z": 256, "avg_kl": mamba_kl}, optim={"lr": lr})
        floor = {"floor_reference": "window4", "kl_minus_floor": swa_kl - 0.5, "kl_minus_floor_se": 0.01,
                 "receptive_field": 4, "utilization": 0.25}
        make_run(root, f"swa-{lr}", swa, {"dim_z": 512, "avg_kl": swa_kl, **floor}, optim={"lr": lr})
    make_run(root, "mamba-3e-3-seed1", mamba, {"dim_z": 256, "avg_kl": 0.3}, optim={"lr": 3e-3}, seed=1)

    result = run_sweep(str(root), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "report" / "sweep.csv")
    assert len(rows) == 6  # every lr of both grids, the two seeds in one row
    best = {r["model"]: r for r in rows if r["best_of_grid"] == "True"}
    assert set(best) == {"tiny-mamba", "tiny-swa"}
    assert float(best["tiny-mamba"]["lr"]) == 3e-3 and float(best["tiny-mamba"]["avg_kl"]) == pytest.approx(0.4)
    assert best["tiny-mamba"]["best_lr_at_edge"] == "False" and float(best["tiny-mamba"]["grid_kl_max"]) == 0.9
    assert float(best["tiny-swa"]["lr"]) == 1e-2 and best["tiny-swa"]["best_lr_at_edge"] == "True"
    assert best["tiny-swa"]["lr_grid"] == "0.001 0.003 0.01"
    assert best["tiny-swa"]["floor_reference"] == "window4"
    assert float(best["tiny-swa"]["kl_minus_floor"]) == pytest.approx(0.05)
    # the table shows the best run of each grid, with the grid and the floor of its receptive field
    table = result.stdout.split("collapse")[0]
    assert table.count("\n| mamba |") == 1 and table.count("\n| gpt |") == 1
    assert "| lr | lr grid | grid's worst KL | best lr at edge |" in table
    assert "| floor | KL − floor | ± paired SE |" in table


def test_runs_without_a_history_state_are_reported_and_a_missing_collapse_says_why(tmp_path):
    # window 1 keeps nothing of the past: dim(z) 0, no ratio; it is in the table, off figure (b)
    root = tmp_path / "runs"
    make_run(root, "window1", {"name": "tiny-swa", "arch": "gpt", "window": 1},
             {"dim_z": 0, "avg_kl": 0.52, "ratio": None, "floor_reference": "window1", "kl_minus_floor": 0.0002})
    result = run_sweep(str(root), "--out", str(tmp_path / "alone"))
    assert result.returncode == 0, result.stderr
    (row,) = read_rows(tmp_path / "alone" / "sweep.csv")
    assert int(row["dim_z"]) == 0 and row["ratio"] == ""
    assert "collapse gpt: R² on log ratio -, on log L -, on both - (0 runs) — runs with a history state" in result.stdout
    make_run(root, "window4", {"name": "tiny-swa", "arch": "gpt", "window": 4}, {"dim_z": 96, "avg_kl": 0.19})
    make_run(root, "window4-L64", {"name": "tiny-swa", "arch": "gpt", "window": 4}, {"dim_z": 96, "avg_kl": 0.39},
             levels=3)
    result = run_sweep(str(root), "--out", str(tmp_path / "three"))
    assert result.returncode == 0, result.stderr
    assert "(2 runs) — 2 runs with a state and KL > 0: R² on one variable needs 3 or more, on both 4" in result.stdout


def test_a_log_axis_under_two_decades_labels_its_ticks_with_plain_numbers():
    from matplotlib.figure import Figure

    from l2m.report.format import readable_log_ticks

    fig = Figure()
    narrow, wide, octaves = fig.subplots(1, 3)
    narrow.plot([1, 60], [68, 91])
    wide.plot([1, 2], [1e-3, 10])
    octaves.plot([16, 256], [1, 2])
    for ax in (narrow, wide):
        ax.set_yscale("log")
    octaves.set_xscale("log", base=2)
    readable_log_ticks(fig)
    low, high = narrow.get_ylim()
    labels = {t.get_text() for t in narrow.yaxis.get_ticklabels(minor=True) if low <= t.get_position()[1] <= high}
    assert {"70", "80", "90"} <= labels  # matplotlib alone: 7×10¹, 8×10¹, 9×10¹, where it shows them at all
    assert not any(t.get_text() for t in wide.yaxis.get_ticklabels(minor=True))  # decades suffice
    assert octaves.xaxis.get_minor_formatter().__class__.__name__ != "FuncFormatter"  # powers of two stay


def recall_family_runs(root: Path, family: str, arch: str, sizes: tuple, factor: float, rng) -> None:
    """Recall runs of one family at P = 4, 8 and the given state sizes: answer KL = factor * 0.3 *
    (I_BP / dim z)^0.7 within ±3% noise (factor 1: on the curve every family shares)."""
    for pairs in (4, 8):
        for dim_z in sizes:
            i_bp = 5.0 * pairs
            kl = factor * 0.3 * (i_bp / dim_z) ** 0.7 * float(rng.uniform(0.97, 1.03))
            make_run(root, f"{family}-{pairs}-{dim_z}", {"name": f"recall-{family}", "arch": arch, "size": dim_z},
                     {"dim_z": dim_z, "i_bp_half": i_bp, "seq_len": 2 * pairs + 16, "task": "recall", "family": family,
                      "answer_kl": kl, "answer_accuracy": float(np.exp(-kl)), "answer_chance": 1 / pairs, "avg_kl": kl / 4},
                     data={"num_pairs": pairs, "num_queries": 8, "seed": 0})


def test_the_recall_frontier_puts_every_family_against_one_curve_and_names_those_above_it(tmp_path):
    rng = np.random.default_rng(0)
    on_curve = tmp_path / "on"
    recall_family_runs(on_curve, "deltanet", "deltanet", (128, 512), 1.0, rng)
    recall_family_runs(on_curve, "gated deltanet", "deltanet", (128, 512), 1.0, rng)  # one arch, two families
    recall_family_runs(on_curve, "mamba2", "mamba2", (32, 64, 256), 1.0, rng)
    result = run_sweep(str(on_curve), "--out", str(tmp_path / "on-report"))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("across families:"))
    r2 = float(line.split("R² on log ratio ")[1].split(" ")[0])
    assert r2 > 0.99 and "(14 runs); deltanet on, gated deltanet on, mamba2 on" in line, line
    rows = read_rows(tmp_path / "on-report" / "sweep.csv")
    assert {r["family"] for r in rows} == {"deltanet", "gated deltanet", "mamba2"}
    assert (tmp_path / "on-report" / "recall_frontier.png").stat().st_size > 40_000
    report = (tmp_path / "on-report" / "report.md").read_text()
    assert "![recall frontier](recall_frontier.png)" in report and "| gated deltanet | 4 |" in report

    above = tmp_path / "above"
    shutil.copytree(on_curve, above)
    recall_family_runs(above, "gla", "linear_attention", (128, 512), 3.0, rng)  # three times the KL its state allows
    result = run_sweep(str(above), "--out", str(tmp_path / "above-report"))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("across families:"))
    assert "gla above" in line and float(line.split("R² on log ratio ")[1].split(" ")[0]) < r2, line


def test_the_recall_frontier_needs_answers_and_two_families(tmp_path):
    rng = np.random.default_rng(1)
    recall_family_runs(tmp_path / "one", "mamba2", "mamba2", (32, 256), 1.0, rng)
    result = run_sweep(str(tmp_path / "one"), "--out", str(tmp_path / "one-report"))
    assert result.returncode == 0, result.stderr
    assert "across families" not in result.stdout  # one family: no curve to share
    assert "No curve across families: it needs two families" in (tmp_path / "one-report" / "report.md").read_text()
    assert (tmp_path / "one-report" / "recall_frontier.png").exists()  # its frontier still drawn
    make_run(tmp_path / "gaussian", "gpt", {"name": "tiny-gpt", "arch": "gpt"}, {"dim_z": 512, "avg_kl": 0.4})
    result = run_sweep(str(tmp_path / "gaussian"), "--out", str(tmp_path / "gaussian-report"))
    assert result.returncode == 0 and not (tmp_path / "gaussian-report" / "recall_frontier.png").exists()
