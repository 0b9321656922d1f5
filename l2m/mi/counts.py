"""Streaming unigram counts and sparse counts of token pairs (W_i, W_{i+d}) over a large corpus.

A pair (a, b) is the int64 key a·V + b. Keys are buffered per distance; once `chunk_tokens`
tokens are buffered each buffer is reduced with np.unique and merged into a sorted table by a
linear sorted merge. Memory is O(V + distinct pairs + chunk) whatever the corpus length, and no
Python object is created per token.

Groups, for standard errors. Pairs from one document are not independent, so the corpus is cut
into blocks (each document, and within long documents every `block_tokens` tokens) dealt round
robin into `groups` groups; a pair belongs to the block of its first token. The table keeps the
counts per group (key (a·V + b)·groups + g), from which a delete-a-group jackknife measures the
spread of any statistic of the pair table (l2m.mi.two_point).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from l2m.checks import UserError


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

    Pairs never straddle two documents. `pairs(d)` returns the sorted keys and their counts,
    `group_pairs(d)` the same per group; `unigrams` is a dense (V,) int64 array.
    """

    def __init__(
        self,
        vocab_size: int,
        distances: Iterable[int],
        chunk_tokens: int = 1 << 22,
        groups: int = 16,
        block_tokens: int = 1 << 16,
    ):
        if vocab_size < 1:
            raise UserError(f"vocab_size must be ≥ 1, got {vocab_size}")
        if groups < 1 or block_tokens < 1:
            raise UserError(f"groups and block_tokens must be ≥ 1, got {groups} and {block_tokens}")
        if (vocab_size**2) * groups >= 2**63:
            raise UserError(f"vocab_size {vocab_size} with {groups} groups overflows the int64 pair keys")
        self.distances = sorted({int(d) for d in distances})
        if not self.distances or self.distances[0] < 1:
            raise UserError(f"distances must be positive integers, got {list(distances)}")
        if chunk_tokens < 1:
            raise UserError(f"chunk_tokens must be ≥ 1, got {chunk_tokens}")
        self.vocab_size = int(vocab_size)
        self.chunk_tokens = int(chunk_tokens)
        self.groups, self.block_tokens = int(groups), int(block_tokens)
        self.unigrams = np.zeros(self.vocab_size, dtype=np.int64)
        self.n_tokens = 0
        self.n_documents = 0
        self.n_blocks = 0
        self._totals: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._tables = {d: (np.empty(0, np.int64), np.empty(0, np.int64)) for d in self.distances}
        self._buffers: dict[int, list[np.ndarray]] = {d: [] for d in self.distances}
        self._buffered = 0

    def update(self, tokens) -> None:
        """Count one document's token ids (1-D)."""
        ids = np.asarray(tokens, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise UserError(f"token ids must lie in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        self.unigrams += np.bincount(ids, minlength=self.vocab_size)
        group = (self.n_blocks + np.arange(ids.size) // self.block_tokens) % self.groups  # of each position
        self.n_tokens += ids.size
        self.n_documents += 1
        self.n_blocks += -(-ids.size // self.block_tokens)
        for d in self.distances:
            if ids.size > d:
                self._buffers[d].append((ids[:-d] * self.vocab_size + ids[d:]) * self.groups + group[:-d])
        self._buffered += ids.size
        if self._buffered >= self.chunk_tokens:
            self.flush()

    def flush(self) -> None:
        """Reduce the buffered keys into the sorted tables."""
        for d, chunks in self._buffers.items():
            if chunks:
                new_keys, new_counts = np.unique(np.concatenate(chunks), return_counts=True)
                self._tables[d] = _merge_sorted(*self._tables[d], new_keys, new_counts.astype(np.int64))
                self._totals.pop(d, None)
                chunks.clear()
        self._buffered = 0

    def group_pairs(self, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pair keys a·V + b at distance d, their groups and counts, sorted by (key, group)."""
        if d not in self._tables:
            raise UserError(f"distance {d} was not counted; counted distances: {self.distances}")
        self.flush()
        grouped, counts = self._tables[d]
        return grouped // self.groups, grouped % self.groups, counts

    def pairs(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted pair keys a·V + b at distance d and their counts (all groups)."""
        keys, _, counts = self.group_pairs(d)
        if d not in self._totals:
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if keys.size else np.empty(0, np.int64)
            self._totals[d] = keys[starts], np.add.reduceat(counts, starts) if keys.size else counts
        return self._totals[d]

    def marginals(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """Dense (V,) counts of the first and of the second token of the pairs at distance d."""
        keys, counts = self.pairs(d)
        first = np.bincount(keys // self.vocab_size, weights=counts, minlength=self.vocab_size)
        second = np.bincount(keys % self.vocab_size, weights=counts, minlength=self.vocab_size)
        return first.astype(np.int64), second.astype(np.int64)
