"""`python -m l2m.mi` end to end: an exact source, and a tiny l2m GPT trained on the shipped corpus."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from conftest import REPO
from l2m.mi.cli import main

CORPUS = str(Path(__file__).parent / "data" / "corpus")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GPT trained 2 steps on the byte-tokenized corpus with a real Trainer."""
    from l2m.data.text import TextDataModule
    from l2m.training import L2MModule

    tmp = tmp_path_factory.mktemp("ckpt")
    dm = TextDataModule(source=CORPUS, tokenizer="byte", seq_len=64, batch_size=4, val_size=4,
                        cache_dir=str(tmp / "cache"), progress=False)
    module = L2MModule(
        model={"name": "tiny-gpt", "arch": "gpt", "n_layer": 1, "d_model": 32, "n_head": 2},
        io=dm.io_config(), seq_len=dm.seq_len,
        optim={"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8, "warmup_steps": 1,
               "total_steps": 2, "min_lr_ratio": 0.1},
        data={"source": CORPUS, "tokenizer": "byte"},
    )
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    path = tmp / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return str(path), str(tmp / "cache")


def test_text_corpus_with_l2m_checkpoint(checkpoint, tmp_path):
    ckpt, cache = checkpoint
    out = tmp_path / "mi"
    report = main(["--corpus", CORPUS, "--scorer", ckpt, "--max-split", "16", "--num-samples", "12",
                   "--max-distance", "64", "--count-tokens", "40000", "--cache-dir", cache,
                   "--out", str(out), "--no-progress"])
    saved = json.loads((out / "mi.json").read_text())
    assert (out / "bipartite_mi.png").stat().st_size > 10_000 and (out / "two_point_mi.png").stat().st_size > 10_000
    assert saved["scorer"]["vocab_size"] == 258 and saved["scorer"]["bos_id"] == 256  # byte tokenizer from the ckpt
    assert saved["corpus"]["counted_tokens"] == 40000 and saved["seq_len"] == 64
    # Splits ℓ = 2, 4, 8, 16 × ratios 2, 3, 4, all fitting in 64 tokens; 1 + 2·4 passes per sample.
    bip = saved["bipartite"]
    assert [(s["ell"], s["seq_len"]) for s in bip["splits"]][:3] == [(2, 4), (2, 6), (2, 8)] and len(bip["splits"]) == 12
    assert bip["passes"] == 12 * (1 + 2 * 4) and bip["dropped"] == []
    assert bip["tokens_per_s"] > 0 and bip["passes_paper"] == 12 * (9 + 2 * 12)  # 9 distinct lengths
    assert all(s["direct_se"] > 0 and s["vclub_se"] > 0 for s in bip["splits"])
    tp = saved["two_point"]
    assert [p["d"] for p in tp["points"]] == [1, 2, 4, 8, 16, 32, 64]
    # Bytes of English text: strong short-range dependence that decays with distance.
    assert tp["points"][0]["mi"] > 0.5 > tp["points"][-1]["mi"]
    assert saved["bigram_entropy"]["value"] > 0
    assert report["bipartite"]["passes"] == bip["passes"]


def test_short_samples_drop_splits_with_a_count(checkpoint, tmp_path):
    ckpt, cache = checkpoint
    with pytest.warns(UserWarning, match="dropped 2 of 12 splits"):
        report = main(["--corpus", CORPUS, "--scorer", ckpt, "--max-split", "16", "--seq-len", "40",
                       "--num-samples", "4", "--max-distance", "4", "--count-tokens", "5000",
                       "--cache-dir", cache, "--out", str(tmp_path), "--no-progress"])
    assert [tuple(x) for x in report["bipartite"]["dropped"]] == [(16, 48), (16, 64)]
    assert len(report["bipartite"]["splits"]) == 10


def test_exact_source_reports_truth_and_logs_to_wandb(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    report = main(["--scorer", "exact:mixture", "--max-split", "4", "--num-samples", "3000",
                   "--max-distance", "8", "--out", str(tmp_path), "--no-progress", "--wandb"])
    for s in report["bipartite"]["splits"]:
        assert abs(s["direct"] - s["exact"]) < 3 * s["direct_se"]
        assert abs(s["vclub"] - s["vclub_limit"]) < 3 * s["vclub_se"]
    for p in report["two_point"]["points"]:
        assert abs(p["mi"] - p["exact"]) < 4 * p["se"] + 1e-3
    assert report["bipartite"]["passes"] == 3000 * (1 + 2 * 2)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    direct, exact = report["bipartite"]["fits"]["direct"], report["bipartite"]["exact_fits"]
    assert sorted(exact) == sorted(direct) == [2, 3, 4]
    for r, fit in exact.items():  # the estimate's β against the source's own, fitted the same way
        assert abs(direct[r]["beta"] - fit["beta"]) < 3 * direct[r]["beta_se"], (r, direct[r], fit)
    printed = capsys.readouterr().out
    assert f"exact (the source)      2{exact[2]['beta']:>9.3f}" in printed


def test_bad_input(checkpoint, tmp_path):
    ckpt, cache = checkpoint
    with pytest.raises(SystemExit):  # exact sources bring their own samples
        main(["--scorer", "exact:markov", "--corpus", CORPUS])
    with pytest.raises(ValueError, match="unknown exact source 'hmm'"):
        main(["--scorer", "exact:hmm", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="missing.ckpt: no such checkpoint"):
        main(["--scorer", str(tmp_path / "missing.ckpt"), "--corpus", CORPUS, "--out", str(tmp_path)])
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "the": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="has 4 tokens but the scorer's vocabulary has 258"):
        main(["--scorer", ckpt, "--tokenizer", str(tmp_path / "tokenizer.json"), "--corpus", CORPUS,
              "--max-split", "16", "--cache-dir", cache, "--out", str(tmp_path)])


def test_hugging_face_model_from_local_folder(checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, cache = checkpoint
    config = transformers.GPT2Config(vocab_size=258, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=256, eos_token_id=257)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    with pytest.warns(UserWarning, match="samples cut from 64 to 63"):
        report = main(["--corpus", CORPUS, "--scorer", f"hf:{tmp_path / 'model'}", "--tokenizer", "byte",
                       "--max-split", "16", "--num-samples", "4", "--max-distance", "4", "--count-tokens", "2000",
                       "--cache-dir", cache, "--out", str(tmp_path / "mi"), "--no-progress"])
    # n_positions 64 = BOS + 63 tokens: samples are cut to 63, so ℓ = 16 loses L = 64.
    assert report["scorer"]["max_len"] == 63 and report["scorer"]["bos_id"] == 256
    assert [tuple(x) for x in report["bipartite"]["dropped"]] == [(16, 64)]
    assert (tmp_path / "mi" / "mi.json").exists()


def test_off_a_terminal_the_cli_writes_no_progress_bars(tmp_path):
    result = subprocess.run([sys.executable, "-m", "l2m.mi", "--scorer", "exact:mixture", "--max-split", "4",
                             "--num-samples", "50", "--max-distance", "4", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\x1b[" not in result.stdout + result.stderr and "\r" not in result.stdout + result.stderr
    assert "exact (the source)" in result.stdout
