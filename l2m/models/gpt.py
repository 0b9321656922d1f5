"""GPT-2: pre-LayerNorm blocks of causal self-attention and a 4x GELU MLP (nanoGPT's layout and init).

The backbone maps embedded tokens (B, T, d_model) to final-normed features; token embedding and
LM head live in the io adapters. Positions are learned (GPT-2, at most ``max_seq_len``) or
rotary; `window` makes the attention sliding-window (Mistral's). Its blocks are `Block(attention,
MLP)` of the shared `MixerStack`; checkpoints written before that (keys ``h.<i>.ln_1`` ...) load
under the new names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch.nn as nn

from l2m.models.attention import CausalSelfAttention, check_attention
from l2m.models.config import ModelConfig
from l2m.models.mixer_stack import ACTIVATIONS, MLP, Block, MixerStack, make_norm

POSITIONAL = ("learned", "rotary")


@dataclass(kw_only=True)
class GPTConfig(ModelConfig):
    positive_ints: ClassVar[tuple[str, ...]] = ("n_head", "max_seq_len")

    arch: str = "gpt"
    n_head: int
    window: int | None = None  # sliding window: tokens each token attends to, itself included; null = full
    max_seq_len: int = 1024  # learned positions; build_model sizes it to the run's context length
    positional: str = "learned"  # learned | rotary
    dropout: float = 0.0
    bias: bool = True  # in the linear layers and LayerNorms
    activation: str = "gelu"  # gelu (exact) | gelu_tanh (what GPT-2's weights were trained with)
    init_std: float = 0.02  # std of the linear weights at init (GPT-2's); tiny models learn recall sooner with ~0.08

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def family(self) -> str:
        return "gpt" if self.window is None else "swa"

    def _check(self) -> None:
        super()._check()
        self.choice("positional", POSITIONAL)
        self.choice("activation", tuple(ACTIVATIONS))
        self.positive_number("init_std", "0.02: GPT-2's init")
        check_attention(self)


# Keys of checkpoints written before GPT's blocks were the shared Block(mixer, mlp).
_OLD_KEYS = [(re.compile(r"^h\.(\d+)\.ln_1\."), r"layers.\1.norm."), (re.compile(r"^h\.(\d+)\.attn\."), r"layers.\1.mixer."),
             (re.compile(r"^h\.(\d+)\.ln_2\."), r"layers.\1.norm2."), (re.compile(r"^h\.(\d+)\.mlp\."), r"layers.\1.mlp."),
             (re.compile(r"^ln_f\."), "norm_f.")]


def _rename_old_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for pattern, new in _OLD_KEYS:
            if pattern.match(rest):
                state_dict[prefix + pattern.sub(new, rest)] = state_dict.pop(key)
                break


class GPT(MixerStack):
    """The backbone of a GPTConfig: (B, T, d_model) embedded tokens -> (B, T, d_model)."""

    def __init__(self, config: GPTConfig):
        d, bias = config.d_model, config.bias

        def block() -> Block:
            mlp = MLP(d, 4 * d, bias=bias, activation=config.activation, dropout=config.dropout)
            return Block(CausalSelfAttention(config), make_norm("layer", d, bias), mlp, make_norm("layer", d, bias))

        positions = nn.Embedding(config.max_seq_len, d) if config.positional == "learned" else None
        super().__init__(config, [block() for _ in range(config.n_layer)], make_norm("layer", d, bias), positions,
                         config.dropout)
        self.apply(partial(_init_weights, linear_std=config.init_std, embedding_std=config.embedding_std))
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by 1/sqrt(2 n_layer)
                nn.init.normal_(p, std=config.init_std / math.sqrt(2 * config.n_layer))
        self.register_load_state_dict_pre_hook(_rename_old_keys)


def _init_weights(module: nn.Module, linear_std: float, embedding_std: float) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=linear_std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=embedding_std)
