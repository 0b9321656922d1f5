"""CPU training steps of the tiny presets side by side, as ratios to the first one.

    python benchmarks/bench_cpu_step.py      # tiny-gpt, tiny-mamba (compiled, torch), tiny-mamba2
    python benchmarks/bench_cpu_step.py tiny-gpt tiny-swa tiny-gla tiny-deltanet --seq-len 4096 --batch 2

The measure under which every test, tiny sweep and CPU preset runs: one torch thread, batch 16,
L = 256, a step being forward, the Gaussian task's loss, backward and AdamW (bench_train's step).
Models are given as PRESET or PRESET:BACKEND. One step of each model runs in turn (A B C A B C ...)
so that load on a shared machine hits all alike; printed are the median step time and the median of
the per-round ratios to the first model, after two warm-up rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_train import CONF, training_step
from l2m.jobs.composition import model_preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*",
                   default=["tiny-gpt", "tiny-mamba:compiled", "tiny-mamba:torch", "tiny-mamba2"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steps = []
    for spec in args.models:
        preset, _, backend = spec.partition(":")
        config = model_preset(preset, CONF)
        if backend:
            config["backend"] = backend
        torch.manual_seed(0)
        steps.append(training_step(config, args.seq_len, args.batch, torch.device("cpu")))
    times = [[] for _ in steps]
    for round_ in range(args.rounds + 2):
        for step, record in zip(steps, times):
            start = time.perf_counter()
            step()
            if round_ >= 2:
                record.append(time.perf_counter() - start)
    print(f"CPU step: batch {args.batch}, L = {args.seq_len}, {args.threads} thread(s), median of {args.rounds} rounds")
    print("| model | ms/step | ratio to " + args.models[0] + " |")
    print("|---|---:|---:|")
    for spec, record in zip(args.models, times):
        ratio = statistics.median(t / t0 for t, t0 in zip(record, times[0]))
        print(f"| {spec} | {statistics.median(record) * 1e3:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
