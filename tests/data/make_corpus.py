"""Regenerate tests/data/corpus/: a small synthetic English-like corpus written for l2m's tests.

Every text is produced here from the word lists below (no third-party text), so the corpus is
free to ship. It has what the text pipeline must handle: paragraphs and headings, questions and
exclamations, quotations, abbreviations ("Mr.", "Dr.") and initials that do not end a
sentence, numbers, non-ASCII characters, and a few documents too short for one sample.
Run: python tests/data/make_corpus.py
"""

import random
from pathlib import Path

NAMES = ["Mr. Hale", "Dr. Moreau", "Mrs. Alden", "Captain Reyes", "J. R. Tolland", "Élise", "old Tomas",
         "the miller", "the schoolmistress", "Prof. Lindqvist", "young Ada", "the ferryman"]
PLACES = ["the harbour", "the orchard", "St. Clement's church", "the lighthouse", "the market square",
          "the mill by the river", "the north road", "the library", "the station café", "the salt marsh"]
THINGS = ["a brass compass", "the letter", "an old map", "the lantern", "a basket of pears", "the ledger",
          "a torn umbrella", "the violin", "three silver coins", "the clockwork bird"]
VERBS = ["found", "carried", "hid", "mended", "sold", "forgot", "painted", "weighed", "returned", "examined"]
ADJS = ["quiet", "grey", "restless", "bright", "narrow", "cold", "golden", "crooked", "patient", "windy"]
TIMES = ["At dawn", "Late that evening", "On the 3rd of March", "Before the storm", "After supper",
         "In 1887", "By noon", "Some weeks later", "That winter", "Around 4 o'clock"]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def sentence(rng: random.Random) -> str:
    n, p, t, v, a = (rng.choice(x) for x in (NAMES, PLACES, THINGS, VERBS, ADJS))
    forms = [
        lambda: f"{rng.choice(TIMES)}, {n} {v} {t} near {p}.",
        lambda: f"The {a} light fell across {p}, and nobody spoke for a while.",
        lambda: f"\u201cWhere did you leave {t}?\u201d asked {n}.",
        lambda: f"Was it really {rng.randint(2, 99)} years since {n} had last seen {p}?",
        lambda: f"{cap(n)} {v} {t} — twice, to be sure — and then laughed!",
        lambda: f"It was {a}, {rng.choice(ADJS)} and rather {rng.choice(ADJS)}; the kind of day {n} liked.",
        lambda: f"\u201cI {v} it,\u201d said {n}. \u201cAsk anyone at {p}.\u201d",
        lambda: f"Nobody knew why {t} had been {v} at {p} (not even {rng.choice(NAMES)}).",
        lambda: f"{cap(n)} counted {rng.randint(3, 400)} steps from {p} to the gate.",
        lambda: f"There were {rng.randint(2, 12)} windows, e.g. the {a} one above the door, and all were open.",
    ]
    return rng.choice(forms)()


def document(rng: random.Random, paragraphs: int) -> str:
    parts = [f"CHAPTER {rng.randint(1, 30)}"]
    for _ in range(paragraphs):
        parts.append(" ".join(sentence(rng) for _ in range(rng.randint(3, 9))))
    return "\n\n".join(parts) + "\n"


def main() -> None:
    rng = random.Random(2503)
    out = Path(__file__).parent / "corpus"
    out.mkdir(exist_ok=True)
    for i in range(30):
        (out / f"book_{i:02d}.txt").write_text(document(rng, rng.randint(3, 10)), encoding="utf-8")
    for i in range(3):  # too short for any sample of 64 tokens or more
        (out / f"note_{i}.txt").write_text(sentence(rng) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
