"""Our pure-PyTorch Mamba and Mamba2 against transformers' own torch paths, side by side in one process.

    python benchmarks/bench_vs_transformers.py                       # Mamba2, d_model 256, L = 512, 1024, 2048
    python benchmarks/bench_vs_transformers.py --archs mamba mamba2 --lengths 512   # transformers' Mamba is slow

Each model is exported with `l2m.models.hf.to_hf` and loaded back as transformers'
`MambaForCausalLM` / `Mamba2ForCausalLM` (same weights, same config, so the same chunk_size), and
one forward + backward of a batch of token ids is timed for each, alternating ours and theirs
(A B A B ...) so that load on a shared machine hits both alike. Printed: the median of --repeats
pairs after one warm-up pair, and the median of the per-pair ratios. Needs `pip install 'l2m[hf]'`.
On a machine without mamba-ssm and causal-conv1d, transformers falls back to its torch path.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from l2m.models import build_model
from l2m.models.hf import to_hf

CONFIGS = {
    "mamba": dict(arch="mamba", d_state=16, d_conv=4, expand=2),
    "mamba2": dict(arch="mamba2", d_state=128, d_conv=4, expand=2, headdim=64, chunk_size=256),
}


def train_step(model, ids: torch.Tensor, transformers_model: bool) -> float:
    start = time.perf_counter()
    out = model(ids)
    logits = out.logits if transformers_model else out
    logits.float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def compare(arch: str, d_model: int, n_layer: int, length: int, repeats: int, vocab: int) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # its notes that mamba-ssm is missing: the torch path is the point here
    logging.disable_progress_bar()

    torch.manual_seed(0)
    ours = build_model(dict(CONFIGS[arch], n_layer=n_layer, d_model=d_model, backend="torch"),
                       {"kind": "discrete", "vocab_size": vocab})
    with tempfile.TemporaryDirectory() as folder:
        to_hf(ours, folder)
        theirs = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(1))
    pairs = []
    for i in range(repeats + 1):
        pair = (train_step(ours, ids, False), train_step(theirs, ids, True))
        if i:  # the first pair warms up both
            pairs.append(pair)
    return {
        "ours_ms": 1000 * statistics.median(p[0] for p in pairs),
        "theirs_ms": 1000 * statistics.median(p[1] for p in pairs),
        "speedup": statistics.median(p[1] / p[0] for p in pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["mamba2"], choices=sorted(CONFIGS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"fwd+bwd, batch 1, d_model {args.d_model}, {args.n_layer} layers, {args.threads} thread(s), "
          f"median of {args.repeats} pairs")
    print("| model | L | ours (ms) | transformers (ms) | transformers / ours |")
    print("|---|---:|---:|---:|---:|")
    for arch in args.archs:
        for length in args.lengths:
            r = compare(arch, args.d_model, args.n_layer, length, args.repeats, args.vocab)
            row = f"| {arch} | {length} | {r['ours_ms']:.0f} | {r['theirs_ms']:.0f} | {r['speedup']:.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
