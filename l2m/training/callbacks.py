"""L²M callbacks: history-state size vs the data's MI, and position-wise metrics on held-out data.

Reusable outside this repository: they need a LightningModule with `.model` (a SequenceModel) and
the model config it was built from in `hparams["model"]`, and a datamodule that implements
l2m.data.contract.L2MData.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.loggers import WandbLogger

from l2m.data.contract import L2MData
from l2m.evaluation import Positionwise, StateAnalysis, analyse_state, convergence, evaluate_positionwise
from l2m.report.run import positionwise_rows, write_outputs


def heldout_batches(datamodule: L.LightningDataModule, device: Any) -> Iterator:
    """The datamodule's held-out batches, on `device`, as the model sees them in training.

    Under DDP a datamodule may give each rank its own share (the all-reduced averages are exact
    for any split) or the whole set to every rank (then it is only evaluated redundantly).
    """
    for batch in datamodule.val_dataloader():
        batch = datamodule.on_before_batch_transfer(batch, 0)
        batch = move_data_to_device(batch, device)
        yield datamodule.on_after_batch_transfer(batch, 0)


def history_state_summary(model: Any, datamodule: L2MData) -> dict[str, Any]:
    """dim(z) (total and parts) at the data's `history_split` (L/2 unless the task says otherwise), the
    data's I_BP there and their ratio (paper Fig. 3c), and the model's receptive field (tokens back its
    output can depend on; None: all). Keys keep the name "_half"."""
    half = datamodule.history_split
    dim_z = model.history_state_size(half)
    i_bp = datamodule.bipartite_mi_half()
    parts = {f"dim_z_half_{name}": int(n) for name, n in model.history_state_breakdown(half).items()}
    return {
        "history_split": int(half),
        "history_split_label": datamodule.history_split_label,
        "dim_z_half": int(dim_z),
        **parts,
        "dim_z_half_bound": int(model.bound_state_size(half)),  # what the capacity bound counts (no conv)
        "i_bp_half": None if i_bp is None else float(i_bp),
        # no state (a window of one token keeps nothing of the past): the ratio is infinite, not a number
        "ratio": None if i_bp is None or dim_z == 0 else float(i_bp) / dim_z,
        "receptive_field": getattr(model, "receptive_field", None),
        "family": getattr(model, "family", None),  # what the recall frontier groups runs by
    }


def log_summary(trainer: L.Trainer, values: Mapping[str, Any]) -> None:
    """Numbers to every logger (prefix `l2m/`), everything to the W&B run summary."""
    numbers = {f"l2m/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for logger in trainer.loggers:
        logger.log_metrics(numbers, step=trainer.global_step)
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.summary.update(dict(values))


class HistoryStateCallback(L.Callback):
    """At fit start: log dim(z_{L/2}), I_BP(L/2; L) and I_BP / dim(z), into the run summary too."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_summary(trainer, history_state_summary(pl_module.model, trainer.datamodule))


def run_summary(
    model: Any,
    model_name: str,
    datamodule: Any,
    metrics: Positionwise,
    step: int,
    analysis: StateAnalysis | None = None,
    history: list | None = None,
) -> dict[str, Any]:
    """Everything summary.json holds, apart from the initial (before-training) averages.

    history: the periodic held-out evaluations [(step, KL), ...] (answer_kl for recall, else avg_kl;
    avg_nll for text); gives the convergence entries (slope over the last 20% of steps) and the
    learning curve.
    """
    history = [tuple(point) for point in history or []]
    return {
        "model": model_name,
        "task": datamodule.task,
        "reference_family": datamodule.reference_family(),
        "params": int(model.num_params()),
        "seq_len": int(datamodule.seq_len),
        "step": int(step),
        **history_state_summary(model, datamodule),
        **metrics.summary(),
        **_answer_metrics(metrics, datamodule),
        **(analysis.summary if analysis is not None else {}),
        **convergence(history),
        "heldout_history": [list(point) for point in history],
    }


def _answer_metrics(metrics: Positionwise, datamodule: L2MData) -> dict[str, float]:
    """For data with answer positions (associative recall): the KL and top-1 accuracy averaged over
    them, where the history state is what is tested."""
    answers = datamodule.answer_positions()
    if answers is None or "accuracy" not in metrics.extra:
        return {}
    chance = datamodule.answer_chance()
    return {
        "answer_kl": float(metrics.kl[answers].mean()),
        "answer_accuracy": float(metrics.extra["accuracy"][answers].mean()),
        **({} if chance is None else {"answer_chance": chance}),
    }


def model_name(model_config: Mapping[str, Any]) -> str:
    """How summaries name a model: its config's name (the preset), else its arch."""
    return model_config.get("name") or model_config.get("arch")


def evaluate_heldout(model: Any, datamodule: Any, device: Any, keep_heldout: bool = False) -> Positionwise:
    """Position-wise metrics of a model (on `device`) on the datamodule's held-out set; keep_heldout:
    with the batches kept, for the paired references of the final analysis."""
    return evaluate_positionwise(model, heldout_batches(datamodule, device), datamodule.nll_floor(), keep_heldout)


class PositionwiseCallback(L.Callback):
    """Position-wise KL_i / NLL_i on the datamodule's fixed held-out set.

    Measured before the first step (`initial_avg_kl`, kept across resumes), every
    `every_n_steps` steps (None: 20 times over the run; 0: never) and at the end of training,
    when it holds the model against the data's exact references (`analysis`: keyword arguments of
    l2m.evaluation.analyse_state) and writes positionwise.csv, summary.json and positionwise.png
    to `out_dir`, and logs the plot and table to W&B.
    """

    def __init__(self, out_dir: str | Path, every_n_steps: int | None = None, smooth: int = 5,
                 analysis: Mapping[str, Any] | None = None):
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.smooth = smooth
        self.analysis = dict(analysis or {})
        self.initial: dict[str, float | None] | None = None
        # (step, held-out KL: on the answers where the data has them, else the average; NLL where KL is unknown)
        self.history: list[tuple[int, float]] = []
        self.summary: dict[str, Any] | None = None

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool = False) -> Positionwise:
        metrics = evaluate_heldout(pl_module.model, trainer.datamodule, pl_module.device, keep_heldout=final)
        values = {**metrics.summary(), **_answer_metrics(metrics, trainer.datamodule)}
        averages = {f"val/{k}": v for k, v in values.items() if isinstance(v, float)}
        for logger in trainer.loggers:
            logger.log_metrics(averages, step=trainer.global_step)
        headline = averages.get("val/answer_kl", averages.get("val/avg_kl", averages["val/avg_nll"]))
        if not self.history or self.history[-1][0] != trainer.global_step:
            self.history.append((trainer.global_step, headline))
        return metrics

    def _interval(self, trainer: L.Trainer) -> int:
        if self.every_n_steps is not None:
            return self.every_n_steps
        if not trainer.max_steps or trainer.max_steps < 0:  # a run without max_steps: start and end only
            return 0
        return max(1, trainer.max_steps // 20)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.initial is None:  # restored from the checkpoint when resuming
            averages = self._evaluate(trainer, pl_module).summary()
            self.initial = {"initial_avg_kl": averages["avg_kl"], "initial_avg_nll": averages["avg_nll"]}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        interval = self._interval(trainer)
        if interval and trainer.global_step % interval == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self._evaluate(trainer, pl_module, final=True)
        data, model = trainer.datamodule, pl_module.model
        analysis = analyse_state(metrics, model, data, **self.analysis)
        name = model_name(pl_module.hparams["model"])
        summary = run_summary(model, name, data, metrics, trainer.global_step, analysis, self.history)
        self.summary = {**summary, **self.initial}
        if not trainer.is_global_zero:
            return
        paths = write_outputs(self.out_dir, metrics, self.summary, analysis, title=name, smooth=self.smooth)
        log_summary(trainer, self.summary)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                columns, rows = positionwise_rows(metrics, analysis)
                logger.log_table("positionwise/table", columns=columns, data=rows)
                logger.log_image("positionwise/plot", images=[str(paths["plot"])])

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial = state_dict["initial"]
        self.history = [tuple(point) for point in state_dict.get("history", [])]
