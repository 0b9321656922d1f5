"""An offline, regex-based sentence splitter (no model downloads).

A sentence ends at terminal punctuation (. ! ? … and the Arabic and Devanagari ؟ । ॥, optionally
followed by closing quotes or brackets) that is followed by whitespace and then something that can
open a sentence (an upper-case letter, a letter of a script without case, a digit, an opening quote
or bracket). Common abbreviations ("Mr.", "e.g.") and initials ("J. Smith") do not end a sentence.
The CJK full stops 。！？ end a sentence with or without whitespace after them. A blank line
(paragraph break) always does, so headings without punctuation become sentences of their own.
"""

from __future__ import annotations

import re

_CJK_STOPS = "。！？‼⁇"
_BOUNDARY = re.compile(rf"""[.!?…؟।॥]+["'’”)\]]*\s+|[{_CJK_STOPS}]+["'’”」』）)\]]*\s*|\n[ \t]*\n\s*""")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_LAST_WORD = re.compile(r"([\w.]+)\.$")
_OPENERS = "\"'“‘([_"
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st prof sr jr vs etc e.g i.e cf no vol ch fig mt capt col gen lt rev gov sgt"
    " messrs mme mlle ft jan feb aug sept oct nov dec".split()
)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """[(start, end)] character spans of the sentences of `text`, in order.

    text[start] is the sentence's first non-space character and text[start:end] ends with its
    terminal punctuation (closing quotes included); the whitespace between sentences belongs
    to neither.
    """
    first = len(text) - len(text.lstrip())
    if first == len(text):
        return []
    starts, ends = [first], []
    for m in _BOUNDARY.finditer(text, first):
        if m.end() == len(text) or not _is_boundary(text, m):
            continue
        ends.append(m.start() + len(m.group().rstrip()))
        starts.append(m.end())
    ends.append(len(text.rstrip()))
    return list(zip(starts, ends))


def _is_boundary(text: str, m: re.Match) -> bool:
    if _PARAGRAPH.search(m.group()) or m.group()[0] in _CJK_STOPS:
        return True
    nxt = text[m.end()]
    caseless_letter = nxt.isalpha() and nxt.lower() == nxt.upper()  # CJK, Arabic, Devanagari, ...
    if not (nxt.isupper() or caseless_letter or nxt.isdigit() or nxt in _OPENERS):
        return False
    if not m.group().startswith(".") or m.group().startswith(".."):
        return True  # "!", "?" and ellipses are not abbreviations
    word = _LAST_WORD.search(text, max(0, m.start() - 12), m.start() + 1)
    if word is None:
        return True
    w = word.group(1)
    return not (w.lower() in _ABBREVIATIONS or (len(w) == 1 and w.isupper()))
