"""Multi-query associative recall (MQAR) with exact conditionals and exact bipartite MI (math only).

A sequence is BOS, then P pairs k_1 v_1 … k_P v_P (keys uniform without replacement from K
keys, values i.i.d. uniform over V values), then Q queries q_1 a_1 … q_Q a_Q (each query uniform
with replacement over the P keys shown, a its value). L = 2P + 2Q tokens after BOS. Vocabulary:
keys 0..K−1, values K..K+V−1, BOS = K+V.

Exact conditional entropies (nats): log(K−j+1) for the j-th key, log V for a value, log P for a
query, 0 for an answer. Exact bipartite MI for a split s (X = W_1..W_s, Y = the rest) by the
chain rule: I(X;Y) = H(Y) − Σ_{i>s} H(W_i | W_<i), with H(Y), the entropy of the suffix alone,
from its sufficient statistics (`_suffix_entropy`): the suffix sees some pairs (keys and values in
Y), a pool of "hidden" slots whose keys lie in X, and at most one hidden slot J whose value it
saw without its key (the value v_{m+1} after a split between k_{m+1} and v_{m+1}, or the answer
after a split between a query and its answer). Y's queries then follow a small Markov chain on
(r hidden slots seen, m of them answered with J's value), summed exactly.
"""

from __future__ import annotations

import math

import torch

from l2m.checks import UserError, check_int


def _suffix_entropy(visible: int, hidden: int, num_keys: int, num_values: int, queries: int,
                    slots: int, j_present: bool) -> float:
    """H of the query/answer part of Y given Y's pairs: `queries` queries, each uniform over `slots`
    = visible + hidden slots. Visible slots: key and value seen in Y. Hidden: their keys are labels
    not among Y's keys (a pool of num_keys − visible), seen only when queried; with j_present, one
    of them (uniformly) has the value Y saw first, so a new hidden key answered with that value may
    be J."""
    pool = num_keys - visible
    states = {(0, 0): 1.0}  # (hidden slots seen r, of them answered with J's value m) -> probability
    entropy = 0.0
    for _ in range(queries):
        following: dict[tuple[int, int], float] = {}
        for (r, m), prob in states.items():
            p_new = (hidden - r) / slots  # a hidden slot not queried before
            h = (visible + r) / slots * math.log(slots)  # a known key: each with probability 1/slots
            if p_new > 0:
                h -= p_new * math.log(p_new / (pool - r))  # a new label, uniform over the unseen ones
                if j_present:  # P(this new slot is J) = 1 / (hidden − r + m·V) given the answers so far
                    p_j = 1.0 / (hidden - r + m * num_values)
                    p_same = p_j + (1 - p_j) / num_values
                    h_value = -p_same * math.log(p_same)
                    if p_same < 1:  # else J is the last hidden slot left: its value is certain
                        h_value -= (1 - p_same) * math.log((1 - p_same) / (num_values - 1))
                    following[(r + 1, m + 1)] = following.get((r + 1, m + 1), 0.0) + prob * p_new * p_same
                    following[(r + 1, m)] = following.get((r + 1, m), 0.0) + prob * p_new * (1 - p_same)
                else:
                    h_value = math.log(num_values)
                    following[(r + 1, 0)] = following.get((r + 1, 0), 0.0) + prob * p_new
                h += p_new * h_value
            following[(r, m)] = following.get((r, m), 0.0) + prob * (1 - p_new)
            entropy += prob * h
        states = following
    return entropy


class AssociativeRecall:
    """The MQAR law with `num_keys` K, `num_values` V, `num_pairs` P and `num_queries` Q.

    >>> task = AssociativeRecall(num_keys=16, num_values=16, num_pairs=4, num_queries=4)
    >>> x = task.sample(8)                   # (8, L+1) int64, BOS first
    >>> task.conditional_entropy()           # (L,) exact H(W_i | W_<i)
    >>> task.bipartite_mi(task.pairs_end)    # I_BP at the end of the pairs: what the state must carry
    """

    def __init__(self, num_keys: int, num_values: int, num_pairs: int, num_queries: int):
        check_int("num_pairs", num_pairs)
        check_int("num_keys", num_keys)
        if num_keys < num_pairs:
            raise UserError(f"num_keys={num_keys} is less than num_pairs={num_pairs}: the keys of a sequence are "
                             f"distinct, so raise num_keys to at least {num_pairs} or lower num_pairs")
        check_int("num_values", num_values, 2, what="an int (one value would leave nothing to recall)")
        check_int("num_queries", num_queries)
        self.num_keys, self.num_values, self.num_pairs, self.num_queries = num_keys, num_values, num_pairs, num_queries
        self.seq_len = 2 * (num_pairs + num_queries)
        self.pairs_end = 2 * num_pairs  # the split after the last pair
        self.bos_id = num_keys + num_values
        self.vocab_size = num_keys + num_values + 1

    def __repr__(self) -> str:
        return (f"AssociativeRecall(num_keys={self.num_keys}, num_values={self.num_values}, "
                f"num_pairs={self.num_pairs}, num_queries={self.num_queries})")

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, L+1) int64 token ids, BOS first."""
        check_int("n", n)
        P, Q, K = self.num_pairs, self.num_queries, self.num_keys
        keys = torch.rand(n, K, generator=generator).argsort(dim=1)[:, :P]  # uniform without replacement
        values = K + torch.randint(0, self.num_values, (n, P), generator=generator)
        slots = torch.randint(0, P, (n, Q), generator=generator)
        tokens = torch.empty(n, self.seq_len + 1, dtype=torch.long)
        tokens[:, 0] = self.bos_id
        tokens[:, 1 : 2 * P + 1 : 2], tokens[:, 2 : 2 * P + 1 : 2] = keys, values
        tokens[:, 2 * P + 1 :: 2] = keys.gather(1, slots)
        tokens[:, 2 * P + 2 :: 2] = values.gather(1, slots)
        return tokens

    def conditional_entropy(self) -> torch.Tensor:
        """(L,) float64: exact H(W_i | W_<i) in nats."""
        h = []
        for j in range(1, self.num_pairs + 1):
            h += [math.log(self.num_keys - j + 1), math.log(self.num_values)]
        h += [math.log(self.num_pairs), 0.0] * self.num_queries
        return torch.tensor(h, dtype=torch.float64)

    def answer_positions(self) -> torch.Tensor:
        """(L,) bool: the answer positions (1-based position i is index i−1)."""
        mask = torch.zeros(self.seq_len, dtype=torch.bool)
        mask[self.pairs_end + 1 :: 2] = True
        return mask

    def bipartite_mi(self, split: int | None = None) -> float:
        """Exact I(W_1..W_split; W_split+1..W_L) in nats (default: the end of the pairs)."""
        split = self.pairs_end if split is None else check_int("split", split, 1, self.seq_len - 1)
        K, V, P = self.num_keys, self.num_values, self.num_pairs
        in_pairs = split < self.pairs_end
        if in_pairs:
            keys_in_x = (split + 1) // 2  # an odd split ends on a key whose value opens Y
            visible = P - keys_in_x
            j_present = split % 2 == 1
            queries = self.num_queries
        else:
            visible, j_present = 0, (split - self.pairs_end) % 2 == 1  # ends on a query: its answer opens Y
            queries = (self.seq_len - split) // 2
        h_y = (math.log(V) if j_present else 0.0) + math.lgamma(K + 1) - math.lgamma(K - visible + 1)
        h_y += visible * math.log(V) + _suffix_entropy(visible, P - visible, K, V, queries, P, j_present)
        return h_y - float(self.conditional_entropy()[split:].sum())
