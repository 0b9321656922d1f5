"""Natural-language data: documents from hub datasets or local files, tokenizers, a token
cache of sentence-aligned samples, and the Lightning DataModule for the text task.

The DataModule is imported on first use (`l2m.data.text.TextDataModule`), so that the tokenizers and the
cache, which the MI estimators use too, never pull in Lightning.
"""

from l2m.data.text.cache import SampleCache, open_cache
from l2m.data.text.sentences import sentence_spans
from l2m.data.text.documents import SourceUnavailableError, load_documents
from l2m.data.text.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, check_vocab, get_tokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "SampleCache",
    "SourceUnavailableError",
    "TextDataModule",
    "Tokenizer",
    "check_vocab",
    "get_tokenizer",
    "load_documents",
    "open_cache",
    "sentence_spans",
]


def __getattr__(name: str):
    if name == "TextDataModule":
        from l2m.data.text.datamodule import TextDataModule

        return TextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
