"""Where documents come from: local files (offline) or a Hugging Face hub dataset.

`load_documents` yields plain strings, one per document (a book, an article, a file).
Everything downstream (sentence splitting, tokenization, the cache) only sees strings.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from l2m.checks import UserError
from l2m.data.text.hub import hub_offline, hub_reachable, looks_like_local_path

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Share of a document's characters that may be undecodable (U+FFFD) before the source gets a warning.
REPLACED_WARNING = 0.001
log = logging.getLogger(__name__)
# Hub datasets published as loading scripts, which datasets >= 4 refuses, and their data-only mirrors.
PARQUET_MIRRORS = {"deepmind/pg19": "emozilla/pg19"}


class SourceUnavailableError(ConnectionError):
    """A hub dataset could not be reached or loaded; the message names the offline alternative."""


def load_documents(
    source: str,
    split: str = "train",
    text_column: str = "text",
    subset: str | None = None,
    streaming: bool = True,
    max_documents: int | None = None,
    encoding: str = "utf-8",
) -> Iterator[str]:
    """Yield the documents of `source` as strings, in a fixed order.

    source: a local path — a folder (searched recursively for .txt, .jsonl, .parquet files,
        sorted by path), a .txt file (one document), a .jsonl file (one JSON object per line)
        or a .parquet file — or a hub dataset id such as "emozilla/pg19" (PG19 as parquet;
        "deepmind/pg19" is a loading script that datasets >= 4 refuses) or
        "wikimedia/wikipedia" (with subset="20231101.en").
    split: the hub split (ignored for local files).
    text_column: the field holding the text (.jsonl, .parquet, hub datasets).
    subset: the hub dataset's configuration name (datasets' `name`), e.g. "20231101.en".
    streaming: stream hub datasets instead of downloading them whole first.
    max_documents: stop after this many documents (None = all).
    encoding: of local .txt and .jsonl files. Bytes it cannot decode become U+FFFD; a source where
        they pass REPLACED_WARNING of a document's characters ends with a warning naming the option,
        and files with NUL bytes (binary, not text) are skipped with a count.
    """
    if max_documents is not None and max_documents < 1:
        raise UserError(f"max_documents must be >= 1 or None, got {max_documents}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise UserError(f"encoding={encoding!r} is not a text encoding Python knows (e.g. utf-8, latin-1, cp1252)") from None
    path = Path(source).expanduser()
    if path.exists():
        docs = _local_documents(path, text_column, encoding)
    elif looks_like_local_path(source, LOCAL_SUFFIXES):
        raise FileNotFoundError(
            f"source={source!r}: no such file or folder. Give a folder of .txt files, a .txt, "
            f".jsonl or .parquet file, or a hub dataset id like 'emozilla/pg19'."
        )
    else:
        docs = _hub_documents(source, split, text_column, subset, streaming)
    yield from islice(docs, max_documents)


def source_fingerprint(source: str, split: str, text_column: str, subset: str | None) -> str:
    """A short hash that changes when the documents `load_documents` would yield change.

    Local files: path, size and modification time of every file. Hub: id, subset and split.
    """
    path = Path(source).expanduser()
    if path.exists():
        parts = [str(path.resolve()), text_column]
        for f in _local_files(path):
            st = f.stat()
            parts.append(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}")
    else:
        parts = ["hub", source, str(subset), split, text_column]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"source={str(path)!r}: unsupported file type; use one of {LOCAL_SUFFIXES}")
        return [path]
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in LOCAL_SUFFIXES)
    if not files:
        raise UserError(f"source={str(path)!r}: the folder holds no {', '.join(LOCAL_SUFFIXES)} files")
    return files


def _is_binary(f: Path) -> bool:
    with f.open("rb") as file:
        return b"\0" in file.read(8192)


def _file_documents(f: Path, text_column: str, encoding: str) -> Iterable[str]:
    if f.suffix == ".txt":
        return [f.read_text(encoding=encoding, errors="replace")]
    if f.suffix == ".jsonl":
        return _jsonl_documents(f, text_column, encoding)
    return _parquet_documents(f, text_column)


def _local_documents(path: Path, text_column: str, encoding: str) -> Iterator[str]:
    binary, damaged = [], {}
    for f in _local_files(path):
        if f.suffix != ".parquet" and _is_binary(f):
            binary.append(f.name)
            continue
        for text in _file_documents(f, text_column, encoding):
            replaced = text.count("\ufffd") / max(1, len(text))
            if replaced > REPLACED_WARNING:
                damaged[f.name] = max(replaced, damaged.get(f.name, 0.0))
            yield text
    if damaged:
        worst = max(damaged, key=damaged.get)
        log.warning(f"source={str(path)!r}: {len(damaged)} file(s) hold bytes that are not {encoding} (up to "
                    f"{damaged[worst]:.1%} of a document's characters, in {worst}); they were read as U+FFFD. Give "
                    f"the files' encoding: data.encoding=latin-1 (or cp1252, ...)")
    if binary:
        log.warning(f"source={str(path)!r}: skipped {len(binary)} binary file(s) (NUL bytes, not text): "
                    f"{', '.join(binary[:5])}{' ...' if len(binary) > 5 else ''}")


def _jsonl_documents(f: Path, text_column: str, encoding: str) -> Iterator[str]:
    with f.open(encoding=encoding, errors="replace") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{f}:{lineno}: not valid JSON ({error.msg}, column {error.colno}); a .jsonl file "
                                 "holds one JSON object per line") from None
            if not isinstance(record, dict):
                raise UserError(f"{f}:{lineno}: a JSON {type(record).__name__}, not an object with a "
                                 f"{text_column!r} field")
            if text_column not in record:
                raise UserError(
                    f"{f}:{lineno}: no field text_column={text_column!r}; fields are {sorted(record)}"
                )
            yield record[text_column]


def _parquet_documents(f: Path, text_column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(f)
    if text_column not in table.schema_arrow.names:
        raise UserError(f"{f}: no column text_column={text_column!r}; columns are {table.schema_arrow.names}")
    for batch in table.iter_batches(columns=[text_column], batch_size=256):
        yield from batch.column(0).to_pylist()


def _hub_documents(
    source: str, split: str, text_column: str, subset: str | None, streaming: bool
) -> Iterator[str]:
    import datasets

    def unavailable(reason: str) -> SourceUnavailableError:
        return SourceUnavailableError(
            f"source={source!r}: no such local file or folder (from {Path.cwd()}), and as a hub dataset "
            f"(subset={subset!r}, split={split!r}) it is not available: {reason}. "
            f"Offline, point source= at local files instead: a folder of .txt files, or a .jsonl / "
            f".parquet file with a {text_column!r} field (e.g. data.source=tests/data/corpus). "
            f"A copy already in the Hugging Face cache loads with HF_HUB_OFFLINE=1."
        )

    # In offline mode datasets never touches the network (it reads its cache), so no probe.
    if not hub_offline() and not hub_reachable():
        raise unavailable("the Hugging Face hub cannot be reached (no network?)")
    try:
        ds = datasets.load_dataset(source, subset, split=split, streaming=streaming)
    except RuntimeError as e:  # "Dataset scripts are no longer supported"
        mirror = PARQUET_MIRRORS.get(source, "a parquet mirror of it")
        raise unavailable(f"{e}; use {mirror} instead") from e
    except (OSError, ValueError) as e:  # network, missing dataset, unknown subset or split
        raise unavailable(f"{type(e).__name__}: {e}") from e
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise UserError(f"hub dataset {source!r} has no column text_column={text_column!r}; columns are {columns}")
    for record in ds:
        yield record[text_column]
