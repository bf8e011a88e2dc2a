"""The rules backend: deterministic labels from regular expressions."""

from __future__ import annotations

import asyncio

import pytest

from oni_sys.annotators.base import Question
from oni_sys.annotators.prompts import build_classification, build_ranking
from oni_sys.annotators.rules_backend import RulesBackend
from oni_sys.config import AnnotatorConfig

RULES = [
    {"pattern": r"^You kill the (newt|jackal)", "label": 0},  # first match wins
    {"pattern": r"^You (kill|destroy) ", "label": 1},
    {"pattern": r"(?i)gold piece", "label": 1},
]


def label(backend: RulesBackend, question: Question) -> float:
    return asyncio.run(backend.score(question)).probabilities()[0]


def test_first_matching_rule_wins_and_no_match_is_zero():
    b = RulesBackend(RULES)
    cfg = AnnotatorConfig(backend="rules", rules=RULES)
    assert label(b, build_classification("You kill the goblin!", cfg)) == 1.0
    assert label(b, build_classification("You kill the newt!", cfg)) == 0.0
    assert label(b, build_classification("$ - 3 GOLD PIECES.", cfg)) == 1.0
    assert label(b, build_classification("It's a wall.", cfg)) == 0.0
    assert b.label("You destroy the kobold zombie!") == 1


def test_reads_the_caption_not_the_prompt():
    b = RulesBackend([{"pattern": "Progress", "label": 1}])
    q = build_classification("It's a wall.", AnnotatorConfig())
    assert "Progress" in q.prompt  # the prompt's instructions and examples hold it
    assert label(b, q) == 0.0
    assert label(b, build_classification('You read: "Progress"', AnnotatorConfig())) == 1.0


def test_ranking_prefers_the_higher_rule_label():
    b = RulesBackend(RULES)
    cfg = AnnotatorConfig(prompt="ranking")
    assert label(b, build_ranking("You kill the goblin!", "It's a wall.", cfg)) == 1.0
    assert label(b, build_ranking("It's a wall.", "You kill the goblin!", cfg)) == 0.0
    assert label(b, build_ranking("It's a wall.", "Never mind.", cfg)) == pytest.approx(0.5)


def test_model_id_depends_on_the_rules():
    assert RulesBackend(RULES).model_id == RulesBackend(list(RULES)).model_id
    assert RulesBackend(RULES).model_id != RulesBackend(RULES[1:]).model_id
    assert RulesBackend([]).model_id.startswith("rules@")


@pytest.mark.parametrize(
    "rules, match",
    [
        ([{"pattern": "("}], r"rules\[0\]"),
        ([{"pattern": "(", "label": 1}], "not a valid regex"),
        ([{"pattern": "x", "label": 2}], "not 0 or 1"),
        ([{"pattern": "x", "label": True}], "not 0 or 1"),
        (["x"], r"rules\[0\]"),
    ],
)
def test_bad_rules_raise(rules, match):
    with pytest.raises(ValueError, match=match):
        RulesBackend(rules)


def test_questions_without_captions_are_refused():
    with pytest.raises(ValueError, match="carry their caption"):
        asyncio.run(RulesBackend(RULES).score(Question("p", (" yes", " no"))))


def test_deterministic():
    b = RulesBackend(RULES)
    q = build_classification("You kill the goblin!", AnnotatorConfig())
    assert [asyncio.run(b.score(q)).logprobs for _ in range(3)] == [[0.0, float("-inf")]] * 3
