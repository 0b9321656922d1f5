"""Throughput of the MI estimators: streaming pair counts, two-point MI, scoring, bipartite MI.

    python benchmarks/bench_mi.py                  # CPU defaults (about a minute)
    python benchmarks/bench_mi.py --device cuda --model gpt2 --seq-len 1024

Counts: Zipf-distributed tokens (vocabulary 50,277 and 128,256) in documents of 8,192 tokens,
pairs at d = 1, 2, 4, …, 4096. Scoring: a randomly initialised l2m model preset at the given
vocabulary, and the exact mixture source; bipartite MI reports the forward passes (sequences)
it used against scoring every split length on its own.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from l2m.jobs.composition import model_preset
from l2m.mi import ExactScorer, ModelScorer, PairCounter, bipartite_mi, two_point_mi
from l2m.mi.synthetic import example_source
from l2m.models import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"
DISTANCES = [2**k for k in range(13)]


def zipf_documents(vocab: int, n_tokens: int, doc_len: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    ids = rng.choice(vocab, size=n_tokens, p=p / p.sum())
    return np.split(ids, range(doc_len, n_tokens, doc_len))


def bench_counts(vocab: int, n_tokens: int) -> list[tuple[str, str, float]]:
    docs = zipf_documents(vocab, n_tokens, 8192)
    counter = PairCounter(vocab, DISTANCES)
    start = time.perf_counter()
    for doc in docs:
        counter.update(doc)
    counter.flush()
    count_s = time.perf_counter() - start
    start = time.perf_counter()
    for d in DISTANCES:
        two_point_mi(counter, d)
    mi_s = time.perf_counter() - start
    pairs = sum(counter.pairs(d)[1].size for d in DISTANCES)
    return [
        (f"pair counts, 13 distances, V={vocab}", f"{n_tokens:,} tokens", n_tokens / count_s),
        (f"two-point MI from the counts (13 d, {pairs:,} pairs), V={vocab}", f"{n_tokens:,} corpus tokens", n_tokens / mi_s),
    ]


def bench_scoring(scorer, vocab: int, n: int, seq_len: int, label: str) -> tuple[str, str, float]:
    x = torch.randint(0, vocab, (n, seq_len))
    scorer(x[:1])  # warm-up
    start, tokens = time.perf_counter(), scorer.tokens
    scorer(x)
    return (f"score {label}", f"{n}×{seq_len}", (scorer.tokens - tokens) / (time.perf_counter() - start))


def bench_bipartite(scorer, samples: torch.Tensor, label: str) -> tuple[str, str, float]:
    result = bipartite_mi(scorer, samples, ratios=(2, 3, 4))
    passes = f"{result.passes:,} seqs/{result.tokens:,} tok vs {result.passes_paper:,}/{result.tokens_paper:,}"
    return (f"bipartite MI, {label}", passes, result.tokens / result.seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="tiny-gpt", help="preset in conf/model")
    p.add_argument("--vocab", type=int, default=50277)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--count-tokens", type=int, default=2_000_000)
    args = p.parse_args()
    torch.manual_seed(0)
    warnings.simplefilter("ignore", UserWarning)  # splits longer than the samples are dropped on purpose

    rows = []
    for vocab in (50277, 128256):
        rows += bench_counts(vocab, args.count_tokens)

    cfg = model_preset(args.model, CONF)
    model = build_model(cfg, {"kind": "discrete", "vocab_size": args.vocab}, max_seq_len=args.seq_len).to(args.device).eval()
    scorer = ModelScorer(model, args.vocab, bos_id=0, max_len=args.seq_len, device=args.device, batch_size=8)
    label = f"{args.model} V={args.vocab}"
    rows.append(bench_scoring(scorer, args.vocab, args.samples, args.seq_len, label))
    rows.append(bench_bipartite(scorer, torch.randint(0, args.vocab, (args.samples, args.seq_len)), f"{label} L={args.seq_len}"))

    source = example_source("mixture")
    exact = ExactScorer(source)
    rows.append(bench_scoring(exact, source.vocab_size, 4096, 64, "exact mixture"))
    rows.append(bench_bipartite(exact, source.sample(4096, 64), "exact mixture L=64"))

    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'size':<44}{'tokens/s':>14}")
    for what, size, rate in rows:
        print(f"{what:<{width}}  {size:<44}{rate:>14,.0f}")


if __name__ == "__main__":
    main()
