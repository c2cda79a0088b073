"""Where a sentence ends, one rule for the engines (stop generating after N sentences) and the parsers
(publish whole sentences only).

A sentence ends at `.`, `!` or `?` (optionally followed by closing quotes or brackets) that is followed
by white space, and at a line break after a line with text: a small model asked for "one or two
sentences" that answers with a list ("Title: ...\nGenre: ...") has written its units one per line. Not an end: an initial or a one-letter abbreviation ("John C. Reilly", "U.S. Army"), a
common title or abbreviation ("Mr.", "Dr.", "vs.", "e.g."), a decimal point ("1.5") or an ellipsis. The
white space is required, so while an answer is being written its last "sentence" only counts once the
next word has started: "directed by John C." is not yet known to be complete.
"""

from __future__ import annotations

import re

__all__ = ["cut_after_sentences", "sentence_end_offsets", "split_sentences"]

_CANDIDATE = re.compile(r"[.!?][\"'\u2019\u201d)\]]*(?=\s)|[^\S\n]*\n")
# lower-cased words before a "." that do not end a sentence
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "no", "vol", "ed", "eds", "inc", "ltd",
    "co", "corp", "dept", "fig", "approx", "e.g", "i.e", "ca", "mt", "ft", "gen", "col", "lt", "sgt", "rev",
})


def sentence_end_offsets(text: str) -> list[int]:
    """Offsets just after each complete sentence's terminator (and closing quotes/brackets)."""
    ends: list[int] = []
    for m in _CANDIDATE.finditer(text):
        if text[m.start()] not in ".!?":  # a line break: it ends a sentence if one is open
            if text[ends[-1] if ends else 0:m.start()].strip():
                ends.append(m.start())
            continue
        if text[m.start()] == ".":
            if m.start() > 0 and text[m.start() - 1] == ".":
                continue  # an ellipsis
            word = text[:m.start()].rsplit(None, 1)[-1] if text[:m.start()].strip() else ""
            word = word.lstrip("\"'(\u201c\u2018[")
            if len(word) == 1 and word.isalpha():
                continue  # an initial: "C." in "John C. Reilly"
            if word.lower() in _ABBREVIATIONS or (len(word) >= 3 and word[-2] == "." and word[-1].isalpha()):
                continue  # "Dr.", "e.g.", "U.S."
        ends.append(m.end())
    return ends


def split_sentences(text: str) -> tuple[list[str], str]:
    """(complete sentences, the unfinished rest), each with its white space collapsed. A text ending
    on a terminator counts its last sentence as complete; a last line without one does not."""
    ends = sentence_end_offsets(text.rstrip() + " ") if text.strip() else []
    sentences, start = [], 0
    for end in ends:
        sentence = " ".join(text[start:end].split())
        if sentence:
            sentences.append(sentence)
        start = end
    return sentences, " ".join(text[start:].split())


def cut_after_sentences(text: str, limit: int) -> str | None:
    """The text up to the end of its `limit`-th complete sentence, or None while it has fewer."""
    ends = sentence_end_offsets(text)
    return text[:ends[limit - 1]] if len(ends) >= limit else None
