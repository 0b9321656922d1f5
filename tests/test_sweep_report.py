"""The sweep report (paper Fig. 3c) on a real multirun of train.py: tiny GPT and Mamba at L = 16, 64."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    dim_z = {(r["model"], int(r["seq_len"])): int(r["dim_z"]) for r in rows}
    assert dim_z["tiny-mamba", 16] == dim_z["tiny-mamba", 64] == 2 * 128 * 16  # SSM state only: constant in L
    assert dim_z["tiny-gpt", 64] == 4 * dim_z["tiny-gpt", 16]  # the KV cache grows with L
    assert (tmp_path / "sweep.png").stat().st_size > 20_000
    assert "I_BP/dim(z)" in result.stdout and str(tmp_path / "sweep.png") in result.stdout


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
