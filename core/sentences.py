"""Where a sentence ends, one rule for the engines (stop generating after N sentences) and the parsers
(publish whole sentences only).

A sentence ends at `.`, `!` or `?` (optionally followed by closing quotes or brackets) that is followed
by white space, and at a line break after a line with text: a small model asked for "one or two
sentences" that answers with a list ("Title: ...\nGenre: ...") has written its units one per line. Not an end: an initial or a one-letter abbreviation ("John C. Reilly", "U.S. Army"), a
common title or abbreviation ("Mr.", "Dr.", "vs.", "e.g."), a decimal point ("1.5"), an ellipsis, or a
"!" or "?" followed by a lower-case word: a title's own ("That Darn Cat! is a 1997 film"). The
white space is required, so while an answer is being written its last "sentence" only counts once the
next word has started: "directed by John C." is not yet known to be complete.

A small model also loops inside one sentence ("Horror, Horror, Horror, ..."): `repeated_run` finds a
phrase of up to six words said four times in a row, so the engine can stop there and the answer
becomes a dead letter instead of running to its token cap and being published.
"""

from __future__ import annotations

import re

__all__ = ["LOOP_REPEATS", "cut_after_sentences", "repeated_run", "sentence_end_offsets", "split_sentences"]

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
        elif text[m.end():].lstrip()[:1].islower():
            continue  # "Airplane! is a 1980 comedy": the title's "!", not the sentence's
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


# A phrase of 1-6 words said this many times in a row, separated by nothing but white space or
# punctuation, is a loop: "very, very good" is language, the fourth "Horror," is not.
LOOP_REPEATS = 4
_LOOP = re.compile(r"(?<!\w)(\w[\w'-]*(?:\W+\w[\w'-]*){0,5}?)(?:[\s,;:/&+-]+\1(?!\w)){%d,}" % (LOOP_REPEATS - 1),
                   re.IGNORECASE)


def repeated_run(text: str) -> str | None:
    """The phrase a text says LOOP_REPEATS or more times in a row, or None."""
    m = _LOOP.search(text)
    return m.group(1) if m else None
