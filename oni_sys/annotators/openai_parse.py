"""Reading OpenAI-compatible responses: the top log-probabilities of the first generated token,
each allowed choice's log-probability from them, the strict free-text fallback, the model list and
the message of an error body. How the servers spell tokens is in docs/ANNOTATOR.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from oni_sys.annotators.base import UnparseableAnswer
from oni_sys.annotators.retry import AttemptFailed

#: values at or below this are "impossible" (vLLM clamps -inf to -9999.0 for JSON)
_LOGPROB_FLOOR = -9999.0
#: SentencePiece and byte-level BPE spell a leading space with these markers in raw vocab pieces
_SPACE_MARKERS = ("\u2581", "\u0120")  # "▁", "Ġ"


def _unmark(token: str) -> str:
    """A raw vocabulary piece's leading space markers (``▁``/``Ġ``) turned into spaces."""
    n = 0
    while n < len(token) and token[n] in _SPACE_MARKERS:
        n += 1
    return " " * n + token[n:] if n else token


def _logsumexp(values: Iterable[float]) -> float:
    vals = [v for v in values if v != -math.inf]
    if not vals:
        return -math.inf
    top = max(vals)
    return top + math.log(sum(math.exp(v - top) for v in vals))


def extract_choice_logprobs(
    top: Mapping[str, float],
    choices: tuple[str, ...] | list[str],
    *,
    space_insensitive: bool = False,
) -> tuple[list[float], list[str]]:
    """Log-probability of each choice from a top-K table ``{token_text: logprob}``.

    Matching, per choice, first rule that finds something:

    1. ``exact``: the table has the choice's text as a key.
    2. ``marker``: keys that are raw vocabulary pieces whose ``▁``/``Ġ`` space markers, turned into
       spaces, give the choice (old vLLM returned such pieces); several are combined by
       log-sum-exp.
    3. ``space_insensitive`` (only when asked, and only when the choices stay distinct without
       leading spaces): keys equal to the choice ignoring leading spaces, for servers that drop
       the leading space of isolated tokens (see docs/ANNOTATOR.md).

    Absent choices get ``-inf`` (the token was not among the top K). Returns the log-probabilities
    and, per choice, how it was matched (``exact``, ``marker``, ``space_insensitive``, ``absent``,
    or ``absent_space_variant_seen`` when a key equals it ignoring leading spaces but rule 3 did
    not apply).
    """
    stripped_distinct = len({c.lstrip(" ") for c in choices}) == len(choices)
    unmarked: dict[str, list[float]] = {}
    for token, lp in top.items():
        unmarked.setdefault(_unmark(token), []).append(lp)
    out: list[float] = []
    how: list[str] = []
    for choice in choices:
        if choice in top:
            out.append(float(top[choice]))
            how.append("exact")
            continue
        marked = [lp for token, lp in top.items() if token != choice and _unmark(token) == choice]
        if marked:
            out.append(_logsumexp(marked))
            how.append("marker")
            continue
        loose = [
            lp
            for text, lps in unmarked.items()
            if text.lstrip(" ") == choice.lstrip(" ")
            for lp in lps
        ]
        if space_insensitive and stripped_distinct and loose:
            out.append(_logsumexp(loose))
            how.append("space_insensitive")
            continue
        out.append(-math.inf)
        how.append("absent" if not loose else "absent_space_variant_seen")
    return out, how


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    if math.isnan(value):
        return None
    return -math.inf if value <= _LOGPROB_FLOOR else value


def strict_choice(text: str, choices: tuple[str, ...] | list[str]) -> list[float]:
    """Last-resort parser of free text: the answer must be exactly one allowed choice.

    Surrounding whitespace is ignored, nothing else (no case folding, no substring search), so
    "Yes, because..." or "yes" is not an answer. The chosen choice gets log-probability 0 (a
    probability of 1, since no probabilities are known), the others ``-inf``.

    Raises:
        UnparseableAnswer: when the text is not exactly one of the choices.
    """
    hits = [i for i, c in enumerate(choices) if text.strip() == c.strip()]
    if len(hits) != 1:
        raise UnparseableAnswer(
            f"free-text answer {text[:80]!r} is not exactly one of {list(choices)}"
        )
    return [0.0 if i == hits[0] else float("-inf") for i in range(len(choices))]


def parse_completion_top_logprobs(data: Any) -> tuple[dict[str, float] | None, str]:
    """``({token_text: logprob}, generated_text)`` of the first generated token of a response.

    The table is ``None`` when the server sent text but no ``logprobs`` at all (it does not
    support them); :func:`strict_choice` then reads the text as the last resort.

    Raises :class:`AttemptFailed` (``empty_choices`` or ``bad_response``) when the response
    lacks what we need.
    """
    if not isinstance(data, dict):
        raise AttemptFailed("bad_response", "response is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise AttemptFailed("bad_response", "response has no 'choices' list")
    if not choices:
        raise AttemptFailed("empty_choices", "response has an empty 'choices' list")
    first = choices[0]
    if not isinstance(first, dict):
        raise AttemptFailed("bad_response", "choices[0] is not an object")
    text = first.get("text")
    text = text if isinstance(text, str) else ""
    logprobs = first.get("logprobs")
    if logprobs is None and text:
        # A server without completion logprobs: the caller falls back to the strict parser.
        return None, text
    if not isinstance(logprobs, dict):
        raise AttemptFailed(
            "bad_response",
            "choices[0] has no 'logprobs' (does the server return completion logprobs? "
            "llama_cpp.server needs --logits_all true)",
        )
    entries: Any
    if "top_logprobs" in logprobs and logprobs["top_logprobs"] is not None:
        table = logprobs["top_logprobs"]
        if not isinstance(table, list) or not table:
            raise AttemptFailed("bad_response", "'top_logprobs' is not a non-empty list")
        entries = table[0]
    elif isinstance(logprobs.get("content"), list) and logprobs["content"]:
        step = logprobs["content"][0]
        entries = step.get("top_logprobs") if isinstance(step, dict) else None
    else:
        raise AttemptFailed("bad_response", "'logprobs' has neither 'top_logprobs' nor 'content'")
    top: dict[str, float] = {}
    if isinstance(entries, dict):
        pairs: Iterable[tuple[Any, Any]] = entries.items()
    elif isinstance(entries, list):
        pairs = [
            (e.get("token"), e.get("logprob")) if isinstance(e, dict) else (None, None)
            for e in entries
        ]
    else:
        raise AttemptFailed("bad_response", "top log-probabilities of the first token are missing")
    for token, value in pairs:
        number = _number(value)
        if not isinstance(token, str) or number is None:
            raise AttemptFailed("bad_response", "top log-probabilities hold a non-numeric entry")
        top[token] = number
    if not top:
        raise AttemptFailed("bad_response", "top log-probabilities of the first token are empty")
    return top, text


def server_message(body: bytes) -> str | None:
    """The message of an error body (``{"error": {"message": ...}}`` as OpenAI, vLLM and
    llama.cpp send it, or ``{"detail": ...}`` / ``{"message": ...}``), at most 300 characters."""
    try:
        data = json.loads(body[:65536])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    candidates = [
        error.get("message") if isinstance(error, dict) else error,
        data.get("detail"),
        data.get("message"),
    ]
    for text in candidates:
        if isinstance(text, str) and text.strip():
            return " ".join(text.split())[:300]
    return None


def parse_models(data: Any) -> list[str]:
    """The model ids of a ``GET /models`` response."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise AttemptFailed("bad_response", "GET /models: no 'data' list")
    ids = [m.get("id") for m in data["data"] if isinstance(m, dict)]
    if not all(isinstance(i, str) for i in ids):
        raise AttemptFailed("bad_response", "GET /models: a model without a string 'id'")
    return ids
