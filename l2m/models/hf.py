"""Hugging Face interop: l2m models from and to the ecosystem's weight folders.

    model, config = from_hf("state-spaces/mamba-130m-hf")   # or a local folder
    to_hf(model, "exported/")                               # AutoModelForCausalLM.from_pretrained loads it

Read: transformers folders of GPT2LMHeadModel, MambaForCausalLM and Mamba2ForCausalLM (config.json
with safetensors or .bin weights), and mamba-ssm's own MambaLMHeadModel format (config.json with
d_model / ssm_cfg, and pytorch_model.bin, as the state-spaces repositories ship it). Hub ids work
where the hub is reachable or the snapshot is cached. Write: a transformers folder of the same
three classes. Vocabularies: mamba-ssm pads the embedding to a multiple of pad_vocab_size_multiple
and l2m keeps those rows (its logits drop them); transformers folders get the unpadded rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from l2m.checks import UserError
from l2m.models.registry import build_model
from l2m.models.sequence_model import SequenceModel

SUPPORTED = ("GPT2LMHeadModel (gpt2)", "MambaForCausalLM (mamba)", "Mamba2ForCausalLM (mamba2)",
             "mamba-ssm MambaLMHeadModel (config.json with d_model and ssm_cfg)")
HF_HINT = "Hugging Face interop needs transformers: pip install 'l2m[hf]'"
_GELU = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def resolve_folder(path_or_id: str | Path) -> Path:
    """A local folder as it is, or a hub id through the hub (or its local cache)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path_or_id}: not a folder with config.json and weights (nor a hub id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
    except Exception as error:  # offline, unknown id, gated repository ...
        raise ConnectionError(
            f"{path_or_id}: no such local folder, and not reachable as a hub id ({type(error).__name__}); "
            "download it where the hub is reachable and pass the folder"
        ) from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {k: v for f in files for k, v in load_file(f).items()}
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors or pytorch_model*.bin weights")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise UserError(f"cannot represent this model in l2m: {what}")


# ---- the three families: config translation and key maps ((l2m key, hf key, transposed)) ----

def _gpt2_config(c: dict) -> tuple[dict, int]:
    _require(c.get("activation_function", "gelu_new") in _GELU,
             f"activation_function {c.get('activation_function')!r} (l2m has {sorted(_GELU)})")
    _require(abs(c.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12, "layer_norm_epsilon other than 1e-5")
    _require(not c.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx")
    config = {"arch": "gpt", "n_layer": c["n_layer"], "d_model": c["n_embd"], "n_head": c["n_head"],
              "max_seq_len": c.get("n_positions", 1024), "positional": "learned", "bias": True,
              "activation": _GELU[c.get("activation_function", "gelu_new")],
              "tie_embeddings": c.get("tie_word_embeddings", True)}
    return config, c["vocab_size"]


def _gpt2_keys(config: dict) -> list[tuple[str, str, bool]]:
    keys = [("encoder.wte.weight", "transformer.wte.weight", False),
            ("backbone.wpe.weight", "transformer.wpe.weight", False),
            ("backbone.norm_f.weight", "transformer.ln_f.weight", False),
            ("backbone.norm_f.bias", "transformer.ln_f.bias", False)]
    for i in range(config["n_layer"]):
        ours, theirs = f"backbone.layers.{i}.", f"transformer.h.{i}."
        for name, their_name in (("norm", "ln_1"), ("norm2", "ln_2")):
            keys += [(f"{ours}{name}.{p}", f"{theirs}{their_name}.{p}", False) for p in ("weight", "bias")]
        for name, their_name in (("mixer.c_attn", "attn.c_attn"), ("mixer.c_proj", "attn.c_proj"),
                                 ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):  # Conv1D: (in, out)
            keys += [(f"{ours}{name}.weight", f"{theirs}{their_name}.weight", True),
                     (f"{ours}{name}.bias", f"{theirs}{their_name}.bias", False)]
    if not config["tie_embeddings"]:
        keys.append(("decoder.lm_head.weight", "lm_head.weight", False))
    return keys


def _mamba_config(c: dict) -> tuple[dict, int]:
    _require(abs(c.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12, "layer_norm_epsilon other than 1e-5")
    config = {"arch": "mamba", "n_layer": c["num_hidden_layers"], "d_model": c["hidden_size"],
              "d_state": c["state_size"], "d_conv": c["conv_kernel"], "expand": c["expand"],
              "dt_rank": c.get("time_step_rank", "auto"), "bias": c.get("use_bias", False),
              "conv_bias": c.get("use_conv_bias", True), "tie_embeddings": c.get("tie_word_embeddings", True)}
    return config, c["vocab_size"]


def _mamba2_config(c: dict) -> tuple[dict, int]:
    _require(abs(c.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12, "layer_norm_epsilon other than 1e-5")
    _require(not c.get("use_bias", False) and c.get("use_conv_bias", True), "use_bias or no use_conv_bias")
    _require(c.get("num_heads") in (None, c["expand"] * c["hidden_size"] // c["head_dim"]),
             "num_heads other than expand * hidden_size / head_dim")
    # transformers writes infinity into config.json as {"__float__": "Infinity"}
    limit = [float(x["__float__"]) if isinstance(x, dict) else float(x)
             for x in c.get("time_step_limit", (0.0, float("inf")))]
    _require(limit == [0.0, float("inf")], f"time_step_limit {limit} (l2m does not clamp dt)")
    config = {"arch": "mamba2", "n_layer": c["num_hidden_layers"], "d_model": c["hidden_size"],
              "d_state": c["state_size"], "d_conv": c["conv_kernel"], "expand": c["expand"],
              "headdim": c["head_dim"], "ngroups": c["n_groups"], "chunk_size": c.get("chunk_size", 256),
              "tie_embeddings": c.get("tie_word_embeddings", False)}
    return config, c["vocab_size"]


def _mixer_keys(config: dict, prefix: str, embedding: str, mixer_params: tuple[str, ...]) -> list:
    keys = [("encoder.wte.weight", f"{prefix}{embedding}", False),
            ("backbone.norm_f.weight", f"{prefix}norm_f.weight", False)]
    for i in range(config["n_layer"]):
        keys.append((f"backbone.layers.{i}.norm.weight", f"{prefix}layers.{i}.norm.weight", False))
        keys += [(f"backbone.layers.{i}.mixer.{p}", f"{prefix}layers.{i}.mixer.{p}", False) for p in mixer_params]
    if not config["tie_embeddings"]:
        keys.append(("decoder.lm_head.weight", "lm_head.weight", False))
    return keys


_MAMBA_PARAMS = ("A_log", "D", "conv1d.weight", "conv1d.bias", "in_proj.weight", "x_proj.weight",
                 "dt_proj.weight", "dt_proj.bias", "out_proj.weight")
_MAMBA2_PARAMS = ("dt_bias", "A_log", "D", "conv1d.weight", "conv1d.bias", "in_proj.weight", "norm.weight",
                  "out_proj.weight")


def _mixer_params(config: dict) -> tuple[str, ...]:
    params = _MAMBA_PARAMS if config["arch"] == "mamba" else _MAMBA2_PARAMS
    if config["arch"] == "mamba":
        params += ("in_proj.bias", "out_proj.bias") if config.get("bias") else ()
        params = tuple(p for p in params if p != "conv1d.bias" or config.get("conv_bias", True))
    return params


def _mamba_ssm_config(c: dict) -> tuple[dict, int]:
    ssm = dict(c.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    _require(not c.get("d_intermediate"), "an MLP after each mixer (d_intermediate > 0)")
    _require(not c.get("attn_layer_idx"), "attention layers (attn_layer_idx)")
    arch = {"Mamba1": "mamba", "Mamba2": "mamba2"}.get(layer)
    _require(arch is not None, f"ssm_cfg layer {layer!r}")
    known = {"mamba": ("d_state", "d_conv", "expand", "dt_rank"),
             "mamba2": ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size")}[arch]
    _require(set(ssm) <= set(known) | {"dt_min", "dt_max", "dt_init_floor"}, f"ssm_cfg keys {sorted(set(ssm) - set(known))}")
    config = {"arch": arch, "n_layer": c["n_layer"], "d_model": c["d_model"],
              "norm": "rms" if c.get("rms_norm", True) else "layer",
              "pad_vocab_size_multiple": c.get("pad_vocab_size_multiple", 8),
              "tie_embeddings": c.get("tie_embeddings", True), **{k: ssm[k] for k in known if k in ssm}}
    return config, c["vocab_size"]


def _mamba_ssm_keys(config: dict) -> list:
    keys = _mixer_keys(config, "backbone.", "embedding.weight", _mixer_params(config))
    if config["norm"] == "layer":
        keys += [(k.replace(".weight", ".bias"), h.replace(".weight", ".bias"), False)
                 for k, h, _ in keys if k.endswith("norm.weight") or k == "backbone.norm_f.weight"]
    return keys


FAMILIES: dict[str, tuple[Callable, Callable]] = {
    "gpt2": (_gpt2_config, _gpt2_keys),
    "mamba": (_mamba_config, lambda cfg: _mixer_keys(cfg, "backbone.", "embeddings.weight", _mixer_params(cfg))),
    "mamba2": (_mamba2_config, lambda cfg: _mixer_keys(cfg, "backbone.", "embeddings.weight", _mixer_params(cfg))),
    "mamba_ssm": (_mamba_ssm_config, _mamba_ssm_keys),
}


def hf_family(config_json: dict) -> str:
    """Which of FAMILIES a config.json describes, or a ValueError naming the supported ones."""
    if "d_model" in config_json and "ssm_cfg" in config_json:
        return "mamba_ssm"
    model_type = config_json.get("model_type")
    if model_type in ("gpt2", "mamba", "mamba2"):
        return model_type
    raise UserError(
        f"model_type {model_type!r} ({', '.join(config_json.get('architectures') or [])}) is not supported by "
        f"l2m's importer; supported: {', '.join(SUPPORTED)}. Other causal LMs can still be evaluated "
        "(evaluate.py ckpt_path=hf:<folder>) and used as MI scorers (python -m l2m.mi --scorer hf:<folder>)"
    )


def from_hf(path_or_id: str | Path, max_seq_len: int | None = None, name: str | None = None) -> tuple[SequenceModel, dict]:
    """(an l2m model with the folder's weights, its l2m model config). max_seq_len: for GPT's learned
    positions, the context to keep (at most the source's n_positions)."""
    folder = resolve_folder(path_or_id)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a transformers or mamba-ssm model folder")
    source = json.loads(config_path.read_text())
    family = hf_family(source)
    to_config, to_keys = FAMILIES[family]
    config, vocab = to_config(source)
    config["name"] = name or Path(str(path_or_id)).name
    if config["arch"] == "gpt" and max_seq_len is not None:
        if max_seq_len > config["max_seq_len"]:
            raise UserError(f"{path_or_id} has learned positions for {config['max_seq_len']} tokens, fewer than "
                             f"the {max_seq_len} asked for: use data.seq_len <= {config['max_seq_len']}")
        config["max_seq_len"] = max_seq_len
    model = build_model(config, {"kind": "discrete", "vocab_size": vocab})
    weights = _read_weights(folder)
    state = {}
    for ours, theirs, transposed in to_keys(config):
        if theirs not in weights:
            raise UserError(f"{folder}: weight {theirs!r} missing for a {family} model with this config.json")
        tensor = weights[theirs].t() if transposed else weights[theirs]
        target = model.state_dict()[ours]
        if ours == "backbone.wpe.weight":
            tensor = tensor[: target.shape[0]]
        if ours == "encoder.wte.weight" and tensor.shape[0] < target.shape[0]:  # pad rows l2m adds
            tensor = torch.cat([tensor, target[tensor.shape[0]:].to(tensor.dtype)])
        if tensor.shape != target.shape:
            raise UserError(f"{folder}: {theirs} has shape {tuple(tensor.shape)}, the config implies {tuple(target.shape)}")
        state[ours] = tensor.to(target.dtype)
    if config["tie_embeddings"]:
        state["decoder.lm_head.weight"] = state["encoder.wte.weight"]
    model.load_state_dict(state)
    return model.eval(), config


def to_hf(model: SequenceModel, out_dir: str | Path, bos_token_id: int | None = None,
          eos_token_id: int | None = None) -> Path:
    """Write `model` as a transformers folder (config.json + model.safetensors) that
    AutoModelForCausalLM.from_pretrained loads with the same logits; the token ids of its tokenizer's
    BOS and EOS go into the config (generate() starts and stops on them)."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(HF_HINT) from error
    if not hasattr(model.encoder, "vocab_size") or not hasattr(model.decoder, "lm_head"):
        raise UserError("only discrete-token models (text) can be exported; this one reads Gaussian tokens")
    config = model.backbone.config.to_dict()
    vocab = model.encoder.vocab_size
    arch = config["arch"]
    special = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    if arch == "gpt":
        if config["positional"] != "learned" or not config["bias"]:
            raise UserError("GPT2LMHeadModel has learned positions and biases: this GPT (rotary or bias-free) has no "
                             "transformers counterpart")
        if config["window"] is not None:
            raise UserError(f"GPT2LMHeadModel attends to the whole context: this GPT's sliding window of "
                            f"{config['window']} tokens has no transformers counterpart")
        hf_config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=config["max_seq_len"], n_embd=config["d_model"], n_layer=config["n_layer"],
            n_head=config["n_head"], activation_function={"gelu": "gelu", "gelu_tanh": "gelu_new"}[config["activation"]],
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=config["tie_embeddings"], **special)
        hf_model, keys = transformers.GPT2LMHeadModel(hf_config), _gpt2_keys(config)
    elif arch in ("mamba", "mamba2") and config["d_intermediate"]:
        raise UserError(f"transformers' {arch} has no MLP after each mixer: this model's d_intermediate="
                        f"{config['d_intermediate']} has no counterpart")
    elif arch == "mamba":
        if config["norm"] != "rms":
            raise UserError("MambaForCausalLM uses RMSNorm: this model has norm='layer'")
        hf_config = transformers.MambaConfig(
            vocab_size=vocab, hidden_size=config["d_model"], state_size=config["d_state"], num_hidden_layers=config["n_layer"],
            expand=config["expand"], conv_kernel=config["d_conv"], use_bias=config["bias"], use_conv_bias=config["conv_bias"],
            time_step_rank=model.backbone.layers[0].mixer.dt_rank, tie_word_embeddings=config["tie_embeddings"], **special)
        hf_model = transformers.MambaForCausalLM(hf_config)
        keys = _mixer_keys(config, "backbone.", "embeddings.weight", _mixer_params(config))
    elif arch == "mamba2":
        if config["norm"] != "rms":
            raise UserError("Mamba2ForCausalLM uses RMSNorm: this model has norm='layer'")
        hf_config = transformers.Mamba2Config(
            vocab_size=vocab, hidden_size=config["d_model"], state_size=config["d_state"],
            num_hidden_layers=config["n_layer"], expand=config["expand"], head_dim=config["headdim"],
            num_heads=config["expand"] * config["d_model"] // config["headdim"], n_groups=config["ngroups"],
            conv_kernel=config["d_conv"], chunk_size=config["chunk_size"], tie_word_embeddings=config["tie_embeddings"],
            **special)
        hf_model = transformers.Mamba2ForCausalLM(hf_config)
        keys = _mixer_keys(config, "backbone.", "embeddings.weight", _mixer_params(config))
    else:
        raise UserError(f"architecture {arch!r} has no transformers counterpart; exportable: gpt, mamba, mamba2")
    ours = model.state_dict()
    state = {theirs: (ours[mine].t() if transposed else ours[mine]) for mine, theirs, transposed in keys}
    state = {k: (v[:vocab] if k.endswith(("wte.weight", "embeddings.weight")) else v).contiguous() for k, v in state.items()}
    if not config["tie_embeddings"]:
        state["lm_head.weight"] = ours["decoder.lm_head.weight"][:vocab].contiguous()
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config["tie_embeddings"]]
    if missing or unexpected:
        raise RuntimeError(f"export of {arch} left weights unmatched: missing {missing}, unexpected {unexpected}")
    out = Path(out_dir)
    hf_model.to(next(model.parameters()).dtype).save_pretrained(out)
    plain_file_modes(out)
    return out


def plain_file_modes(folder: Path) -> None:
    """Files of `folder` readable as the umask allows (safetensors writes its file 0600, beside 0644 ones)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


class HFCausalLM(torch.nn.Module):
    """Any transformers causal LM behind the part of SequenceModel's interface that evaluation uses:
    losses on a batch of token ids, the history state (the KV cache of GPT-2, GPT-NeoX, Llama-style
    configs: 2·layers·kv_heads·head_dim per token read), and the parameter count."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        c = model.config
        layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
        heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
        hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or (hidden // heads if hidden and heads else None)
        self.kv_per_token = 2 * layers * kv_heads * head_dim if layers and kv_heads and head_dim else None
        self.io = {"kind": "discrete", "vocab_size": model.get_output_embeddings().out_features}

    def losses(self, batch) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]  # (B, L+1): BOS, then the L tokens to predict
        logits = self.model(ids[:, :-1]).logits.float()  # (B, L, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return {"loss": nll.mean(), "nll": nll, "accuracy": (logits.argmax(-1) == ids[:, 1:]).float()}

    def history_state_breakdown(self, n_past: int) -> dict[str, int]:
        """The KV cache after n_past tokens where the config says its shape, else nothing known."""
        return {} if self.kv_per_token is None else {"kv": self.kv_per_token * n_past}

    def history_state_size(self, n_past: int) -> int:
        return sum(self.history_state_breakdown(n_past).values())

    def bound_state_size(self, n_past: int) -> int:
        return self.history_state_size(n_past)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def load_causal_lm(path_or_id: str | Path, max_seq_len: int | None = None) -> torch.nn.Module:
    """A causal LM to evaluate: an l2m model where the family is supported (its history state is
    then exact), else any transformers causal LM wrapped in HFCausalLM."""
    folder = resolve_folder(path_or_id)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a transformers or mamba-ssm model folder")
    try:
        hf_family(json.loads(config_path.read_text()))
    except ValueError:
        try:
            import transformers
        except ImportError as error:
            raise ImportError(HF_HINT) from error
        return HFCausalLM(transformers.AutoModelForCausalLM.from_pretrained(folder).eval())
    return from_hf(folder, max_seq_len=max_seq_len, name=Path(str(path_or_id)).name)[0]
