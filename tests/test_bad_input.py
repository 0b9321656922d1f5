"""Bad input ends with one clear line (exit status 1, or 2 for a command-line usage error), never a
traceback: checkpoints that are not checkpoints, options out of range, devices that are not there,
paths that cannot be written, scorers that cannot score text. Each case through the code path of its
command (train.py / evaluate.py: l2m.jobs.report_errors; python -m l2m.mi: l2m.mi.cli.run)."""

import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF, run_script
from l2m.jobs import evaluate, report_errors, train
from l2m.mi.cli import run as mi

RUN = ["logger=none", "+trainer.enable_progress_bar=false", "data.val_size=4", "data.batch_size=4"]
FAST = [*RUN, "data.levels=2"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown where CUDA is missing")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small trained GPTs (Gaussian, L = 16; recall, L = 8) and files that are not checkpoints."""
    root = tmp_path_factory.mktemp("bad")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        train(compose("train", overrides=[*FAST, "trainer.max_steps=2"]), run_dir=root / "run")
        train(compose("train", overrides=[*RUN, "data=recall", "data.num_pairs=2", "data.num_queries=2",
                                          "trainer.max_steps=2"]), run_dir=root / "recall")
    good = root / "run" / "checkpoints" / "last.ckpt"
    (root / "empty.ckpt").write_bytes(b"")
    (root / "random.ckpt").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    (root / "truncated.ckpt").write_bytes(good.read_bytes()[:5000])
    (root / "bad.jsonl").write_text('{"text": "A first document."}\nnot json\n')
    return root


def command_error(capsys, call) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        call()
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return exit_.value.code, stderr.strip().splitlines()[-1]


def job_error(capsys, job, cfg, run_dir) -> tuple[int, str]:
    """(exit status, last line of stderr) of train or evaluate run as train.py / evaluate.py run them."""
    def call():
        with report_errors():
            job(cfg, run_dir=run_dir)

    return command_error(capsys, call)


NOT_A_CHECKPOINT = "is not a checkpoint written by torch.save, or it was truncated (by a crash or a full disk)"
TRAIN_CASES = {
    "random bytes as ckpt_path": (["ckpt_path={root}/random.ckpt"], NOT_A_CHECKPOINT),
    "empty ckpt_path": (["ckpt_path={root}/empty.ckpt"], "empty.ckpt is empty (0 bytes): not a checkpoint"),
    "truncated ckpt_path": (["ckpt_path={root}/truncated.ckpt"], NOT_A_CHECKPOINT),
    "random bytes as init_from": (["init_from={root}/random.ckpt"], NOT_A_CHECKPOINT),
    "a negative step count": (["trainer.max_steps=-5"], "trainer.max_steps must be a step count (or -1: until "
                                                        "stopped; evaluate.py evaluates a checkpoint without training) >= 1, got -5"),
    "no steps": (["trainer.max_steps=0"], "trainer.max_steps must be a step count (or -1: until stopped; evaluate.py "
                                          "evaluates a checkpoint without training) >= 1, got 0"),
    "negative learning rate": (["optim.lr=-1"], "optim (torch.optim.AdamW) refused its settings: Invalid learning rate: -1"),
    "beta of 1.5": (["optim.betas=[0.9,1.5]"], "optim (torch.optim.AdamW) refused its settings: Invalid beta parameter at index 1: 1.5"),
    "init_from a model with fewer learned positions": (["data=gaussian", "data.levels=3",
                                                        "init_from={root}/run/checkpoints/last.ckpt"],
                                                       "has learned positions for 16 tokens, fewer than the data's "
                                                       "L = 64: train on data with L <= 16"),
    "recall with more pairs than keys": (["data=recall", "data.num_pairs=8", "data.num_keys=4"],
                                         "num_keys=4 is less than num_pairs=8: the keys of a sequence are distinct, "
                                         "so raise num_keys to at least 8 or lower num_pairs"),
    "recall with one value": (["data=recall", "data.num_values=1"], "num_values must be an int (one value would "
                                                                     "leave nothing to recall) >= 2, got 1"),
    "recall without queries": (["data=recall", "data.num_queries=0"], "num_queries must be an int >= 1, got 0"),
    "a Gaussian batch larger than any memory": (["data.copies=100000000"],
                                                "a batch of 4 sequences x L=16 x 100,000,000 copies needs about 384 GB "
                                                "of memory"),
    "two preemption intervals": (["callbacks.preemption.check_every_n_steps=5"],
                                 "callbacks.preemption: set one of check_every_seconds and check_every_n_steps, the "
                                 "other null (got 5.0 and 5)"),
    "a preemption interval of 0 s": (["callbacks.preemption.check_every_seconds=0"],
                                     "callbacks.preemption: check_every_seconds must be > 0"),
    "a callback argument that does not exist": (["+callbacks.throughput.windows=3"],
                                                "callbacks.throughput (l2m.training.throughput.ThroughputCallback): "
                                                "ThroughputCallback.__init__() got an unexpected keyword argument 'windows'"),
    "a batch capped by tokens without the length": (["data.batch_size='${l2m.batch_within_tokens:32,1024,${.seq_len}}'"],
                                                    "error: data.batch_size: the batch size is capped by tokens per step, "
                                                    "which needs the sequence length: give data.seq_len=<tokens>, not None"),
    "a token-capped batch of no sequences": (["data.seq_len=16", "data.levels=null",
                                              "data.batch_size='${l2m.batch_within_tokens:0,1024,${.seq_len}}'"],
                                             "error: data.batch_size: batch_within_tokens's batch size must be an int >= 1, got 0"),
    "seq_len and levels that disagree": (["data.seq_len=16", "data.levels=3"],
                                         "seq_len=16 (levels=2) and levels=3 (L = 64) disagree: give one of them"),
    "a local tokenizer file that is not there": (["data=text", "data.seq_len=16", "data.tokenizer=./nowhere/tokenizer.json"],
                                                 "tokenizer='./nowhere/tokenizer.json': no such file or folder"),
    "malformed jsonl": (["data=text", "data.seq_len=16", "data.source={root}/bad.jsonl"],
                        "bad.jsonl:2: not valid JSON (Expecting value, column 1); a .jsonl file holds one JSON object per line"),
    "an encoding Python does not know": (["data=text", "data.seq_len=16", "data.encoding=klingon"],
                                         "encoding='klingon' is not a text encoding Python knows"),
    "cache in a folder that cannot be made": (["data=text", "data.seq_len=16", "data.cache_dir=/proc/l2m-cache"],
                                              "/proc/l2m-cache: No such file or directory; check the path, or choose one "
                                              "you can write to (hydra.run.dir=..., data.cache_dir=...)"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_ends_bad_input_with_one_line(files, tmp_path, capsys, case):
    overrides, message = TRAIN_CASES[case]
    base = RUN if any(o.startswith("data=") for o in overrides) else FAST
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*base, "trainer.max_steps=2", *(o.replace("{root}", str(files)) for o in overrides)])

    status, line = job_error(capsys, train, cfg, tmp_path)
    assert status == 1 and line.startswith("error: ") and message in line, line


EVALUATE_CASES = {
    "truncated checkpoint": (["ckpt_path={root}/truncated.ckpt"], NOT_A_CHECKPOINT),
    "a length beyond the learned positions": (["ckpt_path={root}/run/checkpoints/last.ckpt", "+data.levels=3"],
                                              "the model has learned positions for 16 tokens, but the data gives L = 64: "
                                              "evaluate it at L <= 16 (data.seq_len), or train a model with "
                                              "model.positional=rotary"),
    "recall at more pairs than the learned positions hold": (
        ["ckpt_path={root}/recall/checkpoints/last.ckpt", "+data.num_pairs=4"],
        "the model has learned positions for 8 tokens, but the data gives L = 12: evaluate it at L <= 8 "
        "(data.num_pairs and data.num_queries: L = 2P + 2Q)"),
    "cuda without CUDA": pytest.param(["ckpt_path={root}/run/checkpoints/last.ckpt", "device=cuda"],
                                      "device=cuda, but torch sees no CUDA device here: use device=cpu", marks=NO_CUDA),
}


@pytest.mark.parametrize("overrides, message", list(EVALUATE_CASES.values()), ids=list(EVALUATE_CASES))
def test_evaluate_ends_bad_input_with_one_line(files, tmp_path, capsys, overrides, message):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[o.replace("{root}", str(files)) for o in overrides])

    status, line = job_error(capsys, evaluate, cfg, tmp_path)
    assert status == 1 and message in line, line


MI_CASES = {
    "random bytes as scorer": (1, ["--scorer", "{root}/random.ckpt", "--corpus", "tests/data/corpus"], NOT_A_CHECKPOINT),
    "a Gaussian model as scorer": (1, ["--scorer", "{root}/run/checkpoints/last.ckpt", "--corpus", "tests/data/corpus"],
                                   "was trained on gaussian tokens ({'kind': 'gaussian', 'dim': 64}); the MI of text needs "
                                   "a model trained on text"),
    "unknown exact source": (1, ["--scorer", "exact:foo"], "unknown exact source 'foo'; available: markov, mixture"),
    "missing scorer file": (1, ["--scorer", "{root}/nothing.ckpt", "--corpus", "tests/data/corpus"], "nothing.ckpt: no such checkpoint"),
    "a run directory as scorer": (1, ["--scorer", "{root}/run", "--corpus", "tests/data/corpus"],
                                  "run is a folder; give a checkpoint file: --scorer {root}/run/checkpoints/last.ckpt"),
    "an unreachable hub model": (1, ["--scorer", "hf:nobody/no-such-model", "--corpus", "tests/data/corpus"],
                                 "nobody/no-such-model: no such local folder, and not reachable as a hub id"),
    "an output folder that cannot be made": (1, ["--scorer", "exact:markov", "--out", "/proc/l2m-mi"],
                                             "--out /proc/l2m-mi: cannot create it (No such file or directory); choose a "
                                             "folder you can write to"),
    "ratio 1": (2, ["--scorer", "exact:markov", "--ratios", "1"], "--ratios are L/ℓ, integers ≥ 2, got 1"),
    "a split that is not a power of 2": (2, ["--scorer", "exact:markov", "--max-split", "6"],
                                         "--max-split must be a power of 2 (the splits are 2, 4, 8, …), got 6: e.g. 4 or 8"),
    "cuda without CUDA": pytest.param(2, ["--scorer", "exact:markov", "--device", "cuda"],
                                      "--device=cuda, but torch sees no CUDA device here: use --device=cpu", marks=NO_CUDA),
}


@pytest.mark.parametrize("status, argv, message", list(MI_CASES.values()), ids=list(MI_CASES))
def test_mi_ends_bad_input_with_one_line(files, tmp_path, capsys, status, argv, message):
    argv = [a.replace("{root}", str(files)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "mi")]
    code, line = command_error(capsys, lambda: mi([*argv, "--no-progress"]))
    assert code == status and message.replace("{root}", str(files)) in line, line


def test_an_output_directory_hydra_cannot_create_is_one_line(tmp_path):
    result = run_script("train.py", "hydra.run.dir=/proc/l2m-run")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: cannot create the output directory /proc/l2m-run (No such file or "
                                     "directory): give a place you can write to, hydra.run.dir=...")


def test_a_relative_source_of_an_older_checkpoint_names_the_option_that_moves_it(tmp_path, capsys, monkeypatch):
    from conftest import REPO

    checkpoint = REPO / "tests" / "data" / "checkpoints" / "mamba-text.ckpt"  # trained on tests/data/corpus, relative
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"ckpt_path={checkpoint}"])

    status, line = job_error(capsys, evaluate, cfg, tmp_path / "run")
    assert status == 1 and line == (f"error: the checkpoint's data.source=tests/data/corpus is not found from {tmp_path}: "
                                    "give its place here, data.source=<path>")


def test_a_read_only_run_directory_is_one_line(files, tmp_path, capsys):
    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs to mount a read-only tmpfs (root)")
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[*FAST, "trainer.max_steps=2"])

        status, line = job_error(capsys, train, cfg, disk / "run")
        assert status == 1 and line == (f"error: {disk / 'run'}: Read-only file system; check the path, or choose one "
                                        "you can write to (hydra.run.dir=..., data.cache_dir=...)")
    finally:
        subprocess.run(["umount", str(disk)])
        shutil.rmtree(disk, ignore_errors=True)


# Text the splitter cannot split is read on, not dropped (it used to become one sample).
def samples_of(text: str, sample_len: int = 64) -> list:
    from l2m.data.text import get_tokenizer
    from l2m.data.text.cache import document_samples

    tokenizer = get_tokenizer("byte")
    ids, char_of_token = tokenizer.encode_offsets([text])[0]
    return document_samples(text, ids, char_of_token, tokenizer, sample_len)


@pytest.mark.parametrize("text", [
    "the cat sat on the mat. the dog ran after it. " * 400,  # one line, sentences open in lower case
    "他们说了很多话但是没有结束" * 300,                            # Chinese without a single full stop
], ids=["lower-case sentences", "Chinese without full stops"])
def test_text_without_sentence_boundaries_is_cut_at_words_or_tokens(text):
    samples = samples_of(text)
    tokens = len(text.encode())
    assert len(samples) * 64 >= 0.95 * tokens  # nearly every token is in a sample
    starts = [start for start, _ in samples]
    assert starts == sorted(set(starts))


def test_cjk_full_stops_and_caseless_scripts_end_sentences():
    from l2m.data.text.sentences import sentence_spans

    for text, expected in [("他来了。她走了！真的吗？好的。", ["他来了。", "她走了！", "真的吗？", "好的。"]),
                           ("مرحبا بك. كيف حالك؟ أنا بخير.", ["مرحبا بك.", "كيف حالك؟", "أنا بخير."]),
                           ("He waited… Then he left.", ["He waited…", "Then he left."])]:
        assert [text[a:b] for a, b in sentence_spans(text)] == expected


def test_malformed_jsonl_names_its_file_and_line(tmp_path):
    from l2m.data.text import load_documents

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "one"}\n{"text": "two"\n')
    with pytest.raises(ValueError, match=rf"{corpus}:2: not valid JSON \(Expecting ',' delimiter, column \d+\); "
                                         "a .jsonl file holds one JSON object per line"):
        list(load_documents(str(corpus)))


def test_a_mistyped_folder_is_reported_as_neither_a_folder_nor_a_hub_dataset(monkeypatch):
    from l2m.data.text import SourceUnavailableError, load_documents

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceUnavailableError, match=r"source='corpos': no such local file or folder \(from .*\), and as "
                                                     r"a hub dataset \(subset=None, split='train'\) it is not available"):
        list(load_documents("corpos"))


def test_a_cache_build_that_died_leaves_nothing_behind(tmp_path):
    from l2m.data.text import get_tokenizer, open_cache

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("One sentence here. " * 50)
    cache = open_cache(str(corpus), get_tokenizer("byte"), 64, cache_dir=tmp_path / "cache", progress=False)
    abandoned = cache.path.with_name(f"{cache.path.name}.tmp-{socket.gethostname()}-999999999")
    abandoned.mkdir()  # the build folder of a process that no longer exists
    (corpus / "b.txt").write_text("Another sentence there. " * 50)  # a new corpus: a new build in the same folder
    rebuilt = open_cache(str(corpus), get_tokenizer("byte"), 64, cache_dir=tmp_path / "cache", progress=False)
    assert not rebuilt.hit and not any(".tmp-" in p.name for p in (tmp_path / "cache").iterdir())


def test_undecodable_text_and_binary_files_are_counted_and_named(tmp_path, caplog):
    from l2m.data.text import load_documents

    (tmp_path / "french.txt").write_bytes("Le café était très bon. ".encode("latin-1") * 50)
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 8)
    with caplog.at_level("WARNING"):
        (doc,) = list(load_documents(str(tmp_path)))
    assert "\ufffd" in doc
    assert (f"source={str(tmp_path)!r}: 1 file(s) hold bytes that are not utf-8 (up to 12.5% of a document's characters, "
            "in french.txt); they were read as U+FFFD. Give the files' encoding: data.encoding=latin-1") in caplog.text
    assert "skipped 1 binary file(s) (NUL bytes, not text): blob.txt" in caplog.text
    caplog.clear()
    (doc,) = list(load_documents(str(tmp_path), encoding="latin-1"))
    assert doc.startswith("Le café était très bon.") and "hold bytes that are not" not in caplog.text
    with pytest.raises(ValueError, match="encoding='klingon' is not a text encoding Python knows"):
        list(load_documents(str(tmp_path), encoding="klingon"))


PROGRESS_RUN = ["logger=none", "data.levels=2", "data.val_size=4", "data.epoch_size=10",
                "callbacks.checkpoint.every_n_train_steps=15", "schedule.total_steps=30"]


def test_the_progress_bar_counts_the_steps_of_the_run(tmp_path, capsys, monkeypatch):
    overrides = PROGRESS_RUN
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is for a terminal
    with initialize_config_dir(str(CONF), version_base="1.3"):
        train(compose("train", overrides=[*overrides, "trainer.max_steps=15"]), run_dir=tmp_path)
        first = capsys.readouterr().out  # Lightning's bars write to stdout
        train(compose("train", overrides=[*overrides, "trainer.max_steps=30"]), run_dir=tmp_path)  # resumed
        resumed = capsys.readouterr().out
    assert "training steps" in first and "15/15" in first and "Epoch" not in first and "Training" not in first
    assert "15/30" in resumed and "30/30" in resumed  # it starts where the run stopped, across nominal epochs


def test_off_a_terminal_progress_is_a_plain_line_every_twentieth_of_the_run_at_most(tmp_path):
    first = run_script("train.py", *PROGRESS_RUN, "trainer.max_steps=15", f"hydra.run.dir={tmp_path}")
    resumed = run_script("train.py", *PROGRESS_RUN, "trainer.max_steps=30", f"hydra.run.dir={tmp_path}")
    assert first.returncode == 0 and resumed.returncode == 0, first.stderr[-2000:] + resumed.stderr[-2000:]
    lines = [line for line in (first.stdout + resumed.stdout).splitlines() if line.startswith("step ")]
    # a line per logging interval (10 steps; a twentieth of these runs is less) and at the end
    assert [line.split("  ")[0] for line in lines] == ["step 10/15 (67%)", "step 15/15 (100%)",
                                                       "step 20/30 (67%)", "step 30/30 (100%)"]
    assert all(re.search(r"  kl_per_token \d+\.?\d*  tokens/s [\d,]+  elapsed 0:00:\d\d$", line) for line in lines), lines
    assert "\r" not in first.stdout + first.stderr and "training steps" not in first.stdout + first.stderr


def test_off_a_terminal_the_summary_keeps_each_path_on_one_line(tmp_path):
    run_dir = tmp_path / ("a-directory-name-long-enough-to-pass-eighty-columns-" * 2) / "run"
    result = run_script("train.py", *RUN, "data.levels=2", "trainer.max_steps=2", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f" metrics: {run_dir / 'summary.json'}\n" in result.stdout, result.stdout[-1500:]


def test_train_log_holds_what_the_run_printed_and_its_error(tmp_path):
    ran = run_script("train.py", "logger=none", "data.levels=2", "data.val_size=4", "trainer.max_steps=20",
                     f"hydra.run.dir={tmp_path / 'ran'}")
    assert ran.returncode == 0, ran.stderr[-2000:]
    log = (tmp_path / "ran" / "train.log").read_text()
    assert "step 10/20 (50%)  kl_per_token " in log and "step 20/20 (100%)" in log
    assert "L²M run summary" in log and f" metrics: {tmp_path / 'ran' / 'summary.json'}\n" in log
    assert "\r" not in log
    failed = run_script("train.py", *RUN, "trainer.max_steps=0", f"hydra.run.dir={tmp_path / 'failed'}")
    assert failed.returncode == 1
    assert "error: trainer.max_steps must be a step count" in (tmp_path / "failed" / "train.log").read_text()


def test_on_a_terminal_a_full_disk_ends_the_bar_line_before_its_one_line_error(tmp_path, capsys, monkeypatch):
    """The bar (stdout) and the error (stderr) share the terminal: the error used to be glued to the end
    of the bar's last redraw."""
    disk = tmp_path / "full"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs to mount a small tmpfs (root)")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[*PROGRESS_RUN, "trainer.max_steps=15"])
        with pytest.raises(SystemExit) as stop, report_errors():
            train(cfg, run_dir=disk / "run")
        out, err = capsys.readouterr()
    finally:
        subprocess.run(["umount", str(disk)])
    assert stop.value.code == 1 and "training steps" in out and out.endswith("\n"), out[-300:]
    assert err.startswith("error: no space left on the device writing the checkpoint "), err
