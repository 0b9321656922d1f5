"""Training-step throughput, MFU and peak memory, and the Gaussian data pipeline's share of a step.

    python benchmarks/bench_train.py                                      # CPU: tiny presets, L = 256, 1024
    python benchmarks/bench_train.py --device cuda --models gpt2 mamba-130m mamba2-130m \
        --lengths 1024 4096 16384 --pipeline-lengths 4096 16384

A step is forward, the Gaussian task's loss, backward and AdamW, on one sequence batch (`--batch`) of
Gaussian tokens (dim 64), per model x L x backend (torch; kernels where mamba-ssm or fla-core is installed; Mamba's
compiled CPU loops on a CPU) x
precision (fp32, bf16 autocast) x activation checkpointing (off, on). Times are the median of
`--repeats` steps after two warm-up steps. MFU is 3 x flops_per_token x tokens/s over the device's
dense peak (l2m.training.throughput.PEAK_FLOPS), blank where the peak is unknown (CPUs). A
configuration that runs out of memory prints OOM.

The pipeline rows time what the Gaussian DataModule does for one batch (noise drawn on the CPU, moved
to the device, z = R eps and the exact conditionals computed there in float64) against the training
step of the first model at that L.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from l2m.jobs.composition import model_preset
from l2m.models import build_model, model_config
from l2m.models.compiled import compiled_available
from l2m.models.kernels import kernels_available
from l2m.training.throughput import peak_flops

CONF = Path(__file__).resolve().parents[1] / "conf"
DIM = 64  # Gaussian token dimension (the paper's copies)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(run, device: torch.device, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def gaussian_batch(batch: int, seq_len: int, device: torch.device) -> dict:
    return {"x": torch.randn(batch, seq_len + 1, DIM, device=device),
            "mean": torch.randn(batch, seq_len, DIM, device=device),
            "std": torch.rand(1, seq_len, DIM, device=device) + 0.5}


def training_step(config: dict, seq_len: int, batch_size: int, device: torch.device, bf16: bool = False):
    """A function running one training step of a fresh model built from config on one fixed batch."""
    model = build_model(config, {"kind": "gaussian", "dim": DIM}, max_seq_len=seq_len).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = gaussian_batch(batch_size, seq_len, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model.losses(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_seconds(config: dict, seq_len: int, args, device: torch.device, bf16: bool) -> float:
    return median_seconds(training_step(config, seq_len, args.batch, device, bf16), device, args.repeats)


def backends(config: dict, device: torch.device) -> list[str]:
    typed = model_config(config)
    if not hasattr(typed, "backend"):  # GPT and hybrids: their layers' own
        return ["-"]
    if device.type == "cuda" and kernels_available(*typed.kernels):
        return ["torch", "kernels"]
    if device.type == "cpu" and typed.arch == "mamba" and compiled_available():
        return ["torch", "compiled"]
    return ["torch"]


def train_rows(args, device: torch.device) -> list[list[str]]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for preset in args.models:
        base = model_preset(preset, CONF)
        for seq_len in args.lengths:
            flops = 3 * build_model(base, {"kind": "gaussian", "dim": DIM}, max_seq_len=seq_len).flops_per_token(seq_len)
            for backend in backends(base, device):
                for precision in args.precisions:
                    for checkpointing in (False, True):
                        config = {**base, "checkpointing": checkpointing, **({} if backend == "-" else {"backend": backend})}
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        try:
                            seconds = step_seconds(config, seq_len, args, device, precision == "bf16")
                        except torch.OutOfMemoryError:
                            rows.append([preset, str(seq_len), backend, precision, str(checkpointing), "OOM", "", ""])
                            torch.cuda.empty_cache()
                            continue
                        tokens_per_sec = args.batch * seq_len / seconds
                        peak = peak_flops(name, "bf16-mixed" if precision == "bf16" else "32-true")
                        mfu = f"{tokens_per_sec * flops / peak:.1%}" if peak else ""
                        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else ""
                        rows.append([preset, str(seq_len), backend, precision, str(checkpointing),
                                     f"{tokens_per_sec:,.0f}", mfu, memory])
    return rows


def pipeline_rows(args, device: torch.device) -> list[list[str]]:
    from l2m.data.gaussian import GaussianDataModule

    rows = []
    base = model_preset(args.models[0], CONF)
    for seq_len in args.pipeline_lengths:
        data = GaussianDataModule(seq_len=seq_len, batch_size=args.batch, val_size=1)
        stream = data.train_stream(0, 1, start=0)

        def one_batch():
            batch = next(iter(stream))
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            data.on_after_batch_transfer(batch, 0)

        pipeline = median_seconds(one_batch, device, args.repeats)
        step = step_seconds(base, seq_len, args, device, bf16=False)
        rows.append([args.models[0], str(seq_len), f"{pipeline * 1e3:.1f}", f"{step * 1e3:.1f}", f"{pipeline / step:.1%}"])
    return rows


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["tiny-gpt", "tiny-mamba", "tiny-mamba2"])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--pipeline-lengths", type=int, nargs="*", default=[256, 1024])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch intra-op)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print_table(["model", "L", "backend", "precision", "checkpointing", "tokens/s", "MFU", "peak GiB"],
                train_rows(args, device))
    if args.pipeline_lengths:
        print()
        print_table(["model", "L", "pipeline ms/batch", "step ms", "pipeline share"], pipeline_rows(args, device))


if __name__ == "__main__":
    main()
