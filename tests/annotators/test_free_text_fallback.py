"""A server without completion logprobs: the strict parser reads only an exact answer."""

from __future__ import annotations

import math

import pytest

from oni_sys.annotators.base import UnparseableAnswer
from oni_sys.annotators.openai_parse import parse_completion_top_logprobs, strict_choice


def test_response_without_logprobs_goes_to_the_strict_parser():
    top, text = parse_completion_top_logprobs({"choices": [{"text": " Yes", "logprobs": None}]})
    assert top is None and text == " Yes"
    assert strict_choice(text, (" Yes", " No")) == [0.0, -math.inf]


@pytest.mark.parametrize("text", [" yes", "Yes, it does", " Maybe", " Yes No", "The answer is Yes"])
def test_anything_but_an_exact_choice_is_unparseable(text):
    with pytest.raises(UnparseableAnswer):
        strict_choice(text, (" Yes", " No"))
