"""What a caption is asked as: its question texts (sentences, number templates) and their ids."""

from __future__ import annotations

from collections.abc import Mapping

from oni_sys.annotators.normalise import caption_parts
from oni_sys.config import AnnotatorConfig
from oni_sys.envs.captions import caption_id, normalise_caption


def question_texts(text: str, cfg: AnnotatorConfig) -> list[str]:
    """The questions a caption becomes: its sentences (or itself), number-templated if asked."""
    parts = caption_parts(text, split=cfg.split_sentences, template=cfg.number_template)
    return parts or [normalise_caption(text)]


def plan_questions(
    texts: Mapping[int, str], cfg: AnnotatorConfig
) -> tuple[dict[int, list[int]], dict[int, str]]:
    """``(caption id -> its question ids, question id -> question text)`` for ``texts``.

    A question's id is the caption id of its text, so a one-sentence caption is its own question.
    """
    plans: dict[int, list[int]] = {}
    questions: dict[int, str] = {}
    for cid, text in texts.items():
        qtexts = question_texts(text, cfg)
        qids = [caption_id(q) for q in qtexts]
        plans[int(cid)] = qids
        questions.update(zip(qids, qtexts))
    return plans, questions
