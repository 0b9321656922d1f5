"""`python -m l2m.mi`: two-point and bipartite MI of a corpus, a causal LM as density estimator (spec §5).

  python -m l2m.mi --corpus tests/data/corpus --scorer <run dir>/checkpoints/last.ckpt --max-split 32
  python -m l2m.mi --corpus emozilla/pg19 --scorer hf:EleutherAI/pythia-160m --max-split 512 --device cuda
  python -m l2m.mi --scorer exact:mixture --max-split 4          # synthetic source, exact answers

Writes OUT/mi.json (every number), OUT/bipartite_mi.png and OUT/two_point_mi.png.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from l2m.checks import UserError, check_device, one_line_errors
from l2m.fit import fit_power_law
from l2m.mi.bipartite import bipartite_mi
from l2m.mi.counts import PairCounter
from l2m.mi.entropy import grassberger_entropy
from l2m.mi.plots import plot_bipartite, plot_two_point
from l2m.mi.scorers import ExactScorer, check_tokenizer, load_checkpoint_scorer, load_hf_scorer
from l2m.mi.synthetic import example_source
from l2m.mi.two_point import fit_decay_with_offset, two_point_mi


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m l2m.mi", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scorer", required=True,
                   help="an l2m checkpoint (.ckpt), hf:<hub id or local dir> (needs l2m[hf]), or exact:markov / exact:mixture")
    p.add_argument("--corpus", help="local folder/.txt/.jsonl/.parquet or hub dataset id (not with exact:)")
    p.add_argument("--split", default="train", help="hub split")
    p.add_argument("--subset", default=None, help="hub dataset configuration, e.g. 20231101.en")
    p.add_argument("--text-column", default="text")
    p.add_argument("--encoding", default="utf-8", help="of local .txt / .jsonl files")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--tokenizer", default=None, help="byte, a tokenizer dir/file or hub id (default: the checkpoint's, or the hf model's)")
    p.add_argument("--num-samples", type=int, default=256, help="samples for the bipartite estimators")
    p.add_argument("--max-split", type=int, default=64, help="largest split ℓ (splits are 2, 4, …, max)")
    p.add_argument("--ratios", type=int, nargs="+", default=[2, 3, 4], help="L/ℓ ratios")
    p.add_argument("--seq-len", type=int, default=None, help="sample length in tokens (default max ratio × max split)")
    p.add_argument("--max-distance", type=int, default=1024, help="two-point MI at d = 1, 2, 4, …, this")
    p.add_argument("--count-tokens", type=int, default=10_000_000, help="corpus tokens for unigram/pair counts")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="hf scorer weights")
    p.add_argument("--cache-dir", default=None, help="token cache of the text pipeline (default ~/.cache/l2m)")
    p.add_argument("--out", default="outputs/mi", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", action="store_true", help="log numbers and plots to W&B (offline without an account)")
    p.add_argument("--wandb-project", default="l2m-mi")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.max_split < 2 or args.num_samples < 2 or args.max_distance < 1 or args.count_tokens < 0:
        p.error("need --max-split ≥ 2, --num-samples ≥ 2, --max-distance ≥ 1, --count-tokens ≥ 0")
    if args.max_split & (args.max_split - 1):
        p.error(f"--max-split must be a power of 2 (the splits are 2, 4, 8, …), got {args.max_split}: e.g. "
                f"{1 << (args.max_split.bit_length() - 1)} or {1 << args.max_split.bit_length()}")
    try:
        check_device("--device", args.device)
    except ValueError as error:
        p.error(str(error))
    if min(args.ratios) < 2:
        p.error(f"--ratios are L/ℓ, integers ≥ 2, got {' '.join(map(str, args.ratios))}")
    if args.scorer.startswith("exact:") == (args.corpus is not None):
        p.error("give --corpus for a model scorer, and no --corpus for exact:markov / exact:mixture")
    return args


def build_scorer(args):
    """(scorer, tokenizer or None, exact source or None)."""
    kind, _, target = args.scorer.partition(":")
    if kind == "exact":
        source = example_source(target)
        return ExactScorer(source), None, source
    if kind == "hf":
        from l2m.data.text import get_tokenizer  # the text pipeline (and Lightning) only for text

        scorer = load_hf_scorer(target, args.device, args.batch_size, args.dtype)
        tokenizer = get_tokenizer(args.tokenizer or target)
    elif Path(args.scorer).is_dir():
        last = Path(args.scorer) / "checkpoints" / "last.ckpt"
        hint = f": --scorer {last}" if last.is_file() else ""
        raise UserError(f"--scorer {args.scorer} is a folder; give a checkpoint file{hint}")
    elif args.scorer.endswith(".ckpt"):
        scorer = load_checkpoint_scorer(args.scorer, args.tokenizer, args.device, args.batch_size)
        tokenizer = scorer.tokenizer
    else:
        raise UserError(f"--scorer must be a .ckpt file, hf:<model> or exact:<markov|mixture>, got {args.scorer!r}")
    check_tokenizer(tokenizer, scorer)
    return scorer, tokenizer, None


def text_samples(args, tokenizer, seq_len: int, generator) -> tuple[torch.Tensor, dict]:
    """num_samples sentence-aligned samples of seq_len tokens (the text pipeline's cache)."""
    from l2m.data.text import open_cache

    cache = open_cache(args.corpus, tokenizer, seq_len, args.cache_dir, args.split, args.text_column,
                       args.subset, args.max_documents, progress=not args.no_progress, encoding=args.encoding)
    n = len(cache)
    if n < args.num_samples:
        warnings.warn(f"the corpus gives {n} samples of {seq_len} tokens, fewer than --num-samples {args.num_samples}")
    rows = torch.randperm(n, generator=generator)[: args.num_samples].sort().values.numpy()
    return torch.from_numpy(cache.tokens[rows].astype(np.int64)), dict(cache.stats)


def count_text(args, tokenizer, distances, vocab_size) -> tuple[PairCounter, float]:
    """Stream documents into unigram and pair counts until --count-tokens tokens; returns counting seconds."""
    from l2m.data.text import load_documents

    counter, seconds = PairCounter(vocab_size, distances), 0.0
    docs = load_documents(args.corpus, args.split, args.text_column, args.subset, max_documents=args.max_documents,
                          encoding=args.encoding)
    with tqdm(total=args.count_tokens, unit="tok", desc="counting pairs", disable=_bars_off(args)) as bar:
        for doc in docs:
            ids = np.asarray(tokenizer.encode(doc)[: args.count_tokens - counter.n_tokens], dtype=np.int64)
            start = time.perf_counter()
            counter.update(ids)
            seconds += time.perf_counter() - start
            bar.update(ids.size)
            if counter.n_tokens >= args.count_tokens:
                break
    start = time.perf_counter()
    counter.flush()
    return counter, seconds + time.perf_counter() - start


def two_point_report(counter: PairCounter, distances, source=None) -> tuple[dict, object]:
    points = []
    for d in distances:
        if counter.pairs(d)[1].size == 0:
            continue  # every document shorter than d + 1 tokens
        mi, se = two_point_mi(counter, d)
        point = {"d": d, "mi": mi, "se": se, "mi_naive": two_point_mi(counter, d, "naive")[0],
                 "pairs": int(counter.pairs(d)[1].sum())}
        if source is not None:
            point["exact"] = source.two_point_mi(d)
        points.append(point)
    positive = [p for p in points if p["mi"] > 0]
    report = {"points": points, "nonpositive_excluded_from_fit": len(points) - len(positive), "fit": None}
    fit = None
    if len(positive) >= 3:
        fit = fit_decay_with_offset([p["d"] for p in positive], [p["mi"] for p in positive])
        report["fit"] = {"alpha": fit.alpha, "alpha_se": fit.alpha_stderr, "amplitude": fit.amplitude,
                         "offset": fit.offset, "offset_se": fit.offset_stderr}
        for p in points:
            p["mi_corrected"] = p["mi"] - fit.offset
    return report, fit


def run(argv=None) -> dict:
    """`python -m l2m.mi`: main, with bad input ending in one line and exit status 1 (2 for usage)."""
    with one_line_errors(path_hint="check the path, or choose one you can write to (--out, --cache-dir)"):
        return main(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {out}: cannot create it ({error.strerror}); choose a folder you can write to") from error
    generator = torch.Generator().manual_seed(args.seed)
    seq_len = args.seq_len or max(args.ratios) * args.max_split
    splits = [2**k for k in range(1, int(np.log2(args.max_split)) + 1)]
    distances = [2**k for k in range(int(np.log2(args.max_distance)) + 1)]
    scorer, tokenizer, source = build_scorer(args)
    scorer.progress = partial(tqdm, desc="scoring batches", unit="batch", leave=False, disable=_bars_off(args))
    if scorer.max_len is not None and seq_len > scorer.max_len:
        warnings.warn(f"the scorer reads at most {scorer.max_len} tokens: samples cut from {seq_len} to {scorer.max_len}")
    report = {"config": vars(args), "scorer": scorer.describe(), "seq_len": seq_len}

    # Corpus: samples for the bipartite estimators, and unigram/pair counts.
    if source is not None:
        samples = source.sample(args.num_samples, seq_len, generator)
        counter, start = PairCounter(source.vocab_size, distances), time.perf_counter()
        for row in samples.numpy():
            if counter.n_tokens >= args.count_tokens:
                break
            counter.update(row[: args.count_tokens - counter.n_tokens])
        counter.flush()
        count_seconds, report["corpus"] = time.perf_counter() - start, {"source": args.scorer}
    else:
        samples, report["corpus"] = text_samples(args, tokenizer, seq_len, generator)
        counter, count_seconds = count_text(args, tokenizer, distances, scorer.vocab_size)
    samples = samples[:, : scorer.max_len]
    report["corpus"].update(counted_tokens=counter.n_tokens, counted_documents=counter.n_documents,
                            bipartite_samples=samples.shape[0], counts_tokens_per_s=counter.n_tokens / max(count_seconds, 1e-9))

    report["two_point"], fit = two_point_report(counter, distances, source)
    bigram = grassberger_entropy(counter.pairs(1)[1]) if counter.pairs(1)[1].size else None
    report["bigram_entropy"] = None if bigram is None else {"value": bigram[0], "se": bigram[1]}

    bar = partial(tqdm, desc="bipartite splits", disable=_bars_off(args))
    result = bipartite_mi(scorer, samples, splits, tuple(args.ratios), bigram, generator, bar)
    report["bipartite"] = result.as_dict()
    exact = None
    if source is not None:
        exact = {}
        for s, entry in zip(result.splits, report["bipartite"]["splits"]):
            try:
                exact[(s.ell, s.seq_len)] = entry["exact"] = source.bipartite_mi(s.ell, s.seq_len)
                entry["vclub_limit"] = source.vclub_limit(s.ell, s.seq_len)
            except ValueError:  # too long to enumerate
                entry["exact"] = entry["vclub_limit"] = None
        report["bipartite"]["exact_fits"] = _exact_fits(exact)

    points = report["two_point"]["points"]
    report["plots"] = {"bipartite": str(plot_bipartite(result, out / "bipartite_mi.png", exact)), "two_point": None}
    if points:
        curve = [[p[k] for p in points] for k in ("d", "mi", "se")]
        exact_curve = [p["exact"] for p in points] if all(p.get("exact") is not None for p in points) else None
        report["plots"]["two_point"] = str(plot_two_point(*curve, fit, out / "two_point_mi.png", exact_curve))
    (out / "mi.json").write_text(json.dumps(report, indent=1, default=float))
    if args.wandb:
        _log_wandb(args, report)
    _print_summary(report, out)
    return report


def _bars_off(args) -> bool | None:
    """tqdm's `disable`: True with --no-progress; None (off where stderr is no terminal, e.g. a log file,
    in which nested bars leave cursor escapes) otherwise."""
    return True if args.no_progress else None


def _exact_fits(exact: dict[tuple[int, int], float]) -> dict[int, dict]:
    """β per ratio r = L/ℓ of the exact source's own I_BP at the splits scored, fitted as the estimates are."""
    fits = {}
    for r in sorted({seq_len // ell for ell, seq_len in exact}):
        points = [(seq_len, mi) for (ell, seq_len), mi in exact.items() if seq_len == r * ell and mi is not None and mi > 0]
        if len(points) >= 2:
            beta, prefactor, _ = fit_power_law(*zip(*points))
            fits[r] = {"beta": beta, "prefactor": prefactor, "points": len(points)}
    return fits


def _log_wandb(args, report: dict) -> None:
    import wandb

    run = wandb.init(project=args.wandb_project, config=vars(args), dir=args.out, job_type="mi")
    summary = {f"beta/{est}/r{r}": f["beta"] for est, fits in report["bipartite"]["fits"].items()
               for r, f in fits.items() if "beta" in f}
    if report["two_point"]["fit"]:
        summary.update({f"two_point/{k}": v for k, v in report["two_point"]["fit"].items()})
    run.summary.update(summary)
    run.log({name: wandb.Image(path) for name, path in report["plots"].items() if path})
    run.finish()


def _print_summary(report: dict, out: Path) -> None:
    b = report["bipartite"]
    print(f"bipartite MI: {b['passes']} sequences / {b['tokens']} tokens scored ({b['passes_paper']} / "
          f"{b['tokens_paper']} scoring every length apart), {b['tokens_per_s'] or 0:.0f} tokens/s")
    print(f"{'estimator':<20}{'L/ℓ':>5}{'β':>9}{'± SE':>9}")
    for est, fits in b["fits"].items():
        for r, f in fits.items():
            if "beta" in f:
                se = "n/a" if f["beta_se"] is None else f"{f['beta_se']:.3f}"
                print(f"{est:<20}{r:>5}{f['beta']:>9.3f}{se:>9}")
            else:  # say so, rather than leave the estimator out of the table
                print(f"{est:<20}{r:>5}   no fit: {f['points']} positive estimate(s), "
                      f"{f['nonpositive_dropped']} ≤ 0 dropped")
    for r, f in b.get("exact_fits", {}).items():  # the truth the estimates are to be read against
        print(f"{'exact (the source)':<20}{r:>5}{f['beta']:>9.3f}{'':>9}")
    fit = report["two_point"]["fit"]
    if fit:
        print(f"two-point MI: α = {fit['alpha']:.3f} ± {fit['alpha_se']:.3f}, C = {fit['offset']:.3g}")
    print(f"wrote {out / 'mi.json'} and the plots {', '.join(p for p in report['plots'].values() if p)}")
