"""Composition errors of train.py / evaluate.py command lines as one line naming the key.

Hydra composes the config before any l2m code runs and reports a wrong override over several
lines ("Could not override 'model.nonsense'. To append to your config use +model.nonsense=1 ...").
`check_command_line` composes the command line's overrides first and, where Hydra would refuse
them, prints one line naming the key and the keys (or options) allowed there, and exits 1.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from l2m.checks import UserError
from l2m.jobs import schemas  # noqa: F401  (the schemas conf/ inherits)
from l2m.jobs.cluster import checked_run_id

# Hydra's own options: their command lines are Hydra's to report.
_MULTIRUN = ("-m", "--multirun")


def _fields(error: Exception) -> list[str]:
    """The keys allowed where `error` happened: the fields of its schema, else the node's keys."""
    schema = getattr(error, "object_type", None)
    if dataclasses.is_dataclass(schema):
        return [f.name for f in dataclasses.fields(schema) if not f.name.startswith("_")]
    parent = getattr(error, "parent_node", None)
    return [str(k) for k in parent.keys()] if isinstance(parent, DictConfig) else []


def _schema_name(error: Exception) -> str:
    schema = getattr(error, "object_type", None)
    return f" ({schema.__name__.removesuffix('Schema')})" if dataclasses.is_dataclass(schema) else ""


def composition_message(error: HydraException, overrides: Sequence[str] = ()) -> str:
    """One line for a composition error: the key, what is wrong, what is allowed."""
    cause = error.__cause__
    key = getattr(cause, "full_key", None)
    override = next((o for o in overrides if o.partition("=")[0].lstrip("+~") == key), None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        parent = key.rpartition(".")[0]
        where = f"a key of {parent}{_schema_name(cause)}" if parent else "a top-level key"
        typed = dataclasses.is_dataclass(getattr(cause, "object_type", None))
        return (f"{key} is not {where}; the keys there: {', '.join(_fields(cause))}"
                + ("" if typed else f" (or add it: +{override or key + '=...'})"))
    if isinstance(cause, ValidationError):
        schema = getattr(cause, "object_type", None)
        expected = {f.name: f.type for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
        wanted = expected.get(cause.key)
        wanted = f"; {cause.full_key} takes {getattr(wanted, '__name__', None) or str(wanted).replace('typing.', '')}" if wanted else ""
        return f"{override or cause.full_key}: {str(cause).splitlines()[0]}{wanted}"
    if isinstance(error, MissingConfigException):
        found = re.search(r"Could not find '([^']+)'", str(error))
        options = re.findall(r"^\t(\S+)$", str(error), re.M)
        group = found.group(1).rpartition("/")[0] if found else ""
        if found and options:
            return f"{found.group(1)} is not a config: the options of {group} are {', '.join(options)}"
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def unparsable_override_message(parser: OverridesParser, arguments: Sequence[str]) -> str:
    """One line naming the override Hydra's grammar refuses, with what it said and how to quote it."""
    for argument in arguments:
        try:
            parser.parse_overrides([argument])
        except HydraException as error:
            said = str(error).strip().splitlines()[0]
            key, _, value = argument.partition("=")
            return (f"{argument}: Hydra cannot parse this override ({said}); quote a value that holds spaces or any "
                    f"of ' \" = , : ~ ( ) [ ] {{ }}, the shell's quotes around Hydra's: '{key}=\"{value}\"'")
    return "Hydra cannot parse the overrides " + " ".join(arguments)


def check_command_line(config_dir: str | Path, config_name: str, argv: Sequence[str] | None = None) -> None:
    """Exit 1 with `error: <one line>` where Hydra would refuse to compose this command line, 2 where
    it cannot parse an override; do nothing where it composes, or where it is for Hydra to report (its
    flags)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg.startswith("-") and arg not in _MULTIRUN for arg in argv):
        return
    arguments = [arg for arg in argv if arg not in _MULTIRUN]
    parser = OverridesParser.create()
    try:
        overrides = parser.parse_overrides(arguments)
    except HydraException:
        print(f"error: {unparsable_override_message(parser, arguments)}", file=sys.stderr)
        sys.exit(2)
    # A sweep's values are composed job by job; each job's own composition reports them.
    plain = [o.input_line for o in overrides if not o.is_sweep_override()]
    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name, overrides=plain)
    except (ConfigCompositionException, MissingConfigException) as error:
        print(f"error: {composition_message(error, plain)}", file=sys.stderr)
        sys.exit(1)
    except HydraException:
        return
    try:  # Hydra resolves the run directory from it before any of our code runs
        checked_run_id(cfg.get("run_id"))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def model_preset(name: str, config_dir: str | Path) -> dict:
    """conf/model/<name>.yaml as train.py composes it: its schema's defaults under the preset's values."""
    with initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=[f"model={name}"]).model)
