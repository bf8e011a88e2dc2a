"""Prompt templates: ONI-style per-caption classification and Motif/ONI-style pairwise ranking.

Both are few-shot *completion* prompts whose answer is one token, scored by its log-probability:
classification asks "does this message show progress toward the goal?" (choices
:data:`CLASSIFICATION_CHOICES`, the positive answer first), ranking "which of two messages, A or
B, shows more progress?" (:data:`RANKING_CHOICES`, the first caption first). Captions are quoted
as JSON strings; goals, worked examples, template files and the cached prefix:
docs/ANNOTATOR.md, "Prompts" and "Labels".
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from oni_sys.annotators.base import Question
from oni_sys.annotators.normalise import NUMBER_PLACEHOLDER, collapse_whitespace

logger = logging.getLogger(__name__)

#: bump when the way captions are quoted or answers are read changes (part of prompt_version)
PROMPT_FORMAT_VERSION = "choice-logprob-v1;json-quote-v1"
CLASSIFICATION_CHOICES: tuple[str, str] = (" Yes", " No")
RANKING_CHOICES: tuple[str, str] = (" A", " B")
#: captions longer than this are cut (with an ellipsis) so a prompt always fits the context
MAX_CAPTION_CHARS = 400
#: worked examples per side (progress / no progress) at most
MAX_EXAMPLES_PER_SIDE = 8

GOALS: dict[str, str] = {
    "score": (
        "maximise the game score: kill monsters, collect gold, go down the stairs "
        "and gain experience levels"
    ),
    "zero_knowledge": "make progress in the game",
    "combat": (
        "fight: kill monsters and gain experience levels; collecting gold and going down "
        "the stairs do not count"
    ),
    "gold": (
        "collect as much gold as possible; killing monsters and going down the stairs do not count"
    ),
    "stairs": (
        "go down the stairs to deeper dungeon levels; killing monsters and collecting gold "
        "do not count"
    ),
}

#: which example tags count as progress for each preset goal (zero_knowledge: no examples)
GOAL_TAGS: dict[str, frozenset[str]] = {
    "score": frozenset({"kill", "gold", "stairs", "level", "attribute", "discovery"}),
    "combat": frozenset({"kill", "level"}),
    "gold": frozenset({"gold"}),
    "stairs": frozenset({"stairs"}),
}


@dataclass(frozen=True)
class Example:
    """A worked example: a game message and the kinds of progress it shows (none: no progress)."""

    caption: str
    tags: frozenset[str] = frozenset()


def _ex(caption: str, *tags: str) -> Example:
    return Example(caption, frozenset(tags))


# Written from general knowledge of NetHack's messages. Order matters: for each goal the first
# MAX_EXAMPLES_PER_SIDE positives and negatives are used, alternating positive / negative.
EXAMPLES: tuple[Example, ...] = (
    _ex("You kill the gecko!", "kill"),
    _ex("You miss the gecko."),
    _ex("$ - 25 gold pieces.", "gold"),
    _ex("The gecko bites!"),
    _ex("Welcome to experience level 5.", "level"),
    _ex("You hear the chime of a cash register."),
    _ex("You feel agile!", "attribute"),
    _ex("Nothing happens."),
    _ex("You destroy the kobold mummy!", "kill"),
    _ex("There is a boulder in your way."),
    _ex("You find a secret door.", "discovery"),
    _ex("There is a staircase up here."),
    _ex("You kill the giant beetle!", "kill"),
    _ex("You are hit by an arrow!"),
    _ex("There is a ladder down here.", "stairs"),
    _ex("You don't have that object."),
    _ex("A trap door opens up under you!", "stairs"),
    _ex("You fly down along the stairs.", "stairs"),
    _ex("You see here 60 gold pieces.", "gold"),
    _ex("$ - 180 gold pieces.", "gold"),
    _ex("You kill the homunculus!", "kill"),
    _ex("This door is broken."),
    _ex("Your purse feels lighter."),
    _ex("You climb up the stairs."),
)

CLASSIFICATION_TEMPLATE = (
    "NetHack is a dungeon-crawling game. The player's goal is to {goal}.\n"
    "For each game message below, answer Yes if the message shows progress toward the goal, "
    "otherwise No.\n\n"
    "{examples}"
    "Message: {caption}\n"
    "Progress:"
)
RANKING_TEMPLATE = (
    "NetHack is a dungeon-crawling game. The player's goal is to {goal}.\n"
    "Each pair below holds two quoted game messages, A and B. Answer A or B: which message "
    "shows more progress toward the goal?\n\n"
    "{examples}"
    "Message A: {caption_a}\n"
    "Message B: {caption_b}\n"
    "More progress:"
)
_EXAMPLE_FORMAT = {
    "classification": "Message: {caption}\nProgress:{answer}\n\n",
    "ranking": "Message A: {caption_a}\nMessage B: {caption_b}\nMore progress:{answer}\n\n",
}
_FIELDS = {
    "classification": {"goal", "examples", "caption"},
    "ranking": {"goal", "examples", "caption_a", "caption_b"},
}
_CAPTION_FIELDS = {"caption", "caption_a", "caption_b"}
# text shaped like a tokenizer control token: <bos>, <start_of_turn>, </s>, <|im_start|>, ...
_CONTROL_TOKEN = re.compile(r"<(/?\|?[A-Za-z_][\w|]{0,40})>")


class PromptConfig(Protocol):
    """The keys of ``AnnotatorConfig`` that shape a prompt."""

    prompt: str
    goal: str
    few_shot: bool


@dataclass(frozen=True)
class _Template:
    kind: str  # classification | ranking
    text: str
    source: str  # "builtin" or the file path


def quote_caption(caption: str) -> str:
    """The caption as it appears in a prompt: a JSON string literal, quotes included.

    Whitespace is collapsed (no newline can reach the prompt), quotes, backslashes and control
    characters are escaped, pseudo control tokens are defused and long captions are cut.
    """
    text = collapse_whitespace(caption)
    if len(text) > MAX_CAPTION_CHARS:
        text = text[: MAX_CAPTION_CHARS - 1] + "…"
    text = _CONTROL_TOKEN.sub(
        lambda m: m.group(0) if m.group(0) == NUMBER_PLACEHOLDER else f"‹{m.group(1)}›", text
    )
    return json.dumps(text, ensure_ascii=False)


def goal_text(goal: str) -> str:
    """The goal description for a preset name, or the free text itself (collapsed)."""
    if goal in GOALS:
        return GOALS[goal]
    text = collapse_whitespace(goal).rstrip(".")
    if not text:
        raise ValueError("annotator.goal is empty; use a preset (score, ...) or describe the goal")
    return text


def examples_for(goal: str) -> list[tuple[Example, bool]]:
    """The worked examples for a goal as ``(example, is_progress)``, alternating, positive first.

    Empty for ``zero_knowledge`` and free-text goals.
    """
    tags = GOAL_TAGS.get(goal)
    if tags is None:
        return []
    positives = [e for e in EXAMPLES if e.tags & tags]
    negatives = [e for e in EXAMPLES if not e.tags & tags]
    n = min(MAX_EXAMPLES_PER_SIDE, len(positives), len(negatives))
    out: list[tuple[Example, bool]] = []
    for pos, neg in zip(positives[:n], negatives[:n]):
        out += [(pos, True), (neg, False)]
    return out


def _render_examples(kind: str, goal: str, few_shot: bool) -> str:
    if not few_shot:
        return ""
    pairs = examples_for(goal)
    if not pairs and goal not in GOALS:
        _warn_no_examples(goal)
    fmt = _EXAMPLE_FORMAT[kind]
    if kind == "classification":
        return "".join(
            fmt.format(caption=quote_caption(e.caption), answer=CLASSIFICATION_CHOICES[not pos])
            for e, pos in pairs
        )
    # ranking: each (positive, negative) pair once, the better message alternately A and B
    blocks = []
    for i in range(0, len(pairs) - 1, 2):
        (pos, _), (neg, _) = pairs[i], pairs[i + 1]
        a, b, answer = (pos, neg, 0) if (i // 2) % 2 == 0 else (neg, pos, 1)
        blocks.append(
            fmt.format(
                caption_a=quote_caption(a.caption),
                caption_b=quote_caption(b.caption),
                answer=RANKING_CHOICES[answer],
            )
        )
    return "".join(blocks)


@functools.lru_cache(maxsize=64)
def _warn_no_examples(goal: str) -> None:
    logger.warning(
        "annotator.goal %r is free text: the built-in worked examples are labelled for the preset "
        "goals, so none are used; accuracy of a small model drops a lot without them (write a "
        "template file with your own examples)",
        goal if len(goal) <= 60 else goal[:57] + "...",
    )


def _parse_template(text: str, source: str) -> _Template:
    """Check a template's placeholders and find its kind; ValueError with one sentence if bad."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise ValueError(f"prompt template {source}: not a valid template ({exc})") from None
    unknown = sorted({f for f in fields if f not in _FIELDS["ranking"] | _FIELDS["classification"]})
    if unknown:
        raise ValueError(
            f"prompt template {source}: unknown placeholder {{{unknown[0]}}}; use {{goal}}, "
            "{examples} and {caption} (or {caption_a} and {caption_b})"
        )
    counts = {f: fields.count(f) for f in _CAPTION_FIELDS}
    if counts["caption"] == 1 and counts["caption_a"] == counts["caption_b"] == 0:
        kind = "classification"
    elif counts["caption"] == 0 and counts["caption_a"] == counts["caption_b"] == 1:
        kind = "ranking"
    else:
        raise ValueError(
            f"prompt template {source}: it needs exactly one {{caption}} (classification) or "
            "exactly one {caption_a} and one {caption_b} (ranking)"
        )
    if text != text.rstrip():
        raise ValueError(
            f"prompt template {source}: it must end where the answer goes, without trailing "
            "whitespace or newline"
        )
    return _Template(kind, text, source)


@functools.lru_cache(maxsize=32)
def _load_template_file(path: str, mtime_ns: int, size: int) -> _Template:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"prompt template {path}: cannot be read ({exc})") from None
    return _parse_template(text, path)


_BUILTIN = {
    "classification": _parse_template(CLASSIFICATION_TEMPLATE, "builtin"),
    "ranking": _parse_template(RANKING_TEMPLATE, "builtin"),
}


def _template(cfg: PromptConfig, kind: str | None = None) -> _Template:
    """The template ``cfg.prompt`` names; for a built-in name, ``kind`` picks which built-in."""
    value = cfg.prompt
    if value in _BUILTIN:
        return _BUILTIN[kind or value]
    path = Path(value).expanduser()
    try:
        st = path.stat()
    except OSError:
        raise ValueError(
            f"annotator.prompt: {value!r} is neither classification, ranking nor a readable "
            "template file"
        ) from None
    if not path.is_file():
        raise ValueError(f"annotator.prompt: {value!r} is not a file")
    tpl = _load_template_file(str(path.resolve()), st.st_mtime_ns, st.st_size)
    if kind is not None and tpl.kind != kind:
        raise ValueError(
            f"annotator.prompt: {value!r} is a {tpl.kind} template, but a {kind} question was asked"
        )
    return tpl


def prompt_kind(cfg: PromptConfig) -> str:
    """``"classification"`` or ``"ranking"``: what the configured prompt asks."""
    return _template(cfg).kind


def _render(tpl: _Template, cfg: PromptConfig, captions: dict[str, str]) -> tuple[str, int]:
    """The full prompt and the length of its caption-independent prefix."""
    values = {
        "goal": goal_text(cfg.goal),
        "examples": _render_examples(tpl.kind, cfg.goal, cfg.few_shot),
        **{k: quote_caption(v) for k, v in captions.items()},
    }
    parts: list[str] = []
    prefix_len = -1
    for literal, field, spec, conv in string.Formatter().parse(tpl.text):
        parts.append(literal)
        if field is None:
            continue
        if field in _CAPTION_FIELDS and prefix_len < 0:
            # cut at a line start: a cut mid-line could split what the tokenizer would merge
            prefix_len = "".join(parts).rfind("\n") + 1
        value = values[field]
        if conv:
            value = {"r": repr, "s": str, "a": ascii}[conv](value)
        parts.append(format(value, spec or ""))
    return "".join(parts), max(prefix_len, 0)


def build_classification(caption: str, cfg: PromptConfig) -> Question:
    """The question "does ``caption`` show progress toward the goal?" (choices Yes, No).

    Example::

        q = build_classification("You kill the newt!", AnnotatorConfig())
        q.choices, q.captions  # ((" Yes", " No"), ("You kill the newt!",))
        q.prompt[q.prefix_len :]  # the caption's own lines, after the shared prefix
    """
    prompt, prefix_len = _render(_template(cfg, "classification"), cfg, {"caption": caption})
    return Question(prompt, CLASSIFICATION_CHOICES, captions=(caption,), prefix_len=prefix_len)


def build_ranking(caption_a: str, caption_b: str, cfg: PromptConfig) -> Question:
    """The question "which of ``caption_a`` (A) and ``caption_b`` (B) shows more progress?"
    (choices A, B).

    Example::

        q = build_ranking("You kill the newt!", "It's a wall.", AnnotatorConfig(prompt="ranking"))
        p_a, p_b = (await backend.score(q)).probabilities()  # p_a: P(the newt shows more)
    """
    prompt, prefix_len = _render(
        _template(cfg, "ranking"), cfg, {"caption_a": caption_a, "caption_b": caption_b}
    )
    return Question(prompt, RANKING_CHOICES, captions=(caption_a, caption_b), prefix_len=prefix_len)


def split_prefix(question: Question) -> tuple[str, str]:
    """``(prefix, suffix)`` of a question: the part shared by all captions, and the rest."""
    return question.prefix, question.suffix


def prompt_version(cfg: PromptConfig) -> str:
    """A short hash of everything in the prompt that can change an answer.

    Covers the template text (file contents, not its path), the goal text, the rendered worked
    examples, the choices and :data:`PROMPT_FORMAT_VERSION`; not the caption normalisation
    options or the threshold, which decide what is asked and how a probability becomes a label.
    """
    tpl = _template(cfg)
    h = hashlib.sha256()
    for part in (
        PROMPT_FORMAT_VERSION,
        tpl.kind,
        tpl.text,
        goal_text(cfg.goal),
        _render_examples(tpl.kind, cfg.goal, cfg.few_shot),
        "|".join(CLASSIFICATION_CHOICES if tpl.kind == "classification" else RANKING_CHOICES),
        str(MAX_CAPTION_CHARS),
    ):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return f"{tpl.kind[:5]}-{h.hexdigest()[:12]}"
