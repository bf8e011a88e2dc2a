"""Caption normalisation: fewer, cleaner questions for the LLM.

Pure functions that split a caption into sentences (never inside double quotes), turn its numbers
into a template, and combine the sentences' answers (:func:`combine_max`); why: docs/ANNOTATOR.md,
"Normalisation".
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable

from oni_sys.envs.captions import normalise_caption

logger = logging.getLogger(__name__)

#: words that end with a full stop without ending a sentence (compared case-insensitively)
ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "mt", "vs", "etc", "e.g", "i.e", "lt"}
)

# a number: digits with optional decimal / thousands groups ("3", "1,000", "3.6")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
NUMBER_PLACEHOLDER = "<n>"


#: Strip and turn every run of whitespace (newlines and tabs too) into one space: the same
#: normalisation caption ids are computed on.
collapse_whitespace = normalise_caption


def _ends_with_abbreviation(text: str) -> bool:
    """Whether ``text`` (ending in '.') ends with an abbreviation or a single-letter initial."""
    words = text[:-1].split()
    word = words[-1].lstrip("(\"'") if words else ""
    if len(word) == 1 and word.isalpha() and word.isupper():
        return True  # an initial: "J. R. R. Tolkien"
    return word.lower() in ABBREVIATIONS


def split_sentences(text: str) -> list[str]:
    """Split a message into sentences, each with collapsed whitespace.

    A sentence ends at ``.``, ``!`` or ``?`` (optionally followed by a closing quote or bracket)
    followed by whitespace and then a capital letter, digit, ``$`` or opening quote. Not split:
    inside double quotes, after an ellipsis ("...") unless two or more spaces follow (NetHack's
    separator between messages), and after abbreviations such as "Mr." or initials.

    >>> split_sentences("You kill the newt!  You see here a newt corpse.")
    ['You kill the newt!', 'You see here a newt corpse.']
    """
    sentences: list[str] = []
    start = 0
    in_quote = False
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            in_quote = not in_quote
            # a quotation that ends a sentence: 'You read: "Hello!"  You feel better.'
            if in_quote or i == 0 or text[i - 1] not in ".!?":
                i += 1
                continue
            j = i + 1
            punct = text[start:i].rstrip()[-3:]
        elif in_quote or ch not in ".!?":
            i += 1
            continue
        else:
            # the end of a run of terminal punctuation, then closing quotes/brackets
            j = i
            while j < n and text[j] in ".!?":
                j += 1
            punct = text[i:j]
            while j < n and text[j] in "')]":
                j += 1
        k = j
        while k < n and text[k].isspace():
            k += 1
        gap = k - j
        if gap == 0 or k == n:
            i = j
            continue
        nxt = text[k]
        if not (nxt.isupper() or nxt.isdigit() or nxt in "$\"'("):
            i = j
            continue
        if gap < 2 and (
            punct.endswith("..") or (punct == "." and _ends_with_abbreviation(text[start : i + 1]))
        ):
            i = j
            continue
        sentence = collapse_whitespace(text[start:j])
        if sentence:
            sentences.append(sentence)
        start = k
        i = k
    tail = collapse_whitespace(text[start:])
    if tail:
        sentences.append(tail)
    return sentences


def number_template(text: str) -> str:
    """Replace every number by ``<n>`` so messages that differ only in amounts share a question.

    Single-letter inventory letters are kept: ``"f - 2 food rations."`` becomes
    ``"f - <n> food rations."``; ``"$ - 12 gold pieces."`` and ``"$ - 3 gold pieces."`` both
    become ``"$ - <n> gold pieces."``.
    """
    return _NUMBER.sub(NUMBER_PLACEHOLDER, text)


def caption_parts(text: str, *, split: bool = True, template: bool = False) -> list[str]:
    """The distinct texts to ask the LLM about for one caption, in order of first appearance.

    Whitespace is always collapsed; ``split`` splits into sentences (:func:`split_sentences`),
    ``template`` applies :func:`number_template` to each part. An empty caption has no parts.
    """
    parts = split_sentences(text) if split else [collapse_whitespace(text)]
    if template:
        parts = [number_template(p) for p in parts]
    return list(dict.fromkeys(p for p in parts if p))


def combine_max(probabilities: Iterable[float]) -> float:
    """Combine the per-sentence probabilities of one caption: the caption is as good as its best part.

    Raises:
        ValueError: when there is no probability, or one is outside [0, 1] (NaN included).
    """
    best = -1.0
    for p in probabilities:
        if not (0.0 <= p <= 1.0) or math.isnan(p):
            raise ValueError(f"{p!r} is not a probability")
        best = max(best, p)
    if best < 0.0:
        raise ValueError("combine_max needs at least one probability")
    return best
