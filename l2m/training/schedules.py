"""LR schedules, configured in conf/schedule/ as partials that take the optimizer (`_partial_: true`).

Any `torch.optim.lr_scheduler` class configures the same way (`_target_: torch.optim.lr_scheduler.StepLR`).
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from l2m.checks import UserError


def warmup_cosine_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                  min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warmup, then cosine decay to min_lr_ratio · lr at `total_steps` (the training module
    fills in trainer.max_steps where it is null), stepped every optimizer step.

    The multiplier is a partial of a module function, not an object: LambdaLR's state_dict keeps an
    object's attributes, so a resumed run would bring back the old settings instead of the new ones.
    """
    if total_steps is None or total_steps <= 0:
        raise UserError("the LR schedule needs a length: set trainer.max_steps or schedule.total_steps")
    if warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
        raise UserError(f"schedule.warmup_steps must be >= 0 and schedule.min_lr_ratio in [0, 1], got "
                         f"warmup_steps={warmup_steps}, min_lr_ratio={min_lr_ratio}")
    multiplier = partial(warmup_cosine_multiplier, warmup_steps=warmup_steps, total_steps=total_steps,
                         min_lr_ratio=min_lr_ratio)
    return LambdaLR(optimizer, multiplier)
