"""Streaming unigram counts and sparse counts of token pairs (W_i, W_{i+d}) over a large corpus.

A pair (a, b) is the int64 key a·V + b (V ≤ 3·10⁹ fits). Keys are buffered per distance; once
`chunk_tokens` tokens are buffered each buffer is reduced with np.unique and merged into a sorted
(keys, counts) table by a linear sorted merge. Memory is O(V + distinct pairs + chunk) whatever
the corpus length, and no Python object is created per token.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _merge_sorted(keys, counts, new_keys, new_counts):
    """Add (new_keys, new_counts) (sorted, unique) into the sorted table (keys, counts)."""
    idx = np.searchsorted(keys, new_keys)
    found = idx < keys.size
    found[found] = keys[idx[found]] == new_keys[found]
    counts = counts.copy()
    counts[idx[found]] += new_counts[found]  # distinct indices: both tables hold unique keys
    fresh = ~found
    return np.insert(keys, idx[fresh], new_keys[fresh]), np.insert(counts, idx[fresh], new_counts[fresh])


class PairCounter:
    """Counts unigrams and token pairs at the given distances, document by document.

    Pairs never straddle two documents. `pairs(d)` returns the sorted keys and their counts;
    `unigrams` is a dense (V,) int64 array.
    """

    def __init__(self, vocab_size: int, distances: Iterable[int], chunk_tokens: int = 1 << 22):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be ≥ 1, got {vocab_size}")
        self.distances = sorted({int(d) for d in distances})
        if not self.distances or self.distances[0] < 1:
            raise ValueError(f"distances must be positive integers, got {list(distances)}")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be ≥ 1, got {chunk_tokens}")
        self.vocab_size = int(vocab_size)
        self.chunk_tokens = int(chunk_tokens)
        self.unigrams = np.zeros(self.vocab_size, dtype=np.int64)
        self.n_tokens = 0
        self.n_documents = 0
        self._tables = {d: (np.empty(0, np.int64), np.empty(0, np.int64)) for d in self.distances}
        self._buffers: dict[int, list[np.ndarray]] = {d: [] for d in self.distances}
        self._buffered = 0

    def update(self, tokens) -> None:
        """Count one document's token ids (1-D)."""
        ids = np.asarray(tokens, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        self.unigrams += np.bincount(ids, minlength=self.vocab_size)
        self.n_tokens += ids.size
        self.n_documents += 1
        for d in self.distances:
            if ids.size > d:
                self._buffers[d].append(ids[:-d] * self.vocab_size + ids[d:])
        self._buffered += ids.size
        if self._buffered >= self.chunk_tokens:
            self.flush()

    def flush(self) -> None:
        """Reduce the buffered keys into the sorted tables."""
        for d, chunks in self._buffers.items():
            if chunks:
                new_keys, new_counts = np.unique(np.concatenate(chunks), return_counts=True)
                self._tables[d] = _merge_sorted(*self._tables[d], new_keys, new_counts.astype(np.int64))
                chunks.clear()
        self._buffered = 0

    def pairs(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted pair keys a·V + b at distance d and their counts."""
        if d not in self._tables:
            raise ValueError(f"distance {d} was not counted; counted distances: {self.distances}")
        self.flush()
        return self._tables[d]

    def marginals(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense (V,) counts of the first and of the second token of the pairs at distance d."""
        keys, counts = self.pairs(d)
        first = np.bincount(keys // self.vocab_size, weights=counts, minlength=self.vocab_size)
        second = np.bincount(keys % self.vocab_size, weights=counts, minlength=self.vocab_size)
        return first.astype(np.int64), second.astype(np.int64)
