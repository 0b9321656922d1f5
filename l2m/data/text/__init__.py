"""Natural-language data: documents from hub datasets or local files, tokenizers, a token
cache of sentence-aligned samples, and the Lightning DataModule for the text task."""

from l2m.data.text.cache import SampleCache, open_cache
from l2m.data.text.datamodule import TextDataModule
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
