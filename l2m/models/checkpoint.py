"""Load the model of an l2m training checkpoint without Lightning (evaluation, MI scorers, export).

A checkpoint is the file Lightning writes for l2m.training.L2MModule: "hyper_parameters" holds the
module's arguments (model and io configs, seq_len, optim, the data config trained on) and
"state_dict" the weights, the model's under the prefix "model.".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from l2m.models.registry import build_model
from l2m.models.sequence_model import SequenceModel

_PREFIX = "model."


@dataclass
class Checkpoint:
    path: Path
    model: SequenceModel
    hparams: dict  # the training module's arguments: model, io, seq_len, optim, data, ...
    step: int
    callbacks: dict = field(default_factory=dict)  # callback states by class name


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at `path` with its model built and loaded (on the CPU, in eval mode)."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such checkpoint. Checkpoints are in <run dir>/checkpoints/, e.g. "
            "outputs/<date>/<time>/checkpoints/last.ckpt"
        )
    raw = torch.load(path, map_location="cpu", weights_only=False)
    hparams = dict(raw["hyper_parameters"])
    model = build_model(hparams["model"], hparams["io"], max_seq_len=hparams["seq_len"])
    weights = {k[len(_PREFIX):]: v for k, v in raw["state_dict"].items() if k.startswith(_PREFIX)}
    model.load_state_dict(weights)
    return Checkpoint(path, model.eval(), hparams, int(raw["global_step"]), dict(raw.get("callbacks", {})))
