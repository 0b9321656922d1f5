"""Model zoo: GPT-2, Mamba and Mamba2 backbones with discrete or Gaussian token adapters.

    model = build_model(cfg, io={"kind": "gaussian", "dim": 64}, max_seq_len=1024)

``cfg`` is a preset from conf/model/*.yaml (or any mapping with the same keys).
"""

from __future__ import annotations

from collections.abc import Mapping

from l2m.models.gpt import GPT, POSITIONAL
from l2m.models.io import IO_KINDS, build_io
from l2m.models.lm import NORMS, L2MModel, MixerStack
from l2m.models.mamba import Mamba
from l2m.models.mamba2 import Mamba2

__all__ = ["build_model", "L2MModel", "GPT", "Mamba", "Mamba2", "MixerStack", "ARCHS"]

ARCHS = ("gpt", "mamba", "mamba2")
_COMMON = {"name": None, "arch": None, "n_layer": None, "d_model": None, "pad_vocab_size_multiple": 1, "tie_embeddings": True}
_DEFAULTS = {
    "gpt": {"n_head": None, "max_seq_len": 1024, "positional": "learned", "dropout": 0.0, "bias": True},
    "mamba": {"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": "auto", "backend": "auto", "norm": "rms"},
    "mamba2": {
        "d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256,
        "backend": "auto", "norm": "rms",
    },
}
_BACKENDS = {"mamba": ("auto", "torch", "kernels", "reference"), "mamba2": ("auto", "torch", "kernels")}


def build_model(cfg: Mapping, io: Mapping, max_seq_len: int | None = None) -> L2MModel:
    """An L2MModel from a model config and an io config.

    io: {"kind": "discrete", "vocab_size": V} or {"kind": "gaussian", "dim": D}.
    max_seq_len: the run's context length; sizes GPT's learned positions (overrides cfg).
    """
    c = _resolve(cfg)
    if max_seq_len is not None and c["arch"] == "gpt":
        c["max_seq_len"] = max_seq_len
    if not isinstance(io, Mapping) or io.get("kind") not in IO_KINDS:
        raise ValueError(f"io must be a mapping with 'kind' in {IO_KINDS}, got {io!r}")
    encoder, decoder = build_io(io, c["d_model"], c["tie_embeddings"], c["pad_vocab_size_multiple"])
    return L2MModel(encoder, _backbone(c), decoder, name=c["name"])


def _resolve(cfg: Mapping) -> dict:
    """Defaults filled in and every value checked, with errors that say what to change."""
    arch = cfg.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"model arch must be one of {ARCHS}, got {arch!r}")
    allowed = {**_COMMON, **_DEFAULTS[arch]}
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown} for arch {arch!r}; allowed: {sorted(allowed)}")
    c = {**allowed, **dict(cfg)}
    for key in ("n_layer", "d_model", "pad_vocab_size_multiple") + {
        "gpt": ("n_head", "max_seq_len"),
        "mamba": ("d_state", "d_conv", "expand"),
        "mamba2": ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"),
    }[arch]:
        if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
            raise ValueError(f"model {key} must be a positive int, got {c[key]!r}")
    if arch == "gpt":
        if c["d_model"] % c["n_head"]:
            raise ValueError(
                f"d_model={c['d_model']} is not divisible by n_head={c['n_head']}: choose n_head among "
                f"{[h for h in range(1, c['d_model'] + 1) if c['d_model'] % h == 0]}"
            )
        if c["positional"] not in POSITIONAL:
            raise ValueError(f"model positional must be one of {POSITIONAL}, got {c['positional']!r}")
        if not 0.0 <= c["dropout"] < 1.0:
            raise ValueError(f"model dropout must be in [0, 1), got {c['dropout']!r}")
        return c
    if c["backend"] not in _BACKENDS[arch]:
        raise ValueError(f"model backend for {arch} must be one of {_BACKENDS[arch]}, got {c['backend']!r}")
    if arch == "mamba" and c["dt_rank"] != "auto" and (not isinstance(c["dt_rank"], int) or c["dt_rank"] < 1):
        raise ValueError(f"model dt_rank must be 'auto' (ceil(d_model / 16)) or a positive int, got {c['dt_rank']!r}")
    if c["norm"] not in NORMS:
        raise ValueError(f"model norm must be one of {NORMS}, got {c['norm']!r}")
    if arch == "mamba2":
        d_inner = c["expand"] * c["d_model"]
        if d_inner % c["headdim"]:
            raise ValueError(
                f"headdim={c['headdim']} does not divide d_inner = expand * d_model = {d_inner}: "
                f"choose a headdim among the divisors of {d_inner} (e.g. 64) or change d_model/expand"
            )
        if (d_inner // c["headdim"]) % c["ngroups"]:
            raise ValueError(
                f"ngroups={c['ngroups']} must divide the number of heads d_inner / headdim = {d_inner // c['headdim']}"
            )
    return c


def _backbone(c: dict):
    if c["arch"] == "gpt":
        return GPT(c["n_layer"], c["d_model"], c["n_head"], c["max_seq_len"], c["positional"], c["dropout"], c["bias"])
    if c["arch"] == "mamba":
        kw = {k: c[k] for k in ("d_state", "d_conv", "expand", "dt_rank", "backend")}
        mixer_cls = Mamba
    else:
        kw = {k: c[k] for k in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "backend")}
        mixer_cls = Mamba2
    return MixerStack(lambda i: mixer_cls(c["d_model"], **kw, layer_idx=i), c["n_layer"], c["d_model"], c["norm"])

