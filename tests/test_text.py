"""Text pipeline: sources, sentence splitting, tokenizers, the sample cache and TextDataModule.

Everything runs offline on the corpus shipped in tests/data/corpus (30 synthetic books and 3
one-sentence notes too short for any sample).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from l2m.data.text import (
    ByteTokenizer,
    SourceUnavailableError,
    TextDataModule,
    check_vocab,
    get_tokenizer,
    load_documents,
    open_cache,
    sentence_spans,
)
from l2m.data.text.cache import document_samples
from l2m.data.text.datamodule import heldout_split, train_sample_ids

CORPUS = Path(__file__).parent / "data" / "corpus"
N_BOOKS, N_NOTES = 30, 3


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return list(load_documents(str(CORPUS)))


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory, documents) -> str:
    """A real byte-level BPE tokenizer (Hugging Face `tokenizers`) trained here, saved to disk;
    built like GPT-NeoX's (byte-level pre-tokenizer, decoder and offset-trimming post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(documents, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return str(path.parent)


class CountingByteTokenizer(ByteTokenizer):
    """The byte tokenizer, counting how many texts it is asked to tokenize."""

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return super().encode(text)

    def encode_offsets(self, texts):
        self.calls += len(texts)
        return super().encode_offsets(texts)


# ---- sources ----


def test_local_formats_yield_the_same_documents(tmp_path, documents):
    assert len(documents) == N_BOOKS + N_NOTES
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents)))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": documents}), parquet)
    assert list(load_documents(str(jsonl))) == documents
    assert list(load_documents(str(parquet), text_column="body")) == documents
    assert list(load_documents(str(CORPUS / "book_03.txt"))) == [documents[3]]
    assert list(load_documents(str(jsonl), max_documents=5)) == documents[:5]


def test_bad_local_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="text_column='text'.*body"):
        list(load_documents(str(tmp_path / "a.jsonl")))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        list(load_documents("./no/such/corpus"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt"):
        list(load_documents(str(tmp_path / "empty")))


def test_unreachable_hub_dataset_names_local_alternative():
    # Offline the TCP probe fails at once; online the id does not exist. Both give this error.
    t0 = time.perf_counter()
    with pytest.raises(SourceUnavailableError, match="point source= at local files") as err:
        list(load_documents("l2m-tests/no-such-dataset-9f3a"))
    assert "folder of .txt files" in str(err.value)
    assert time.perf_counter() - t0 < 15  # no 20-s retry loop
    with pytest.raises(OSError, match="use tokenizer=byte, or the path of a local tokenizer"):
        get_tokenizer("l2m-tests/no-such-tokenizer-9f3a")


# ---- sentences and tokenizers ----


def test_sentence_spans():
    text = (
        "  CHAPTER I\n\nMr. Smith met Dr. Watson at 5 p.m. on Baker St. in London. \u201cWho are you?\u201d "
        "he asked! J. R. Doe waited... Then 3 birds sang. e.g. not a start.\nLast line"
    )
    got = [text[s:e] for s, e in sentence_spans(text)]
    assert got == [
        "CHAPTER I",
        "Mr. Smith met Dr. Watson at 5 p.m. on Baker St. in London.",
        "\u201cWho are you?\u201d he asked!",
        "J. R. Doe waited...",
        "Then 3 birds sang. e.g. not a start.",
        "Last line",
    ]
    assert sentence_spans(" \n ") == []


def test_byte_tokenizer_roundtrip_and_offsets():
    tok = get_tokenizer("byte")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
    text = "Café — naïve? Yes."
    assert tok.decode(tok.encode(text)) == text
    (ids, char_of_token), = tok.encode_offsets([text])
    assert ids.tolist() == tok.encode(text)
    # every byte maps to the character it encodes
    assert [text[c] for c in char_of_token] == [ch for ch in text for _ in ch.encode()]


def test_local_hf_tokenizer(bpe_path):
    tok = get_tokenizer(bpe_path)
    assert tok.vocab_size == 600 and tok.bos_id == tok.eos_id == 0
    text = "\u201cWhere did you leave the lantern?\u201d asked Élise."
    assert tok.decode(tok.encode(text)) == text
    assert tok.fingerprint() == get_tokenizer(bpe_path + "/tokenizer.json").fingerprint()


def test_vocab_mismatch_is_a_clear_error():
    check_vocab(258, 258)
    with pytest.raises(ValueError, match="has 258 tokens but the model's vocabulary holds 100"):
        check_vocab(258, 100, "tokenizer 'byte'")
    with pytest.raises(ValueError, match="258 tokens.*holds 200"):
        TextDataModule(str(CORPUS), vocab_size=200)
    dm = TextDataModule(str(CORPUS), vocab_size=320)  # padding above the tokenizer is fine
    assert dm.io_config() == {"kind": "discrete", "vocab_size": 320}
    with pytest.raises(ValueError, match="model's vocabulary holds 50"):
        dm.check_model_vocab(50)


# ---- samples and cache ----


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_samples_start_at_sentence_boundaries(tmp_path, documents, bpe_path, tokenizer):
    tok = get_tokenizer("byte" if tokenizer == "byte" else bpe_path)
    sample_len = 120
    cache = open_cache(str(CORPUS), tok, sample_len, cache_dir=tmp_path, progress=False)
    assert cache.tokens.shape == (len(cache), sample_len) and len(cache) > 100
    for i in range(len(cache)):
        doc, start = int(cache.index["doc"][i]), int(cache.index["char_start"][i])
        text = documents[doc]
        assert start in {s for s, _ in sentence_spans(text)}
        # the sample is exactly the tokenization of the document from that sentence on
        assert cache.tokens[i].tolist() == tok.encode(text[start:])[:sample_len]
    # consecutive samples of a document do not overlap
    for i in range(len(cache) - 1):
        if cache.index["doc"][i] == cache.index["doc"][i + 1]:
            text = documents[int(cache.index["doc"][i])]
            start = int(cache.index["char_start"][i])
            assert len(tok.decode(cache.tokens[i])) <= len(text[start : int(cache.index["char_start"][i + 1])]) + 1


def test_too_short_documents_are_skipped_and_counted(tmp_path, documents):
    cache = open_cache(str(CORPUS), get_tokenizer("byte"), 200, cache_dir=tmp_path, progress=False)
    assert cache.stats["documents"] == N_BOOKS + N_NOTES
    assert cache.stats["skipped_short_documents"] == N_NOTES
    assert set(cache.index["doc"].tolist()) == set(range(N_BOOKS))  # the notes sort after the books
    # within a document: a sample per sentence-aligned window until the rest is too short
    tok = get_tokenizer("byte")
    (ids, offs), = tok.encode_offsets([documents[0]])
    assert len(document_samples(documents[0], ids, offs, tok, 200)) == int((cache.index["doc"] == 0).sum())
    assert document_samples(documents[-1], *tok.encode_offsets([documents[-1]])[0], tok, 200) == []
    notes = tmp_path / "notes"
    notes.mkdir()
    for f in CORPUS.glob("note_*.txt"):
        (notes / f.name).write_text(f.read_text())
    with pytest.raises(ValueError, match="none of its 3 documents is long enough.*lower seq_len"):
        open_cache(str(notes), tok, 200, cache_dir=tmp_path, progress=False)


def test_cache_is_reused_without_tokenizing(tmp_path):
    tok = CountingByteTokenizer()
    first = open_cache(str(CORPUS), tok, 150, cache_dir=tmp_path, progress=False)
    assert not first.hit and tok.calls >= N_BOOKS + N_NOTES
    tok.calls = 0
    second = open_cache(str(CORPUS), tok, 150, cache_dir=tmp_path, progress=False)
    assert second.hit and tok.calls == 0
    assert second.path == first.path and np.array_equal(second.tokens, first.tokens)
    assert isinstance(second.tokens, np.memmap)
    assert second.stats == first.stats and first.stats["bytes"] == (first.path / "tokens.bin").stat().st_size
    # a different sample length, or tokenizer, is a different cache
    assert open_cache(str(CORPUS), tok, 151, cache_dir=tmp_path, progress=False).path != first.path
    assert tok.calls > 0


def test_datamodule_second_run_reuses_cache(tmp_path):
    tok = CountingByteTokenizer()
    kw = dict(tokenizer=tok, seq_len=64, batch_size=4, val_size=16, cache_dir=str(tmp_path), progress=False)
    dm = TextDataModule(str(CORPUS), **kw)
    dm.prepare_data()
    dm.setup("fit")
    assert not dm.stats["cache_hit"] and dm.sample_len == 77
    tok.calls = 0
    dm2 = TextDataModule(str(CORPUS), **kw)
    dm2.prepare_data()
    dm2.setup("fit")
    assert dm2.stats["cache_hit"] and tok.calls == 0


# ---- held-out set, train stream, DDP ----


def _val(dm: TextDataModule) -> torch.Tensor:
    return torch.cat([b["input_ids"] for b in dm.val_dataloader()])


def test_heldout_set_is_identical_across_runs_and_document_order(tmp_path, documents):
    kw = dict(seq_len=64, batch_size=8, val_size=20, progress=False)
    a = TextDataModule(str(CORPUS), cache_dir=str(tmp_path / "a"), seed=0, **kw)
    b = TextDataModule(str(CORPUS), cache_dir=str(tmp_path / "b"), seed=7, **kw)  # rebuilt cache, other seed
    va, vb = _val(a), _val(b)
    assert va.shape == (20, 65) and torch.equal(va, vb)
    assert (va[:, 0] == 256).all()  # BOS first
    # the held-out documents do not depend on the order of the source either
    reverse = tmp_path / "reversed.jsonl"
    reverse.write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(documents)))
    c = TextDataModule(str(reverse), cache_dir=str(tmp_path / "c"), **kw)
    assert torch.equal(_val(c), va)
    # DDP ranks evaluate disjoint shares of it
    shares = [a.val_indices(r, 3) for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == sorted(a.val_ids.tolist())
    with pytest.raises(ValueError, match="must be >= the number of DDP ranks"):
        a.val_indices(0, 21)
    # no held-out document is trained on
    val_docs = set(a.cache.index["doc_hash"][a.val_ids].tolist())
    assert val_docs.isdisjoint(a.cache.index["doc_hash"][a.train_ids].tolist())


def test_heldout_split_rules():
    doc_hash = np.array([5, 5, 9, 1, 1, 1, 7], dtype=np.uint64)
    val, train = heldout_split(doc_hash, 4)
    assert val.tolist() == [3, 4, 5, 0] and train.tolist() == [2, 6]  # the rest of doc 5 is dropped
    with pytest.raises(ValueError, match="val_size must be in 1..6"):
        heldout_split(doc_hash, 7)
    with pytest.raises(ValueError, match="leaves no training samples"):
        heldout_split(np.array([1, 1, 1], dtype=np.uint64), 1)


def test_ddp_shards_are_disjoint_and_cover_each_epoch():
    train = np.arange(1000, 1103)  # 103 training samples
    B, W = 4, 2
    steps = 103 // (B * W)  # whole steps within the first epoch
    per_rank = [np.concatenate([train_sample_ids(train, 3, k, B, r, W) for k in range(steps)]) for r in range(W)]
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    both = np.concatenate(per_rank)
    assert len(set(both.tolist())) == len(both) and set(both) <= set(train)
    # deterministic given the seed, different for another seed, new order in the next epoch
    assert np.array_equal(train_sample_ids(train, 3, 5, B, 1, W), train_sample_ids(train, 3, 5, B, 1, W))
    assert not np.array_equal(train_sample_ids(train, 4, 5, B, 1, W), train_sample_ids(train, 3, 5, B, 1, W))
    epoch0 = np.concatenate([train_sample_ids(train, 3, k, 1, 0, 1) for k in range(103)])
    epoch1 = np.concatenate([train_sample_ids(train, 3, k, 1, 0, 1) for k in range(103, 206)])
    assert sorted(epoch0) == sorted(epoch1) == list(train) and not np.array_equal(epoch0, epoch1)


def test_train_stream_is_rank_distinct_and_resumable(tmp_path):
    dm = TextDataModule(str(CORPUS), seq_len=64, batch_size=4, val_size=16, cache_dir=str(tmp_path), progress=False)
    dm.setup("fit")
    r0 = [b["input_ids"] for _, b in zip(range(6), dm.train_stream(rank=0, world_size=2))]
    r1 = [b["input_ids"] for _, b in zip(range(6), dm.train_stream(rank=1, world_size=2))]
    assert all(x.shape == (4, 65) and x.dtype == torch.int64 for x in r0)
    rows0 = {tuple(row.tolist()) for x in r0 for row in x}
    assert rows0.isdisjoint(tuple(row.tolist()) for x in r1 for row in x)
    # a stream resumed at batch 3 continues exactly like the uninterrupted one
    resumed = [b["input_ids"] for _, b in zip(range(3), dm.train_stream(rank=0, world_size=2, start=3))]
    assert all(torch.equal(a, b) for a, b in zip(resumed, r0[3:]))
    # the consumed-batch counter travels through the train DataLoader's (resumable) state
    loader = dm.train_dataloader()
    for batch in zip(range(2), loader):
        dm.on_after_batch_transfer(batch[1], 0)
    state = loader.state_dict()
    assert state == {"batches_served": 2} and dm.batches_served == 2
    dm2 = TextDataModule(str(CORPUS), seq_len=64, batch_size=4, val_size=16, cache_dir=str(tmp_path), progress=False)
    loader2 = dm2.train_dataloader()
    loader2.load_state_dict(state)  # as Lightning does on resume: after train_dataloader(), before iterating
    first = next(iter(loader2))
    assert first["index"] == 2 and torch.equal(first["input_ids"], next(iter(dm.train_stream(start=2)))["input_ids"])
    assert dm2.on_after_batch_transfer(first, 0).keys() == {"input_ids"}
    # DataLoader workers split the batches but not the order
    workers = TextDataModule(str(CORPUS), seq_len=64, batch_size=4, val_size=16, cache_dir=str(tmp_path),
                             progress=False, num_workers=2)
    got = [b["input_ids"] for _, b in zip(range(5), workers.train_dataloader())]
    assert all(torch.equal(a, b) for a, b in zip(got, (b["input_ids"] for b in dm.train_stream())))
    assert torch.equal(_val(workers), _val(dm))


# ---- training on text (Lightning + Hydra, the real train.py code path) ----


def _train(tmp_path: Path, run: str, *overrides: str) -> dict:
    """Run train.py's code path on the text-tiny preset, shrunk to seconds."""
    from hydra import compose, initialize_config_dir

    from l2m.jobs.run import train

    conf = Path(__file__).parents[1] / "conf"
    small = [
        "experiment=text-tiny", "logger=csv", f"data.source={CORPUS}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.seq_len=48", "data.val_size=16", "data.progress=false", "schedule.warmup_steps=2", "optim.lr=3e-3",
    ]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[*small, *overrides])
    return train(cfg, run_dir=tmp_path / run)


def _check_positionwise(run_dir: Path, summary: dict) -> None:
    rows = (run_dir / "positionwise.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["position", "nll"] and len(rows) == 1 + 48
    nll = np.array([float(r.split(",")[1]) for r in rows[1:]])
    assert np.isfinite(nll).all()
    assert summary["task"] == "text" and summary["seq_len"] == 48 and summary["num_sequences"] == 16
    assert summary["avg_nll"] == pytest.approx(nll.mean(), rel=1e-6)
    # a few steps already take the byte-level NLL well below its start (about log 258 = 5.55 nats)
    assert summary["avg_nll"] < summary["initial_avg_nll"] - 0.5, summary


def test_tiny_gpt_trains_on_text_and_resumes_exactly(tmp_path):
    common = ["model=tiny-gpt", "trainer.max_steps=10", "schedule.total_steps=10", "callbacks.checkpoint.every_n_train_steps=5"]
    summary = _train(tmp_path, "straight", *common)
    _check_positionwise(tmp_path / "straight", summary)
    # 5 steps, then 5 more from the checkpoint: the same data stream, the same weights
    _train(tmp_path, "first_half", *common, "trainer.max_steps=5", "~callbacks.history_state", "~callbacks.positionwise")
    ckpt = tmp_path / "first_half" / "checkpoints" / "last.ckpt"
    _train(tmp_path, "resumed", *common, f"ckpt_path={ckpt}", "~callbacks.history_state", "~callbacks.positionwise")
    load = lambda run: torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False)
    straight, resumed = load("straight"), load("resumed")
    assert resumed["global_step"] == straight["global_step"] == 10
    loader_state = lambda ckpt: ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state(resumed) == loader_state(straight) == [{"batches_served": 10}]
    for name, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=1e-5, atol=1e-6)


def test_tiny_mamba_trains_on_text(tmp_path):
    summary = _train(tmp_path, "run", "model=tiny-mamba", "trainer.max_steps=10")
    _check_positionwise(tmp_path / "run", summary)
