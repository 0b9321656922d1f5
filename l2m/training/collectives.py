"""What a training loop costs between ranks beyond the gradients' all-reduce: a count of the Python
collectives of torch.distributed (all_reduce, barrier, broadcast, ...) each rank calls per optimizer step.

DDP's gradient all-reduce runs in its C++ reducer and is not counted; everything Lightning, l2m and
the user's callbacks add is. `'callbacks=[default,collectives]'` writes `<run dir>/collectives_rank<r>.json`.
"""

from __future__ import annotations

import functools
import json
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce", "gather", "scatter", "all_to_all", "reduce_scatter_tensor", "all_gather_into_tensor")


class CollectiveCounter(L.Callback):
    """Counts the collectives each rank calls in the whole steps from step `start` on (before it:
    start-up, first evaluation; after the last: the end of training) and writes, at the end of training, `collectives_rank<r>.json`: the steps counted,
    the calls per collective, per step, and where in the code each kind was called from (innermost
    frame outside torch.distributed and Lightning's wrappers)."""

    def __init__(self, out_dir: str | Path, start: int = 10):
        self.out_dir, self.start = Path(out_dir), start
        self.calls: Counter[str] = Counter()
        self.origins: dict[str, Counter[str]] = {}
        self._counting = False
        self._first_step: int | None = None
        self._originals: dict[str, Any] = {}

    def _wrap(self, name: str) -> Any:
        original = getattr(dist, name)

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._counting:
                self.calls[name] += 1
                self.origins.setdefault(name, Counter())[_caller()] += 1
            return original(*args, **kwargs)

        return counted

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning and torch call these as attributes of torch.distributed, looked up at each call
        for name in COLLECTIVES:
            if hasattr(dist, name) and name not in self._originals:
                self._originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.start and self._first_step is None:
            self._first_step, self._counting = trainer.global_step, True
        if self._counting:  # the counts of whole steps: the last one ends with training's end-of-run work
            self._whole_steps = (trainer.global_step - self._first_step, self.calls.copy(),
                                 {name: origins.copy() for name, origins in self.origins.items()})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._counting = False
        steps, calls, origins = getattr(self, "_whole_steps", (0, Counter(), {}))
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "steps": steps,
            "calls": dict(calls),
            "per_step": sum(calls.values()) / steps if steps else None,
            "origins": {name: dict(counts) for name, counts in origins.items()},
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"collectives_rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=1))


def _caller() -> str:
    """file:line of the innermost frame outside torch.distributed, Lightning's strategy and this module."""
    skipped = ("torch/distributed", "lightning/fabric/utilities/distributed", "lightning/pytorch/strategies",
               "lightning/fabric/strategies", __file__)
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not any(part in frame.filename for part in skipped):
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return "?"
