"""Scorers: per-token log q(w_i | BOS, w_<i) of a causal model q for a batch of token sequences.

A scorer maps (B, T) int64 ids → (B, T) float64 log-probabilities, scoring the batch in chunks of
`batch_size` sequences, and counts the sequences ("forward passes"), tokens and seconds it spent.
Implementations: any model mapping ids to logits (`ModelScorer`, built from an l2m checkpoint or
a Hugging Face causal LM), and the exact synthetic sources (`ExactScorer`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from l2m.checks import UserError


class Scorer:
    """Base class: validation, batching and pass counting around `_score`."""

    vocab_size: int
    bos_id: int
    max_len: int | None = None  # longest sequence (excluding BOS) the model can score
    progress: Callable | None = None  # wraps the iterable of batches of a call, e.g. a tqdm bar

    def __init__(self, batch_size: int = 8):
        if batch_size < 1:
            raise UserError(f"batch_size must be ≥ 1, got {batch_size}")
        self.batch_size = batch_size
        self.sequences = 0
        self.tokens = 0
        self.seconds = 0.0

    def __call__(self, tokens) -> torch.Tensor:
        tokens = torch.as_tensor(tokens)
        if tokens.ndim != 2 or tokens.shape[1] == 0 or tokens.dtype.is_floating_point:
            raise UserError(f"tokens must be a (B, T) integer tensor with T ≥ 1, got {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise UserError(f"token ids must lie in [0, {self.vocab_size}) (the scorer's vocabulary)")
        if self.max_len is not None and tokens.shape[1] > self.max_len:
            raise UserError(
                f"sequences of {tokens.shape[1]} tokens exceed the scorer's context of {self.max_len}; "
                "use smaller splits (--max-split) or a longer-context model"
            )
        start = time.perf_counter()
        chunks = tokens.split(self.batch_size)
        with torch.inference_mode():
            out = torch.cat([self._score(chunk.long()) for chunk in (self.progress or iter)(chunks)])
        self.seconds += time.perf_counter() - start
        self.sequences += tokens.shape[0]
        self.tokens += tokens.numel()
        return out

    def _score(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"type": type(self).__name__, "vocab_size": self.vocab_size, "bos_id": self.bos_id}


class ExactScorer(Scorer):
    """The true conditionals of a synthetic source (`l2m.mi.synthetic`); the sequence start plays BOS."""

    def __init__(self, source, batch_size: int = 4096):
        super().__init__(batch_size)
        self.source = source
        self.vocab_size = source.vocab_size
        self.bos_id = source.vocab_size  # outside the alphabet: never fed, only named

    def _score(self, tokens):
        return self.source.log_prob(tokens)


class ModelScorer(Scorer):
    """Scores with a causal model `logits_fn(ids (B, T)) -> logits (B, T, V')`, V' ≥ vocab_size."""

    def __init__(
        self,
        logits_fn: Callable[[torch.Tensor], torch.Tensor],
        vocab_size: int,
        bos_id: int,
        max_len: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        name: str = "",
    ):
        super().__init__(batch_size)
        if not 0 <= bos_id < vocab_size:
            raise UserError(f"bos_id must lie in [0, {vocab_size}), got {bos_id}")
        self.logits_fn = logits_fn
        self.vocab_size, self.bos_id, self.max_len = vocab_size, bos_id, max_len
        self.device = torch.device(device)
        self.name = name
        self.tokenizer = None  # the tokenizer the scorer was built for, when known

    def _score(self, tokens):
        tokens = tokens.to(self.device)
        bos = torch.full_like(tokens[:, :1], self.bos_id)
        logits = self.logits_fn(torch.cat([bos, tokens[:, :-1]], dim=1)).float()  # (b, T, V')
        picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return (picked - torch.logsumexp(logits, dim=-1)).double().cpu()

    def describe(self) -> dict:
        return {**super().describe(), "name": self.name, "max_len": self.max_len}


def load_checkpoint_scorer(path: str, tokenizer=None, device: str = "cpu", batch_size: int = 8) -> ModelScorer:
    """Scorer from an l2m training checkpoint (`l2m.models.load_checkpoint`) of a text model.

    tokenizer: a Tokenizer or name (`l2m.data.text.get_tokenizer`) giving BOS; default: the one
    recorded in the checkpoint's data config. The chosen tokenizer is kept as `scorer.tokenizer`.
    """
    from l2m.data.text import get_tokenizer  # Lightning only here, never at l2m.mi import time
    from l2m.models import load_checkpoint

    checkpoint = load_checkpoint(path)
    io = dict(checkpoint.hparams["io"])
    if io.get("kind") != "discrete":
        raise UserError(f"{path} was trained on {io.get('kind')} tokens ({io}); the MI of text needs a model trained "
                         "on text: a text run's checkpoint (data=text...), or hf:<model>")
    if tokenizer is None:
        tokenizer = (checkpoint.hparams.get("data") or {}).get("tokenizer")
        if tokenizer is None:
            raise UserError(f"{path} records no tokenizer: pass the one the model was trained with (e.g. byte)")
    if isinstance(tokenizer, str):
        tokenizer = get_tokenizer(tokenizer)
    model = checkpoint.model.to(device)
    scorer = ModelScorer(model, int(io["vocab_size"]), tokenizer.bos_id, model.max_positions, device, batch_size,
                         name=path)
    check_tokenizer(tokenizer, scorer)
    scorer.tokenizer = tokenizer
    return scorer


def load_hf_scorer(name: str, device: str = "cpu", batch_size: int = 8, dtype: str = "float32") -> ModelScorer:
    """Scorer from a Hugging Face causal LM (hub id or local weights directory)."""
    try:
        import transformers
        from packaging.version import Version
    except ImportError as err:
        raise ImportError("Hugging Face scorers need transformers: pip install 'l2m[hf]'") from err
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    from l2m.models.hf import resolve_folder

    dtype_arg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"  # renamed
    folder = resolve_folder(name)  # one clear error for a mistyped folder or an unreachable hub id
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **{dtype_arg: getattr(torch, dtype)})
    model = model.to(device).eval()
    config = model.config
    bos = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    if bos is None:
        raise UserError(f"{name} defines neither bos_token_id nor eos_token_id; cannot score after BOS")
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    vocab = model.get_output_embeddings().out_features
    return ModelScorer(lambda ids: model(ids).logits, vocab, int(bos), max_len and max_len - 1, device, batch_size, name)


def check_tokenizer(tokenizer, scorer: Scorer) -> None:
    """Refuse a tokenizer whose vocabulary cannot be the scorer's.

    Models pad their embedding tables (GPT-NeoX: 50,277 tokens, 50,432 rows; Qwen2: 151,665 and
    151,936), so the scorer may exceed the tokenizer up to the next multiple of 256 or by 1 %,
    whichever is larger; anything else is a mismatch.
    """
    v_tok, v_model = int(tokenizer.vocab_size), int(scorer.vocab_size)
    padded = max(-(-v_tok // 256) * 256, int(v_tok * 1.01))
    if not v_tok <= v_model <= padded:
        raise UserError(
            f"tokenizer {getattr(tokenizer, 'name', tokenizer)!r} has {v_tok} tokens but the scorer's vocabulary "
            f"has {v_model}: use the tokenizer the model was trained with"
        )
