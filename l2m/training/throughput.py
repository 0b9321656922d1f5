"""Throughput of every run: `perf/tokens_per_sec` (all ranks together), and `perf/mfu`, model FLOPs
utilisation, where the device's peak FLOP/s is known (SequenceModel.flops_per_token, x3 for the
backward pass; recomputation under activation checkpointing is not counted, as MFU defines it)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
import torch

# Dense peak FLOP/s per device, (16-bit tensor cores, fp32), from the vendors' data sheets. The first
# name contained in torch.cuda.get_device_name() wins, so "H100 PCIe" stands before "H100".
PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
}


def peak_flops(device_name: str, precision: str) -> float | None:
    """The peak FLOP/s of a device at a Lightning precision ("bf16-mixed", "32-true", ...), or None
    where it is not known (CPUs, other GPUs)."""
    for name, (half, single) in PEAK_FLOPS.items():
        if name in device_name:
            return half if "16" in str(precision) else single
    return None


class ThroughputCallback(L.Callback):
    """Logs perf/tokens_per_sec over the last `window` steps (predicted positions per second, summed
    over DDP ranks) and perf/mfu where the device's peak is known, at Lightning's logging steps."""

    def __init__(self, window: int = 20):
        self._ends: deque[float] = deque(maxlen=window + 1)  # the last `window` steps' end times, and one before

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ends.clear()
        self._ends.append(time.perf_counter())
        device = pl_module.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self._peak = peak_flops(name, trainer.precision)
        self._flops_per_token = 3 * pl_module.model.flops_per_token(pl_module.hparams.seq_len)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._ends.append(time.perf_counter())
        if not trainer._logger_connector.should_update_logs:
            return  # a value logged at every step is a host-to-device copy at every step
        batch_size = batch[pl_module.model.encoder.batch_key].shape[0]
        tokens_per_step = batch_size * pl_module.hparams.seq_len * trainer.world_size
        steps = len(self._ends) - 1
        tokens_per_sec = steps * tokens_per_step / (self._ends[-1] - self._ends[0])
        pl_module.log("perf/tokens_per_sec", tokens_per_sec)
        if self._peak is not None:
            pl_module.log("perf/mfu", tokens_per_sec * self._flops_per_token / (self._peak * trainer.world_size))
