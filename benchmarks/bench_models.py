"""Training throughput of the model zoo: tokens/s for forward + backward, per model x backend x L.

    python benchmarks/bench_models.py                      # CPU: tiny presets, L = 256..4096
    python benchmarks/bench_models.py --device cuda --models gpt2 mamba-130m mamba2-130m

Mamba also runs two per-timestep loops, to show what the chunked parallel scan buys:
"reference" (backend: only the selective scan loops over tokens) and "step-loop" (the whole
model fed token by token through step()). Inputs are Gaussian tokens (dim 64, the paper's
synthetic task). Times are the best of --repeats runs after a warm-up (robust to other load).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from l2m.jobs.composition import model_preset
from l2m.models import build_model
from l2m.models.compiled import compiled_available
from l2m.models.kernels import kernels_available
from l2m.models.mamba import KERNELS as MAMBA_KERNELS
from l2m.models.mamba2 import KERNELS as MAMBA2_KERNELS

CONF = Path(__file__).resolve().parents[1] / "conf"


def backends(arch: str, device: str, loop_max_len: int, L: int) -> list[str]:
    if arch == "gpt":
        return ["-"]
    names = ["torch"]
    if device == "cuda" and kernels_available(*(MAMBA_KERNELS if arch == "mamba" else MAMBA2_KERNELS)):
        names.append("kernels")
    if device == "cpu" and arch == "mamba" and compiled_available():
        names.append("compiled")
    if arch == "mamba" and L <= loop_max_len:
        names += ["reference", "step-loop"]
    return names


def step_loop(model, x):
    """The model run token by token in step mode; outputs stacked like forward's."""
    state, means, stds = model.init_state(x.shape[0]), [], []
    for x_t in x.unbind(1):
        (mean, std), state = model.step(x_t, state)
        means.append(mean)
        stds.append(std)
    return torch.stack(means, 1), torch.stack(stds, 1)


def time_step(model, x, repeats: int, stepped: bool = False) -> float:
    """Best-of-repeats seconds of one forward + backward (after one warm-up)."""
    def run():
        mean, std = step_loop(model, x) if stepped else model(x)
        (mean.square().mean() + std.mean()).backward()

    times = []
    for i in range(repeats + 1):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-gpt", "tiny-mamba", "tiny-mamba2"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64, help="Gaussian token dimension")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-max-len", type=int, default=1024, help="longest L for the per-token loops")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    print(f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} dim={args.dim}")
    print(f"{'model':14s} {'backend':10s} {'L':>6s} {'ms/step':>10s} {'tokens/s':>10s}")
    results = {}
    for name in args.models:
        cfg = model_preset(name, CONF)
        for L in args.lengths:
            for backend in backends(cfg["arch"], args.device, args.loop_max_len, L):
                if backend != "-":
                    cfg["backend"] = "torch" if backend == "step-loop" else backend
                model = build_model(cfg, {"kind": "gaussian", "dim": args.dim}, max_seq_len=L).to(args.device)
                x = torch.randn(args.batch, L, args.dim, device=args.device)
                sec = time_step(model, x, args.repeats, stepped=backend == "step-loop")
                results[name, backend, L] = sec
                print(f"{name:14s} {backend:10s} {L:6d} {1e3 * sec:10.1f} {args.batch * L / sec:10.0f}", flush=True)
    for (name, backend, L), sec in results.items():
        if backend in ("reference", "step-loop"):
            speedup = sec / results[name, "torch", L]
            print(f"{name} L={L}: torch (chunked parallel scan) is {speedup:.1f}x faster than {backend}")


if __name__ == "__main__":
    main()
