"""Tokenizers: an offline byte-level one that always works, and any Hugging Face tokenizer.

Both expose the same small interface (name, vocab_size, bos_id, eos_id, encode, decode) plus
`encode_offsets`, which also returns each token's character offset so that samples can start
exactly at a sentence boundary, and `fingerprint`, which keys the token cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from l2m.checks import UserError
from l2m.data.text.hub import hub_offline, hub_reachable, looks_like_local_path

DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"
_BOS_CANDIDATES = ("<|endoftext|>", "<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then BOS = 256 and EOS = 257 (vocab_size 258)."""

    name = "byte"
    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(ids, char_starts)] per text; char_starts[t] = index of the character token t belongs to."""
        out = []
        for text in texts:
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            starts_char = (ids & 0xC0) != 0x80  # UTF-8 continuation bytes are 10xxxxxx
            out.append((ids.astype(np.int64), np.cumsum(starts_char) - 1))
        return out

    def fingerprint(self) -> str:
        return "byte-v1"

    def backend(self):
        """The same tokenizer as a `tokenizers.Tokenizer` (what a transformers folder holds): byte-level
        BPE without merges, so that every UTF-8 byte is its own token with its own id."""
        from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

        vocab = {char: byte for byte, char in _byte_characters().items()}
        backend = Backend(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(["<bos>", "<eos>"])  # ids 256, 257
        return backend


def _byte_characters() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (printable Latin-1 bytes as
    themselves, the others as characters from U+0100 on), as tokenizers' ByteLevel pre-tokenizer maps them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + n) for n, byte in enumerate(others)}}


class HFTokenizer:
    """A `tokenizers.Tokenizer` (fast Hugging Face tokenizer) behind the common interface."""

    def __init__(self, name: str, backend, bos_token: str | None = None, eos_token: str | None = None):
        self.name = name
        self._tok = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id(bos_token, _BOS_CANDIDATES, "bos_token")
        self.eos_id = self._special_id(eos_token, _EOS_CANDIDATES, "eos_token")

    def backend(self):
        """The `tokenizers.Tokenizer` behind it."""
        return self._tok

    def _special_id(self, token: str | None, candidates: tuple[str, ...], arg: str) -> int:
        for t in [token] if token is not None else candidates:
            i = self._tok.token_to_id(t)
            if i is not None:
                return i
        raise UserError(
            f"tokenizer {self.name!r} has no {arg}: tried {[token] if token else list(candidates)}; "
            f"pass {arg}= with one of its special tokens"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)  # parallel in Rust
        return [
            (np.asarray(e.ids, dtype=np.int64), np.asarray([o[0] for o in e.offsets], dtype=np.int64))
            for e in encodings
        ]

    def fingerprint(self) -> str:
        return hashlib.sha1(self._tok.to_str().encode()).hexdigest()[:16]


Tokenizer = ByteTokenizer | HFTokenizer


def get_tokenizer(name: str = DEFAULT_TOKENIZER, bos_token: str | None = None, eos_token: str | None = None) -> Tokenizer:
    """"byte", a local tokenizer (a tokenizer.json file or a folder holding one, or a
    transformers folder), or a Hugging Face hub id such as "EleutherAI/gpt-neox-20b"."""
    if name == "byte":
        return ByteTokenizer()
    path = Path(name).expanduser()
    if path.exists():
        return HFTokenizer(name, _load_local(path), bos_token, eos_token)
    if looks_like_local_path(name, (".json",)):
        raise FileNotFoundError(f"tokenizer={name!r}: no such file or folder (from {Path.cwd()}); give a tokenizer.json "
                                "or a folder holding one, byte, or a hub id like EleutherAI/gpt-neox-20b")
    return HFTokenizer(name, _load_hub(name), bos_token, eos_token)


def _load_hub(name: str):
    from huggingface_hub import hf_hub_download
    from tokenizers import Tokenizer as Backend

    def unavailable(reason: str) -> ConnectionError:
        return ConnectionError(
            f"tokenizer={name!r} could not be loaded from the Hugging Face hub: {reason}. Offline, "
            f"use tokenizer=byte, or the path of a local tokenizer.json or tokenizer folder."
        )

    try:  # a copy in the local Hugging Face cache needs no network
        return Backend.from_file(hf_hub_download(name, "tokenizer.json", local_files_only=True))
    except ValueError as e:  # malformed repo id
        raise unavailable(str(e)) from e
    except OSError:
        pass
    if hub_offline() or not hub_reachable():
        raise unavailable("it is not in the local cache and the hub cannot be reached (no network?)")
    try:
        return Backend.from_file(hf_hub_download(name, "tokenizer.json"))
    except OSError as e:
        raise unavailable(f"{type(e).__name__}: {e}") from e


def _load_local(path: Path):
    from tokenizers import Tokenizer as Backend

    file = path / "tokenizer.json" if path.is_dir() else path
    if file.is_file() and file.suffix == ".json":
        return Backend.from_file(str(file))
    try:  # e.g. a sentencepiece-only folder: transformers converts it to a fast tokenizer
        from transformers import AutoTokenizer
    except ImportError as e:
        raise UserError(
            f"tokenizer={str(path)!r} holds no tokenizer.json; install transformers (pip install "
            f"'l2m[hf]') to load other tokenizer formats"
        ) from e
    return AutoTokenizer.from_pretrained(str(path), use_fast=True).backend_tokenizer


def check_vocab(tokenizer_vocab_size: int, model_vocab_size: int, tokenizer_name: str = "tokenizer") -> None:
    """Raise ValueError unless every token id of the tokenizer is a valid model input/output."""
    if tokenizer_vocab_size > model_vocab_size:
        raise UserError(
            f"{tokenizer_name} has {tokenizer_vocab_size} tokens but the model's vocabulary holds "
            f"{model_vocab_size}: use the tokenizer the model was trained with, or a model with "
            f"vocab_size >= {tokenizer_vocab_size}"
        )
