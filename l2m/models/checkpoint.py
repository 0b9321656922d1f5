"""Load the model of an l2m training checkpoint without Lightning (evaluation, MI scorers, export).

A checkpoint is the file Lightning writes for l2m.training.L2MModule: "hyper_parameters" holds the
module's arguments (model and io configs, seq_len, optim, the data config trained on) and
"state_dict" the weights, the model's under the prefix "model.".
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from l2m.checks import UserError
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


class UnreadableCheckpointError(UserError):
    """A file that is not a readable checkpoint (truncated, empty, not written by torch.save)."""


def read_checkpoint(path: str | Path) -> dict:
    """The dict a checkpoint file holds, its tensors memory-mapped (reading the step or the config of
    a large checkpoint costs little)."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such checkpoint. Checkpoints are in <run dir>/checkpoints/, e.g. "
            "outputs/<date>/<time>/checkpoints/last.ckpt"
        )
    if path.stat().st_size == 0:
        raise UnreadableCheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose directory is at its end
        raise UnreadableCheckpointError(f"{path} is not a checkpoint written by torch.save, or it was truncated "
                                        "(by a crash or a full disk)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # torch raises many kinds for a damaged file: zip, pickle, EOF, runtime errors
        raise UnreadableCheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error}); "
                                        "it may be damaged") from error
    if not isinstance(raw, dict) or "global_step" not in raw:
        raise UnreadableCheckpointError(f"{path} is not an l2m/Lightning training checkpoint")
    return raw


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at `path` with its model built and loaded (on the CPU, in eval mode)."""
    path = Path(path).expanduser().absolute()
    raw = read_checkpoint(path)
    hparams = dict(raw.get("hyper_parameters") or {})
    if not {"model", "io", "seq_len"} <= set(hparams) or "state_dict" not in raw:
        raise UnreadableCheckpointError(f"{path} is not an l2m training checkpoint (no model config and weights of "
                                        "l2m.training.L2MModule); a Hugging Face model loads with hf:<folder>")
    model = build_model(hparams["model"], hparams["io"], max_seq_len=hparams["seq_len"])
    weights = {k[len(_PREFIX):]: v for k, v in raw["state_dict"].items() if k.startswith(_PREFIX)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # torch lists every key; the first line says what kind of mismatch
        raise UnreadableCheckpointError(f"{path}: its weights do not fit the model its config describes "
                                        f"({str(error).splitlines()[0]} ...)") from error
    return Checkpoint(path, model.eval(), hparams, int(raw["global_step"]), dict(raw.get("callbacks", {})))


def load_pretrained(source: str | Path, max_seq_len: int | None = None) -> tuple[SequenceModel, dict]:
    """(model, its l2m model config) from an l2m checkpoint (a .ckpt file) or a Hugging Face folder
    or hub id (l2m.models.hf.from_hf). max_seq_len: the context to keep of GPT's learned positions."""
    if str(source).endswith(".ckpt") or Path(source).is_file():
        checkpoint = load_checkpoint(source)
        config = dict(checkpoint.hparams["model"])
        if max_seq_len is None or "max_seq_len" not in config or checkpoint.model.max_positions is None:
            return checkpoint.model, config
        if max_seq_len > checkpoint.model.max_positions:
            positions = checkpoint.model.max_positions
            raise UserError(f"{source} has learned positions for {positions} tokens, fewer than the data's "
                             f"L = {max_seq_len}: train on data with L <= {positions}")
        model = build_model(config, checkpoint.hparams["io"], max_seq_len=max_seq_len)
        weights = checkpoint.model.state_dict()
        weights["backbone.wpe.weight"] = weights["backbone.wpe.weight"][:max_seq_len]
        model.load_state_dict(weights)
        return model, {**config, "max_seq_len": max_seq_len}
    from l2m.models.hf import from_hf

    return from_hf(source, max_seq_len=max_seq_len)
