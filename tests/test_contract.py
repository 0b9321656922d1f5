"""The data contract is all the generic layers read: a third task, defined outside l2m/ in one file (and
one YAML), gets the run summary, the terminal table, positionwise.csv, evaluation and the sweep report
without an edit anywhere else."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

COPY_TASK = '''
"""Copy: n tokens uniform over V, then the same n again (L = 2n). Exact: the first half costs log V per
token, the copy nothing; a predictor that sees fewer than n tokens back cannot copy."""
import math

import torch

from l2m.data.stream import BatchStream, DrawnDataModule, keyed_generator


def _batch(n, vocab, generator_key, size):
    source = torch.randint(0, vocab, (size, n), generator=keyed_generator(*generator_key))
    bos = torch.full((size, 1), vocab)
    return {"input_ids": torch.cat([bos, source, source], dim=1)}


def _train_batch(n, vocab, batch_size, seed, rank, index):
    return _batch(n, vocab, (seed, 0, rank, index), batch_size)


def _val_batch(n, vocab, val_seed, indices):
    return {"input_ids": torch.cat([_batch(n, vocab, (val_seed, 1, i), 1)["input_ids"] for i in indices])}


class CopyDataModule(DrawnDataModule):
    task = "copy"
    history_split_label = "the end of the source"
    length_options = "data.length: L = 2 n"

    def __init__(self, length=4, vocab=8, batch_size=8, seed=0, val_size=16, val_seed=1, num_workers=0,
                 epoch_size=1000):
        super().__init__()
        self.n, self.vocab, self.seq_len = length, vocab, 2 * length
        self._set_stream(batch_size, seed, val_size, val_seed, num_workers, epoch_size)
        self.save_hyperparameters()

    def io_config(self):
        return {"kind": "discrete", "vocab_size": self.vocab + 1}

    def bipartite_mi_half(self):
        return self.n * math.log(self.vocab)

    def nll_floor(self):
        return torch.cat([torch.full((self.n,), math.log(self.vocab)), torch.zeros(self.n)]).double()

    def window_kl(self, k):
        missed = math.log(self.vocab) if k < self.n else 0.0
        return torch.cat([torch.zeros(self.n), torch.full((self.n,), missed)]).double()

    def state_bound(self, dim, split):
        return None

    def answer_positions(self):
        return torch.arange(self.seq_len) >= self.n

    def train_stream(self, rank=0, world_size=1, start=0):
        from functools import partial

        return BatchStream(partial(_train_batch, self.n, self.vocab, self.batch_size, self.seed, rank), start,
                           self.epoch_size)

    def _val_batch_fn(self):
        from functools import partial

        return partial(_val_batch, self.n, self.vocab, self.val_seed)
'''


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy")
    (root / "copytask.py").write_text(COPY_TASK)
    (root / "conf" / "data").mkdir(parents=True)
    (root / "conf" / "data" / "copy.yaml").write_text("_target_: copytask.CopyDataModule\nlength: 4\nvocab: 8\n")
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}

    def cli(*args):
        result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    sweep = root / "multirun"
    trained = cli("train.py", "-m", f"hydra.searchpath=[file://{root / 'conf'}]", "data=copy", "data.length=4,8",
                  "model=tiny-gpt", "logger=none", "trainer.max_steps=3", "+trainer.enable_progress_bar=false",
                  f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${data.length}")
    return root, sweep, cli, trained


def test_a_task_of_its_own_file_gets_the_summary_and_the_table(copy_run):
    root, sweep, cli, trained = copy_run
    summary = json.loads((sweep / "4" / "summary.json").read_text())
    assert summary["task"] == "copy" and summary["seq_len"] == 8
    assert summary["i_bp_half"] == pytest.approx(4 * math.log(8), rel=1e-12)
    assert summary["history_split"] == 4 and summary["history_split_label"] == "the end of the source"
    assert summary["dim_z_half"] == summary["dim_z_half_kv"] > 0  # tiny-gpt's KV cache of the 4 source tokens
    assert 0.0 <= summary["answer_accuracy"] <= 1.0 and summary["answer_kl"] >= 0.0  # the copy's positions
    assert "answer_chance" not in summary  # the contract's default: no chance level declared
    assert summary["bound_half"] is None and summary["state_limited"] is None  # no exact bound: no verdict
    half = pytest.approx(math.log(8) / 2)  # log V on the copy, unless the window reaches back n = 4 tokens
    assert summary["window_avg_kl"] == {"0": half, "1": half, "4": 0.0}
    assert "dim(z) at the end of the source" in trained.stdout and "KL on the answers" in trained.stdout
    with open(sweep / "4" / "positionwise.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["kl_nocontext"]) for r in rows] == pytest.approx([0.0] * 4 + [math.log(8)] * 4)


def test_a_task_of_its_own_file_evaluates_and_sweeps(copy_run, tmp_path):
    root, sweep, cli, _ = copy_run
    cli("evaluate.py", f"ckpt_path={sweep / '8' / 'checkpoints' / 'last.ckpt'}", "data.val_size=8",
        f"hydra.run.dir={tmp_path / 'eval'}")
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert evaluated["history_split"] == 8 and evaluated["num_sequences"] == 8
    report = cli("-m", "l2m.sweep", str(sweep), "--out", str(tmp_path / "report"))
    with open(tmp_path / "report" / "sweep.csv") as f:
        rows = {int(r["seq_len"]): r for r in csv.DictReader(f)}
    assert set(rows) == {8, 16}
    assert float(rows[16]["i_bp_half"]) == pytest.approx(8 * math.log(8), rel=1e-12)
    assert float(rows[16]["kl"]) == pytest.approx(float(rows[16]["answer_kl"]))  # the answers' KL, as for recall
    assert "the end of the source" in (tmp_path / "report" / "report.md").read_text()
    assert report.returncode == 0
