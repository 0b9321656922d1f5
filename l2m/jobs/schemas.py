"""Structured-config schemas of the config groups, in Hydra's ConfigStore under `schema/<group>/<name>`.

A preset inherits its schema in its defaults list (`- /schema/model/gpt@_here_`), so every field of
its class is overridable on the command line without `+`, typed and checked at compose time, and
the preset holds only what differs from the defaults. Models take their typed dataclass
(GPTConfig, ...); data modules, optimizers, LR schedules and the Lightning Trainer take a schema
made from their signature, so it never drifts from the code it configures.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

# Trainer arguments the job sets itself (l2m.jobs.run.train): not options of conf/trainer.
JOB_TRAINER_ARGUMENTS = ("logger", "callbacks", "plugins", "default_root_dir", "limit_val_batches",
                         "num_sanity_val_steps")


def _supported(annotation: Any) -> bool:
    try:
        OmegaConf.structured(dataclasses.make_dataclass("Probe", [("value", annotation, dataclasses.field(default=MISSING))]))
    except Exception:  # noqa: BLE001  OmegaConf says no in several exception types
        return False
    return True


def _schema_type(annotation: Any) -> Any:
    """The annotation where OmegaConf can check it; a Union without the members it cannot (torch's
    `float | Tensor` learning rates); a list of anything for other sequences; else Any."""
    if _supported(annotation):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kept = [a for a in args if _supported(a)]
        if len(kept) == 1:
            return kept[0] | None if type(None) in typing.get_args(annotation) else kept[0]
    if typing.get_origin(annotation) in (tuple, list):
        return list[Any]
    return Any


def _default(value: Any) -> dataclasses.Field:
    if value is inspect.Parameter.empty:
        return dataclasses.field(default=MISSING)
    if isinstance(value, (list, tuple, dict)):  # OmegaConf holds sequences as lists
        return dataclasses.field(default_factory=lambda: list(value) if isinstance(value, tuple) else copy.deepcopy(value))
    return dataclasses.field(default=value)


def signature_schema(target: Callable, skip: Iterable[str] = (), partial: bool = False) -> type:
    """A dataclass with `_target_` (and `_partial_`) and one typed field per keyword of `target`."""
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # noqa: BLE001  annotations that name what is not importable here
        hints = {}
    fields = [("_target_", str, dataclasses.field(default=f"{target.__module__}.{target.__qualname__}"))]
    if partial:
        fields.append(("_partial_", bool, dataclasses.field(default=True)))
    for parameter in inspect.signature(target).parameters.values():
        if parameter.name in skip or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = _schema_type(hints.get(parameter.name, Any))
        if parameter.default is None and annotation is not Any:
            annotation = annotation | None
        fields.append((parameter.name, annotation, _default(parameter.default)))
    schema = dataclasses.make_dataclass(f"{target.__qualname__}Schema", fields)
    # Composed configs keep their schema's class, and sweeps and DDP jobs pickle them: findable here.
    schema.__module__ = __name__
    globals()[schema.__qualname__] = schema
    return schema


def register_schemas() -> None:
    """Store the schema of every shipped model, data module, optimizer, schedule and the trainer
    (done when this module is imported, before Hydra composes conf/)."""
    import lightning as L
    import torch

    from l2m.data.gaussian import GaussianDataModule
    from l2m.data.recall import RecallDataModule
    from l2m.data.text import TextDataModule
    from l2m.models import ARCHITECTURES
    from l2m.training.schedules import warmup_cosine

    store = ConfigStore.instance()
    for arch, architecture in ARCHITECTURES.items():
        store.store(group="schema/model", name=arch, node=architecture.config)
    for name, datamodule in (("gaussian", GaussianDataModule), ("recall", RecallDataModule), ("text", TextDataModule)):
        store.store(group="schema/data", name=name, node=signature_schema(datamodule))
    for name, optimizer in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)):
        store.store(group="schema/optim", name=name, node=signature_schema(optimizer, skip=("params",), partial=True))
    store.store(group="schema/schedule", name="warmup_cosine",
                node=signature_schema(warmup_cosine, skip=("optimizer",), partial=True))
    store.store(group="schema/trainer", name="lightning", node=signature_schema(L.Trainer, skip=JOB_TRAINER_ARGUMENTS))
    # evaluate.py's data: changes to whichever data config the checkpoint holds, so any key (checked
    # against that data module by the job), not a schema
    store.store(group="schema/evaluate", name="data", node=OmegaConf.create({}, flags={"struct": False}))


register_schemas()
