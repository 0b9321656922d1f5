"""What train.py's loop (Lightning, l2m's module and callbacks) adds to a bare PyTorch training step.

    python benchmarks/bench_overhead.py                                   # one process, CPU
    python -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_overhead.py   # ddp-cpu (gloo)

In one process, side by side and alternating (A B A B ...): `l2m.jobs.run.train` on the composed
train config (the default callbacks and a CSV logger, as `python train.py` runs it) against a bare loop
over the same model (built from the same config and seed), the same data stream (the datamodule's
train batches, on_after_batch_transfer), AdamW on the same parameter groups, gradient clipping and the
warmup-cosine schedule; under torchrun both are wrapped in DDP over the same process group. A step's
time is the time between the ends of two consecutive steps (data, forward, backward, update, every
hook); each side of a round reports the median over its steps after `--warmup`; the table gives the
median over rounds of the ratio train.py / bare, and the ratios' range. Rank 0 prints.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from l2m.jobs.run import build, train
from l2m.training.module import parameter_groups
from l2m.training.schedules import warmup_cosine

CONF = Path(__file__).resolve().parents[1] / "conf"


class StepEnds(L.Callback):
    """The time at the end of every training step."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())


def median_step(ends: list[float], warmup: int) -> float:
    return statistics.median(b - a for a, b in zip(ends[warmup:], ends[warmup + 1:]))


def compose_config(model: str, steps: int, ddp: bool):
    overrides = [f"model={model}", f"trainer.max_steps={steps}", "logger=csv", "+trainer.enable_progress_bar=false",
                 "callbacks.positionwise.every_n_steps=0", *(["trainer=ddp-cpu"] if ddp else [])]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def train_py_step(cfg, warmup: int) -> float:
    ends = StepEnds()
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()):
        train(cfg, run_dir=run_dir, callbacks=[ends])
    return median_step(ends.ends, warmup)


class Loss(torch.nn.Module):
    """The model's training loss as its forward: what DDP wraps."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model.losses(batch)["loss"]


def bare_step(cfg, warmup: int) -> float:
    L.seed_everything(cfg.seed, verbose=False)
    datamodule, module = build(cfg)
    datamodule.setup("fit")
    loss_fn = Loss(module.model)
    if dist.is_initialized():
        loss_fn = torch.nn.parallel.DistributedDataParallel(loss_fn)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    optim = {k: v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items() if not k.startswith("_")}
    weight_decay = optim.pop("weight_decay", 0.0)
    optimizer = torch.optim.AdamW(parameter_groups(module.model, weight_decay), **optim)
    schedule = {k: v for k, v in OmegaConf.to_container(cfg.schedule, resolve=True).items() if not k.startswith("_")}
    scheduler = warmup_cosine(optimizer, **{**schedule, "total_steps": schedule.get("total_steps") or cfg.trainer.max_steps})
    ends = []
    for step, batch in enumerate(datamodule.train_stream(rank, world_size, start=0)):
        if step == cfg.trainer.max_steps:
            break
        batch = datamodule.on_after_batch_transfer(batch, 0)
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    return median_step(ends, warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny-gpt", "tiny-mamba", "tiny-mamba2"])
    p.add_argument("--steps", type=int, default=80, help="steps per side of a round")
    p.add_argument("--warmup", type=int, default=10, help="steps of each side not timed")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    ddp = "LOCAL_RANK" in os.environ  # under torch.distributed.run
    if ddp:
        dist.init_process_group("gloo")  # Lightning's DDP strategy takes the group it finds
    rows = []
    for model in args.models:
        cfg = compose_config(model, args.steps, ddp)
        ratios, bare_times, train_times = [], [], []
        for _ in range(args.rounds):
            train_times.append(train_py_step(cfg, args.warmup))
            bare_times.append(bare_step(cfg, args.warmup))
            ratios.append(train_times[-1] / bare_times[-1])
        rows.append([model, "ddp-cpu (2 ranks, gloo)" if ddp else "cpu", f"{statistics.median(bare_times) * 1e3:.2f}",
                     f"{statistics.median(train_times) * 1e3:.2f}", f"{statistics.median(ratios):.3f}",
                     f"{min(ratios):.3f}-{max(ratios):.3f}"])
    if not ddp or dist.get_rank() == 0:
        header = ["model", "trainer", "bare ms/step", "train.py ms/step", "train.py / bare", "range over rounds"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
