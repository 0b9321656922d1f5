"""SequenceModel: input adapter -> backbone -> output adapter, for any architecture and token kind.

A backbone maps (B, T, d_model) and an optional state -> (B, T, d_model) including its final norm,
and the state after the T tokens; it offers init_state / step / state_size(n_past) (MixerStack).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn as nn
from torch import Tensor

from l2m.checks import check_int


class SequenceModel(nn.Module):
    """Token model: ``encoder`` (io adapter) -> ``backbone`` -> ``decoder`` (io adapter).

    forward(x): ids (B, T) -> logits (B, T, V), or Gaussian tokens (B, T, D) -> (mean, std).
    step(x_t, state): the same for one token (B,) / (B, D), carrying the backbone's state.
    forward_with_state(x, state): a chunk of tokens read after `state`, and the state after it.
    losses(batch): the output adapter's loss and per-token curves on a batch of BOS + L tokens.
    """

    def __init__(self, encoder: nn.Module, backbone: nn.Module, decoder: nn.Module, name: str | None = None,
                 family: str | None = None):
        super().__init__()
        self.name, self.family = name, family
        self.encoder, self.backbone, self.decoder = encoder, backbone, decoder

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the backbone reads (learned positions), None where unbounded."""
        return getattr(self.backbone, "max_positions", None)

    def forward(self, x: Tensor):
        return self.decoder(self.backbone(self.encoder(x))[0])

    def forward_with_state(self, x: Tensor, state):
        """x (B, T) / (B, T, D) read after `state` (init_state's or a previous call's) -> (outputs, the
        state after x): a long sequence read chunk by chunk equals one pass."""
        h, state = self.backbone(self.encoder(x), state)
        return self.decoder(h), state

    def losses(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{"loss": scalar, "nll": (B, L), and "kl": (B, L) where known}: nats per token, float32."""
        tokens = batch[self.encoder.batch_key]  # (B, L+1, ...): BOS, then the L tokens to predict
        return self.decoder.losses(self(tokens[:, :-1]), batch)

    def init_state(self, batch: int, device=None, dtype=None):
        p = next(self.parameters())
        return self.backbone.init_state(batch, device or p.device, dtype or p.dtype)

    def step(self, x: Tensor, state):
        h, state = self.backbone.step(self.encoder(x), state)
        return self.decoder(h), state

    def history_state_breakdown(self, n_past: int) -> dict[str, int]:
        """Scalars of history state per sequence after reading n_past tokens, by part
        ("kv" for attention, "ssm" and "conv" for SSMs)."""
        return self.backbone.state_size(check_int("n_past", n_past, 0))

    @property
    def receptive_field(self) -> int | None:
        """Tokens back its output can depend on, itself included: n_layer·(window − 1) + 1 for
        sliding-window attention; None (all) where any layer's state carries the whole past."""
        fields = [getattr(layer.mixer, "receptive_field", None) for layer in getattr(self.backbone, "layers", ())]
        if not fields or None in fields:
            return None
        return sum(f - 1 for f in fields) + 1

    def history_state_size(self, n_past: int) -> int:
        """dim(z): total scalars the step state holds after n_past tokens (batch 1)."""
        return sum(self.history_state_breakdown(n_past).values())

    def bound_state_size(self, n_past: int) -> int:
        """The part of dim(z) the capacity bound counts (the paper's Fig. 3c): every part but the
        short-convolution window, i.e. the KV cache of attention or the recurrent SSM state."""
        return sum(n for part, n in self.history_state_breakdown(n_past).items() if part != "conv")

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token at context seq_len: 2 per multiply-add of every linear layer (the
        blocks' projections and MLPs, the adapters, the LM head), plus what the backbone computes besides
        (attention over the context, convolutions, scans: its `extra_flops_per_token`). A training step
        costs 3x: forward and backward."""
        linear = sum(module.weight.numel() for module in self.modules() if isinstance(module, nn.Linear))
        return 2 * linear + self.backbone.extra_flops_per_token(seq_len)

    def num_params(self) -> int:
        """Trainable parameters, tied weights counted once."""
        return sum(p.numel() for p in self.parameters())
