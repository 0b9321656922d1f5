"""The LightningModule that trains any l2m model on any task: the loss is the output adapter's."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import LambdaLR

from l2m.models import build_model


# Where a checkpoint keeps the optimizer and schedule settings it was trained with.
SCHEDULE_KEY = "l2m_schedule"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training stopped before the bad update."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class L2MModule(L.LightningModule):
    """Next-token training of a SequenceModel on the loss of its output adapter.

    Logs `train/loss` (what is minimised: the Gaussian KL per position and dimension, or the text
    NLL per token) and each per-token curve as `train/<name>_per_token` (nats per token, summed
    over a Gaussian token's copies).

    Args:
        model: model config for `l2m.models.build_model` (name, arch, n_layer, d_model, ...).
        io: the data's I/O adapter config, `datamodule.io_config()`.
        seq_len: context length L (the number of predicted positions).
        optim: lr, weight_decay, betas, eps, warmup_steps, total_steps (None: trainer.max_steps),
            min_lr_ratio.
        compile: compile the model's forward with torch.compile.
        data: the data config it was trained on, kept in the checkpoint so that evaluation can
            rebuild the held-out set.
    """

    def __init__(
        self,
        model: dict,
        io: dict,
        seq_len: int,
        optim: dict,
        compile: bool = False,
        data: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(model, io, max_seq_len=seq_len)
        if compile:
            self.model.compile()  # in place: parameter names and checkpoints are unchanged

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.model.losses(batch)
        loss = losses.pop("loss")
        self._stop_if_not_finite(loss)
        self.log("train/loss", loss)
        for i, (name, curve) in enumerate(losses.items()):  # the adapter's first curve is its headline
            self.log(f"train/{name}_per_token", curve.mean(), prog_bar=i == 0)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        # Every rank must take the same decision, or the others would hang in the next all-reduce.
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if not finite:
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {self.global_step}; stopped before applying "
                "this update. Lower optim.lr, raise trainer.gradient_clip_val or use precision 32-true, "
                "and resume from the last good checkpoint with ckpt_path=..."
            )

    def optimizer_settings(self) -> dict[str, Any]:
        """The optimizer and LR-schedule settings this run trains with (total_steps resolved)."""
        cfg = self.hparams.optim
        total = cfg.get("total_steps") or self.trainer.max_steps
        if total is None or total <= 0:
            raise ValueError("the LR schedule needs a length: set trainer.max_steps or optim.total_steps")
        if cfg["warmup_steps"] < 0 or not 0 <= cfg["min_lr_ratio"] <= 1:
            raise ValueError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
        if not cfg["lr"] > 0 or not cfg["eps"] > 0 or cfg["weight_decay"] < 0:
            raise ValueError(f"optim.lr and optim.eps must be > 0 and optim.weight_decay >= 0, got lr={cfg['lr']}, "
                             f"eps={cfg['eps']}, weight_decay={cfg['weight_decay']}")
        if len(cfg["betas"]) != 2 or not all(0 <= b < 1 for b in cfg["betas"]):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(cfg['betas'])}")
        return {"lr": cfg["lr"], "weight_decay": cfg["weight_decay"], "betas": list(cfg["betas"]), "eps": cfg["eps"],
                "warmup_steps": cfg["warmup_steps"], "total_steps": total, "min_lr_ratio": cfg["min_lr_ratio"]}

    def configure_optimizers(self) -> dict:
        settings = self.optimizer_settings()
        # Like GPT-2 / nanoGPT: no weight decay on biases, norms and other 1-d parameters, nor, as
        # in mamba-ssm, on parameters tagged `_no_weight_decay` (Mamba's A_log is 2-d).
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) for p in params]
        groups = [
            {"params": [p for p, d in zip(params, decay) if d], "weight_decay": settings["weight_decay"]},
            {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=settings["lr"], betas=tuple(settings["betas"]), eps=settings["eps"])
        scheduler = LambdaLR(optimizer, self._lr_multiplier(settings))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @staticmethod
    def _lr_multiplier(settings: Mapping[str, Any]) -> partial:
        return partial(warmup_cosine, warmup_steps=settings["warmup_steps"], total_steps=settings["total_steps"],
                       min_lr_ratio=settings["min_lr_ratio"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[SCHEDULE_KEY] = self.optimizer_settings()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run trains with this run's optimizer and schedule settings: the optimizer and
        scheduler states Lightning restores next would otherwise bring back the old learning rate.
        Rebuilt at the resumed step, the rate is the scheduler's own where nothing changed."""
        if "optimizer_states" not in checkpoint:
            return  # weights only
        settings = self.optimizer_settings()
        # older checkpoints recorded only their optim config, whose length may be unresolved (None)
        saved = checkpoint.get(SCHEDULE_KEY) or dict(checkpoint.get("hyper_parameters", {}).get("optim") or {})
        changed = {k: (saved[k], v) for k, v in settings.items() if saved.get(k) is not None and saved[k] != v}
        step = checkpoint["global_step"]
        lr = settings["lr"] * self._lr_multiplier(settings)(step)
        for state in checkpoint["optimizer_states"]:
            decay_group, *others = state["param_groups"]  # as configure_optimizers builds them
            for group in (decay_group, *others):
                group.update(lr=lr, initial_lr=settings["lr"], betas=tuple(settings["betas"]), eps=settings["eps"])
            decay_group["weight_decay"] = settings["weight_decay"]
        for scheduler in checkpoint["lr_schedulers"]:
            scheduler["base_lrs"] = [settings["lr"]] * len(scheduler["base_lrs"])
            scheduler["_last_lr"] = [lr] * len(scheduler["base_lrs"])
        if changed:
            names = {"total_steps": "total_steps (optim.total_steps, else trainer.max_steps)"}
            rank_zero_info(f"resuming at step {step} with new optimizer settings, the LR schedule rebuilt on them: "
                           + ", ".join(f"{names.get(k, k)} {old} -> {new}" for k, (old, new) in changed.items()))
