"""Lightning DataModule for natural text: sentence-aligned samples from a token cache.

Samples (exactly `sample_len` = ceil(sample_ratio * seq_len) tokens, each starting at a sentence
boundary; see l2m.data.text.cache) are tokenized once and memory-mapped. A batch is
{"input_ids": (B, L+1) int64}: BOS followed by the first L tokens of B samples.

Held-out set: whole documents, chosen by the hash of their text (lowest hashes first) until
`val_size` samples are collected. It depends on neither the document order nor the seed, so
every run sees the same held-out samples, and no held-out document contributes to training.
Under DDP rank r evaluates samples r, r + world_size, ... of it.

Train stream: an endless sequence of epochs over the training samples, each epoch a fresh
permutation keyed by (seed, epoch). Step k of DDP rank r takes positions
(k * world_size + r) * B ... + B - 1 of that sequence, so ranks read disjoint samples, every
sample is read once per epoch, and the stream is a deterministic function of (seed, k). The
train DataLoader checkpoints the number of consumed batches (l2m.data.stream), so a resumed run
continues exactly where an uninterrupted run would be. A Lightning "epoch" is `epoch_size` batches.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from l2m.checks import UserError, check_ints
from l2m.data.stream import BatchStream, StreamDataModule, rank_share
from l2m.data.text.cache import SampleCache, open_cache, open_tokens
from l2m.data.text.tokenizer import Tokenizer, check_vocab, get_tokenizer


def heldout_split(doc_hash: np.ndarray, val_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(val, train) sample indices: the samples of the lowest-hash documents go to val.

    val holds the first `val_size` samples in (doc_hash, sample) order; the rest of the last
    held-out document is dropped so that no document is split between val and train.
    """
    if not 1 <= val_size < len(doc_hash):
        raise UserError(
            f"val_size must be in 1..{len(doc_hash) - 1} (the corpus has {len(doc_hash)} samples), got {val_size}"
        )
    order = np.lexsort((np.arange(len(doc_hash)), doc_hash))
    val = order[:val_size]
    train = np.sort(order[doc_hash[order] > doc_hash[val[-1]]])
    if len(train) == 0:
        raise UserError(f"val_size={val_size} leaves no training samples; lower it or add documents")
    return val, train


@lru_cache(maxsize=4)  # a batch needs one or two epochs' orders; consecutive batches share them
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch `epoch` visits n training samples."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(n)


def train_sample_ids(train: np.ndarray, seed: int, step: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """(batch_size,) sample indices of train batch `step` on DDP rank `rank`."""
    first = (step * world_size + rank) * batch_size
    positions = np.arange(first, first + batch_size)
    epochs, offsets = np.divmod(positions, len(train))
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        out[mask] = train[epoch_order(seed, int(epoch), len(train))[offsets[mask]]]
    return out


class _Reader:
    """{"input_ids": (len(ids), L+1) int64}: BOS, then the first L tokens of samples `ids` of the
    cache at `path` (memory-mapped on first use and not pickled, so it travels cheaply into
    DataLoader workers)."""

    def __init__(self, path: Path, seq_len: int, bos_id: int):
        self.path, self.seq_len, self.bos_id, self._tokens = path, seq_len, bos_id, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def __call__(self, ids: np.ndarray) -> dict:
        if self._tokens is None:
            self._tokens = open_tokens(self.path)
        rows = torch.from_numpy(self._tokens[ids, : self.seq_len].astype(np.int64))
        return {"input_ids": torch.cat([torch.full((len(ids), 1), self.bos_id, dtype=torch.int64), rows], dim=1)}


def _train_batch(read: _Reader, train: np.ndarray, seed: int, batch_size: int, rank: int, world_size: int,
                 step: int) -> dict:
    return read(train_sample_ids(train, seed, step, batch_size, rank, world_size))


class TextDataModule(StreamDataModule):
    """Text from a hub dataset or local files, tokenized once into sentence-aligned samples.

    source: local path (folder of .txt, .txt, .jsonl, .parquet) or hub dataset id
        ("deepmind/pg19"; "wikimedia/wikipedia" with subset="20231101.en").
    tokenizer: "byte" (offline), a Hugging Face tokenizer id or a local path, or a Tokenizer.
    seq_len: L, the number of predicted positions; batches carry L+1 tokens (BOS first).
    batch_size: sequences per batch and per DDP rank.
    val_size: held-out samples (whole documents, chosen by text hash; see `heldout_split`).
    cache_dir: where token caches live (default $L2M_CACHE_DIR/text or ~/.cache/l2m/text).
    seed: the train stream's seed.
    sample_ratio: sample length / seq_len (spec §4: about 1.2).
    vocab_size: the model's vocabulary (default: the tokenizer's); may be padded above it,
        e.g. 50432 for GPT-NeoX as in the paper, never below it.
    max_documents: read at most this many documents of the source.
    """

    task = "text"
    runtime_options = ("num_workers", "epoch_size", "cache_dir", "progress", "streaming")
    path_options = ("source", "tokenizer")

    def __init__(
        self,
        source: str,
        tokenizer: str | Tokenizer = "byte",
        seq_len: int = 256,
        batch_size: int = 8,
        val_size: int = 64,
        cache_dir: str | None = None,
        seed: int = 0,
        split: str = "train",
        text_column: str = "text",
        subset: str | None = None,
        max_documents: int | None = None,
        sample_ratio: float = 1.2,
        vocab_size: int | None = None,
        streaming: bool = True,
        num_workers: int = 0,
        epoch_size: int = 1000,
        progress: bool = True,
        encoding: str = "utf-8",
    ):
        super().__init__()
        check_ints(
            seq_len=(seq_len, 1), batch_size=(batch_size, 1), val_size=(val_size, 1),
            seed=(seed, 0), num_workers=(num_workers, 0), epoch_size=(epoch_size, 1),
        )
        if not sample_ratio >= 1.0:
            raise UserError(f"sample_ratio must be >= 1 (samples hold at least seq_len tokens), got {sample_ratio}")
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, str) else ["tokenizer"])
        self.tokenizer = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.vocab_size = self.tokenizer.vocab_size if vocab_size is None else vocab_size
        check_vocab(self.tokenizer.vocab_size, self.vocab_size, f"tokenizer {self.tokenizer.name!r}")
        self.source, self.seq_len, self.batch_size, self.val_size = source, seq_len, batch_size, val_size
        self.seed, self.num_workers, self.epoch_size = seed, num_workers, epoch_size
        self.sample_len = math.ceil(round(sample_ratio * seq_len, 6))  # round: 1.2 * 5 is 6.000000000000001
        self._cache_args = dict(
            cache_dir=cache_dir, split=split, text_column=text_column, subset=subset,
            max_documents=max_documents, streaming=streaming, progress=progress, encoding=encoding,
        )
        self.cache: SampleCache | None = None
        self._tokenized = False  # whether this DataModule built the cache (prepare_data or setup)

    # ---- what the training code asks about the data ----

    def io_config(self) -> dict:
        return {"kind": "discrete", "vocab_size": self.vocab_size}

    def bipartite_mi_half(self) -> None:
        return None  # unknown for natural text (estimate it with l2m.mi)

    def nll_floor(self) -> None:
        return None

    def window_kl(self, k: int) -> None:
        return None  # no exact references for natural text

    def state_bound(self, dim: int, split: int) -> None:
        return None

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Raise ValueError if the model (e.g. from a checkpoint) cannot read this data's tokens."""
        check_vocab(self.tokenizer.vocab_size, model_vocab_size, f"tokenizer {self.tokenizer.name!r}")

    # ---- data ----

    def prepare_data(self) -> None:
        """Tokenize into the cache (once per node; later runs and other ranks reuse it)."""
        self._open_cache()

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None:
            return
        cache = self._open_cache()
        self.val_ids, self.train_ids = heldout_split(cache.index["doc_hash"], self.val_size)
        self.stats = {**cache.stats, "train_samples": len(self.train_ids), "val_samples": len(self.val_ids),
                      "cache": str(cache.path), "cache_hit": not self._tokenized}
        s = self.stats
        rank_zero_info(
            f"text data: {s['documents']} documents ({s['skipped_short_documents']} too short for one "
            f"{self.sample_len}-token sample, skipped) -> {s['samples']} samples: {s['train_samples']} "
            f"train, {s['val_samples']} held-out, {s['samples'] - s['train_samples'] - s['val_samples']} left out (the rest "
            f"of the last held-out document: no document is split between the two); {s['sample_tokens']:,} of the "
            f"{s['document_tokens']:,} tokens read are in samples. Cache {cache.path} "
            + ("reused." if not self._tokenized else f"built in {s['seconds']:.1f} s ({s['tokens_per_s']:,} tokens/s).")
        )
        self.cache = cache

    def _open_cache(self) -> SampleCache:
        cache = open_cache(self.source, self.tokenizer, self.sample_len, **self._cache_args)
        self._tokenized |= not cache.hit
        return cache

    def _reader(self) -> _Reader:
        self.setup()
        return _Reader(self.cache.path, self.seq_len, self.tokenizer.bos_id)

    def train_stream(self, rank: int = 0, world_size: int = 1, start: int = 0) -> BatchStream:
        """Rank `rank`'s train batches `start`, start+1, ... (`epoch_size` of them)."""
        read = self._reader()
        batch_fn = partial(_train_batch, read, self.train_ids, self.seed, self.batch_size, rank, world_size)
        return BatchStream(batch_fn, start, self.epoch_size)

    def val_indices(self, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """This rank's share of the held-out samples: disjoint across ranks, together all of them."""
        self.setup()
        return rank_share(self.val_ids, rank, world_size)

    _val_batch_fn = _reader  # the held-out set: this rank's share, in a fixed order

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return {"input_ids": super().on_after_batch_transfer(batch, dataloader_idx)["input_ids"]}
