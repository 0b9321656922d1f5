"""Tokenize a corpus once into sentence-aligned samples, cached as a memory-mapped array.

A sample is exactly `sample_len` tokens (about 1.2x the model's context, spec §4) that start
at a sentence boundary: the first sentence is tokenized on its own (no leading space token)
and the sample continues with the document's tokens until it is full. The next sample starts
at the first sentence after it, so samples never overlap. Documents too short for one sample
are skipped and counted.

On disk, under cache_dir/<name>-<key>/:
  tokens.bin   uint16/uint32 (n_samples, sample_len) token ids, read through np.memmap
  index.npy    per sample: doc (position in the source), doc_hash (of the text), char_start
  meta.json    shape, dtype, the key's ingredients and the preprocessing statistics
The key hashes the source (files' sizes and mtimes for local data), split, text column,
subset, document limit, tokenizer (its full definition), sample_len and CACHE_VERSION,
so a change to any of them builds a new cache and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from l2m.checks import UserError
from l2m.data.text.sentences import sentence_spans
from l2m.data.text.documents import load_documents, source_fingerprint
from l2m.data.text.tokenizer import Tokenizer

CACHE_VERSION = 2  # bump when the sample format or the sampling rule changes
INDEX_DTYPE = np.dtype([("doc", np.int64), ("doc_hash", np.uint64), ("char_start", np.int64)])
# Documents per tokenizer call (HF tokenizers encode a batch in parallel), capped in characters
# so that a batch of books (~0.5 MB each) keeps its token offsets small in memory.
_BATCH_DOCS, _BATCH_CHARS = 64, 4_000_000
_NEXT_WORD = re.compile(r"\s+(?=\S)")  # where a sample may start when no sentence does
# How far (in samples) the next sentence start may lie: a shorter skip keeps samples sentence-aligned (a
# sentence is often longer than a sample of a short context), a longer one would lose that much text.
SKIP_LIMIT = 4


@dataclass
class SampleCache:
    path: Path
    tokens: np.memmap  # (n_samples, sample_len) token ids
    index: np.ndarray  # (n_samples,) INDEX_DTYPE
    stats: dict
    hit: bool  # True when the cache existed and nothing was tokenized

    def __len__(self) -> int:
        return len(self.index)


def default_cache_dir() -> Path:
    return Path(os.environ.get("L2M_CACHE_DIR", "~/.cache/l2m")).expanduser() / "text"


def open_cache(
    source: str,
    tokenizer: Tokenizer,
    sample_len: int,
    cache_dir: str | Path | None = None,
    split: str = "train",
    text_column: str = "text",
    subset: str | None = None,
    max_documents: int | None = None,
    streaming: bool = True,
    progress: bool = True,
    encoding: str = "utf-8",
) -> SampleCache:
    """Open the cache of (source, tokenizer, sample_len), building it first if it is missing."""
    if sample_len < 1:
        raise UserError(f"sample_len must be >= 1, got {sample_len}")
    key_parts = {
        "version": CACHE_VERSION,
        "source_fingerprint": source_fingerprint(source, split, text_column, subset),  # "corpus" == "./corpus"
        "split": split,
        "text_column": text_column,
        "encoding": encoding,
        "subset": subset,
        "max_documents": max_documents,
        "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "sample_len": sample_len,
    }
    key = hashlib.sha1(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/")).name)
    path = Path(cache_dir or default_cache_dir()) / f"{name}-L{sample_len}-{key}"
    hit = (path / "meta.json").exists()
    if not hit:
        docs = load_documents(source, split, text_column, subset, streaming, max_documents, encoding)
        # a build that lost the race to another process opens the winner's cache, as a hit
        hit = not _build(path, docs, tokenizer, sample_len, {"source": source, **key_parts}, progress, f"tokenizing {name}")
    return _open(path, hit)


def document_samples(
    text: str, ids: np.ndarray, char_of_token: np.ndarray, tokenizer: Tokenizer, sample_len: int
) -> list[tuple[int, np.ndarray]]:
    """[(char_start, tokens (sample_len,))] cut from one document (ids, with each token's char offset).

    A sample starts at a sentence's start (spec §4), its first sentence tokenized alone (no whitespace
    token in front). Where no sentence starts within SKIP_LIMIT samples' length of the previous
    sample's end (text the splitter cannot split: lower-case sentence starts, a script it does not
    know, a sentence longer than that), the next sample starts at the next word instead, and without
    whitespace in reach at the next token, so that such text is read on rather than skipped.
    """
    spans = sentence_spans(text)
    if not spans:
        return []
    sentence_starts = np.asarray([s for s, _ in spans])
    samples, (start, end) = [], spans[0]
    while True:
        head = tokenizer.encode(text[start:end]) if end > start else []
        if len(head) < sample_len:
            t = int(np.searchsorted(char_of_token, end))  # first token at or after the sentence's end
        else:  # a sentence longer than a sample: its tokens as they stand in the document
            head, t = [], int(np.searchsorted(char_of_token, start))
        stop = t + sample_len - len(head)
        if stop > len(ids):
            return samples  # the rest of the document is too short
        samples.append((start, np.concatenate([np.asarray(head, dtype=np.int64), ids[t:stop]])))
        if stop == len(ids):
            return samples
        end_char = int(char_of_token[stop])
        k = int(np.searchsorted(sentence_starts, end_char))
        reach = int(char_of_token[min(stop + SKIP_LIMIT * sample_len, len(ids) - 1)])
        if k < len(spans) and spans[k][0] <= reach:
            start, end = spans[k]
        else:
            word = _NEXT_WORD.search(text, end_char, reach)
            start = end = word.start() if word else end_char


def _remove_abandoned_builds(cache_dir: Path) -> None:
    """Delete the build folders of processes of this machine that died before finishing them."""
    for tmp in cache_dir.glob(f"*.tmp-{socket.gethostname()}-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):  # not ours to judge
            continue


def _build(path: Path, docs: Iterable[str], tokenizer: Tokenizer, sample_len: int, key_parts: dict,
           progress: bool, desc: str) -> bool:
    """Tokenize `docs` into the cache at `path`; False when another process finished it first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(path.parent)
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        return _build_into(tmp, path, docs, tokenizer, sample_len, key_parts, progress, desc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; removed here after a failure


def _build_into(tmp: Path, path: Path, docs: Iterable[str], tokenizer: Tokenizer, sample_len: int, key_parts: dict,
                progress: bool, desc: str) -> bool:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    n_docs = n_skipped = n_doc_tokens = 0
    index: list[tuple[int, int, int]] = []
    t0 = time.perf_counter()
    with open(tmp / "tokens.bin", "wb") as out, tqdm(desc=desc, unit="doc", disable=None if progress else True) as bar:  # None: off where no terminal reads it
        for texts in _batches(docs):
            for text, (ids, char_of_token) in zip(texts, tokenizer.encode_offsets(texts)):
                samples = document_samples(text, ids, char_of_token, tokenizer, sample_len)
                doc_hash = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
                for char_start, sample in samples:
                    out.write(sample.astype(dtype).tobytes())
                    index.append((n_docs, doc_hash, char_start))
                n_skipped += not samples
                n_doc_tokens += len(ids)
                n_docs += 1
            bar.update(len(texts))
            bar.set_postfix(samples=len(index), skipped=n_skipped)
    seconds = time.perf_counter() - t0
    if not index:
        raise UserError(
            f"source={key_parts['source']!r}: none of its {n_docs} documents is long enough for one "
            f"sample of {sample_len} tokens; lower seq_len or use longer documents"
        )
    np.save(tmp / "index.npy", np.array(index, dtype=INDEX_DTYPE))
    stats = {
        "documents": n_docs,
        "skipped_short_documents": n_skipped,
        "samples": len(index),
        "sample_len": sample_len,
        "document_tokens": n_doc_tokens,
        "sample_tokens": len(index) * sample_len,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(n_doc_tokens / max(seconds, 1e-9)),
        "bytes": len(index) * sample_len * np.dtype(dtype).itemsize,
    }
    meta = {"dtype": np.dtype(dtype).name, "shape": [len(index), sample_len], "key": key_parts, "stats": stats}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, path)  # atomic: readers never see a half-written cache
    except OSError:  # another process finished the same cache first
        return False
    return True


def open_tokens(path: Path) -> np.memmap:
    """The (n_samples, sample_len) token array of the cache at `path`, memory-mapped read-only."""
    meta = json.loads((path / "meta.json").read_text())
    return np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r", shape=tuple(meta["shape"]))


def _open(path: Path, hit: bool) -> SampleCache:
    stats = json.loads((path / "meta.json").read_text())["stats"]
    return SampleCache(path, open_tokens(path), np.load(path / "index.npy"), stats, hit)


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) == _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
