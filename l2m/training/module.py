"""The LightningModule that trains any l2m model on any task: the loss is the output adapter's."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import LambdaLR

from l2m.checks import BAD_INPUT, UserError
from l2m.models import build_model

# Where a checkpoint keeps the optimizer and schedule settings it was trained with.
SCHEDULE_KEY = "l2m_schedule"
# The optimizer and schedule of checkpoints written before they were configured by _target_.
ADAMW = "torch.optim.AdamW"
WARMUP_COSINE = "l2m.training.schedules.warmup_cosine"
SCHEDULE_ARGUMENTS = ("warmup_steps", "total_steps", "min_lr_ratio")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training stopped before the bad update."""


# The first non-finite step of a run where there is none.
NO_STEP = 2**62


class StepHealth:
    """Per-step training values summed on the device between logging steps, and the first step whose
    loss or gradients were not finite, both read by the host only at checks: a step never waits on the
    device for them.

    Every rank must take the same decision at a check, or the others would hang in the next collective.
    The all-reduced gradients are the same on every rank, and a non-finite loss on any rank makes them
    non-finite, so under DDP the decision is the gradients' alone; in one process the loss counts too.
    Under a GradScaler (16-mixed) non-finite gradients are routine and the scaler skips those updates
    itself, so they do not count.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._sums: torch.Tensor | None = None  # (1 + curves + 1,): loss, curves, gradient norm
        self._steps = 0
        self._first_bad: torch.Tensor | None = None  # int64 scalar, NO_STEP if none
        self._first_bad_loss: torch.Tensor | None = None

    def record(self, step: int, values: torch.Tensor, grad_norm: torch.Tensor, grads_count: bool) -> None:
        """Adds one step: values (1 + curves,) its loss and curves, grad_norm the gradients' total norm."""
        step_values = torch.cat([values, grad_norm.reshape(1)]).double()  # (1 + curves + 1,)
        if self._sums is None:
            self._sums = torch.zeros_like(step_values)
            self._first_bad = torch.tensor(NO_STEP, device=values.device)
            self._first_bad_loss = torch.zeros((), dtype=torch.float64, device=values.device)
        self._sums += step_values
        self._steps += 1
        loss = step_values[0]
        bad = torch.zeros((), dtype=torch.bool, device=values.device)
        if grads_count:
            bad = bad | ~torch.isfinite(step_values[-1])
        if self.world_size == 1:
            bad = bad | ~torch.isfinite(loss)
        first = bad & (self._first_bad == NO_STEP)
        self._first_bad = torch.where(first, step, self._first_bad)
        self._first_bad_loss = torch.where(first, loss, self._first_bad_loss)

    def check(self, step: int, reset_means: bool) -> torch.Tensor | None:
        """Raises NonFiniteLossError if a recorded step was not finite; else returns the means since
        the last reset, on the host: (1 + curves + 1,) loss, curves and gradient norm (None if there
        were no steps). One device-to-host copy."""
        if self._sums is None:
            return None
        flags = torch.stack([self._first_bad.double(), self._first_bad_loss])  # (2,)
        packed = torch.cat([flags, self._sums]).cpu()  # (2 + 1 + curves + 1,)
        if (first := int(packed[0])) != NO_STEP:
            loss = float(packed[1])
            what = (f"training loss is {loss} at step {first}" if not math.isfinite(loss)
                    else f"training gradients are not finite at step {first} (loss {loss:.4g})")
            raise NonFiniteLossError(
                f"{what}; stopped at step {step}, before any checkpoint of the weights it made. Lower optim.lr, "
                "raise trainer.gradient_clip_val or use precision 32-true, and resume from the last good "
                "checkpoint with ckpt_path=..."
            )
        means = packed[2:] / self._steps if self._steps else None
        if reset_means:
            self._sums, self._steps = torch.zeros_like(self._sums), 0
        return means


def split_legacy_optim(optim: Mapping[str, Any]) -> tuple[dict, dict]:
    """(optimizer, schedule) configs of an optim config without `_target_` (l2m before conf/schedule):
    AdamW's settings and the warmup-cosine schedule's, side by side in one mapping."""
    optimizer = {"_target_": ADAMW, "_partial_": True, **{k: v for k, v in optim.items() if k not in SCHEDULE_ARGUMENTS}}
    schedule = {"_target_": WARMUP_COSINE, "_partial_": True, **{k: optim[k] for k in SCHEDULE_ARGUMENTS if k in optim}}
    return optimizer, schedule


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Like GPT-2 / nanoGPT: no weight decay on biases, norms and other 1-d parameters, nor, as in
    mamba-ssm, on parameters tagged `_no_weight_decay` (Mamba's A_log is 2-d). The decayed group first."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p.dim() >= 2 and not getattr(p, "_no_weight_decay", False) for p in params]
    return [
        {"params": [p for p, d in zip(params, decay) if d], "weight_decay": weight_decay},
        {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0},
    ]


def _instantiate(group: str, config: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
    """instantiate(config)(*args, **kwargs), a refused setting as one line naming the group. A
    partial whether or not the config says so: the objects it is called with exist only here."""
    target = config.get("_target_")
    try:
        return instantiate({**config, "_partial_": True})(*args, **kwargs)
    except InstantiationException as error:
        raise UserError(f"{group} ({target}) cannot be built: {error.__cause__ or error}") from error
    except (*BAD_INPUT, ValueError, TypeError) as error:  # torch.optim's checks raise ValueError
        raise UserError(f"{group} ({target}) refused its settings: {error}") from error


class L2MModule(L.LightningModule):
    """Next-token training of a SequenceModel on the loss of its output adapter.

    Logs `train/loss` (what is minimised: the Gaussian KL per position and dimension, or the text
    NLL per token), each per-token curve as `train/<name>_per_token` (nats per token, summed over a
    Gaussian token's copies) and `train/grad_norm` (before clipping), each the mean over the steps since
    the last logging step: the values stay on the device in between, so no step waits for the host.
    A step whose loss or gradients are not finite stops training at the next logging step or
    checkpoint, whichever comes first, before that checkpoint is written (NonFiniteLossError).

    Args:
        model: model config for `l2m.models.build_model` (name, arch, n_layer, d_model, ...).
        io: the data's I/O adapter config, `datamodule.io_config()`.
        seq_len: context length L (the number of predicted positions).
        optim: the optimizer, a partial taking the parameter groups (conf/optim: `_target_`,
            `_partial_: true`, its settings; weight_decay applies to the decayed group only).
        schedule: the LR schedule, a partial taking the optimizer (conf/schedule); a null
            total_steps is trainer.max_steps. None: a constant rate.
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
        schedule: dict | None = None,
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
        # (1 + curves,), one per micro-batch of the optimizer step
        self._micro_batch_values.append(torch.stack([loss, *(curve.mean() for curve in losses.values())]).detach())
        self._curve_names = list(losses)
        return loss

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clips as Lightning would, from one gradient norm that is also logged (train/grad_norm) and,
        with the loss, recorded on the device: a step whose loss or gradients are not finite is found
        at the next check, without a host sync in the step."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)  # all-reduced gradients under DDP: the same on every rank
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grads_with_norm_(grads, gradient_clip_val, grad_norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        step_values = torch.stack(self._micro_batch_values).mean(0)  # (1 + curves,)
        self._micro_batch_values.clear()
        self._health.record(self.global_step, step_values, grad_norm,
                            grads_count=getattr(self.trainer.precision_plugin, "scaler", None) is None)
        self._check_and_log()

    def _check_and_log(self) -> None:
        """At Lightning's logging steps and the last step, before the update: stop on a non-finite step,
        log the means since the last logging step (the only host syncs of the loop). Here rather than at
        the step's end, so that callbacks (the progress lines) see this step's values."""
        last = self.global_step + 1 >= self.trainer.max_steps > 0
        if not (self.trainer._logger_connector.should_update_logs or last):
            return
        means = self._health.check(self.global_step, reset_means=True)
        if means is None:
            return
        # host tensors: Lightning converts a progress-bar value at every later step, a sync if on the device
        self.log("train/loss", means[0])
        for i, name in enumerate(self._curve_names):  # the adapter's first curve is its headline
            self.log(f"train/{name}_per_token", means[1 + i], prog_bar=i == 0)
        self.log("train/grad_norm", means[-1])
        self.log("train/lr", torch.tensor(self.optimizers().param_groups[0]["lr"]))

    def on_train_start(self) -> None:
        self._health = StepHealth(self.trainer.world_size)
        self._micro_batch_values: list[torch.Tensor] = []

    def on_train_end(self) -> None:
        self._health.check(self.global_step, reset_means=False)

    def optimizer_configs(self) -> tuple[dict, dict]:
        """(optimizer, schedule) configs of this run, the schedule's null total_steps set to
        trainer.max_steps."""
        if "_target_" in self.hparams.optim:
            optimizer, schedule = dict(self.hparams.optim), dict(self.hparams.schedule or {})
        else:
            optimizer, schedule = split_legacy_optim(self.hparams.optim)
        if "total_steps" in schedule and schedule["total_steps"] is None:
            schedule["total_steps"] = self.trainer.max_steps if self.trainer.max_steps >= 0 else None
        return optimizer, schedule

    def optimizer_settings(self) -> dict[str, Any]:
        """The optimizer's and schedule's settings, flat (as checkpoints record them)."""
        optimizer, schedule = self.optimizer_configs()
        settings = {**optimizer, **schedule, "optimizer": optimizer["_target_"], "schedule": schedule.get("_target_")}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items() if not k.startswith("_")}

    def configure_optimizers(self) -> dict:
        optimizer_config, schedule_config = self.optimizer_configs()
        weight_decay = optimizer_config.pop("weight_decay", 0.0)
        optimizer = _instantiate("optim", optimizer_config, parameter_groups(self, weight_decay))
        if not schedule_config:
            return {"optimizer": optimizer}
        scheduler = _instantiate("schedule", schedule_config, optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if (health := getattr(self, "_health", None)) is not None:  # no checkpoint holds weights of a bad update
            health.check(self.global_step, reset_means=False)
        checkpoint[SCHEDULE_KEY] = self.optimizer_settings()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run trains with this run's optimizer and schedule settings: the optimizer and
        scheduler states Lightning restores next would otherwise bring back the old ones. Rebuilt at
        the resumed step, the rate is the scheduler's own where nothing changed."""
        if "optimizer_states" not in checkpoint:
            return  # weights only
        settings = self.optimizer_settings()
        # older checkpoints recorded only their optim config (AdamW and warmup-cosine settings side by side)
        saved = checkpoint.get(SCHEDULE_KEY) or dict(checkpoint.get("hyper_parameters", {}).get("optim") or {})
        saved = {"optimizer": ADAMW, "schedule": WARMUP_COSINE, **saved}
        if saved["optimizer"] != settings["optimizer"]:
            raise UserError(f"cannot resume: the checkpoint trained with optim {saved['optimizer']}, this run asks for "
                             f"{settings['optimizer']}, whose state it does not hold. Resume with optim set as it "
                             "was, or start a new run (ckpt_path=null in a new run directory)")
        changed = {k: (saved[k], v) for k, v in settings.items() if saved.get(k) is not None and saved[k] != v}
        step = checkpoint["global_step"]
        configured = self.configure_optimizers()  # on this run's settings, at step 0
        groups, scheduler = configured["optimizer"].param_groups, configured.get("lr_scheduler", {}).get("scheduler")
        if isinstance(scheduler, LambdaLR):  # l2m's schedules: rebuilt at the resumed step
            for group, multiplier in zip(groups, scheduler.lr_lambdas):
                group["lr"] = group["initial_lr"] * multiplier(step)
            for state in checkpoint["lr_schedulers"]:
                state["base_lrs"] = [group["initial_lr"] for group in groups]
                state["_last_lr"] = [group["lr"] for group in groups]
        for state in checkpoint["optimizer_states"]:
            for saved_group, group in zip(state["param_groups"], groups):  # as parameter_groups builds them
                saved_group.update({k: v for k, v in group.items() if k != "params"})
        if changed:
            names = {"total_steps": "total_steps (schedule.total_steps, else trainer.max_steps)"}
            rank_zero_info(f"resuming at step {step} with new optimizer settings, the LR schedule rebuilt on them: "
                           + ", ".join(f"{names.get(k, k)} {old} -> {new}" for k, (old, new) in changed.items()))
