"""The ``rules`` backend: labels from regular expressions, no LLM (ablations and deterministic tests).

Configured as ``annotator.rules: [{pattern: <regex>, label: 0|1}, ...]``: the first rule whose
pattern matches the caption anywhere (``re.search``; write ``(?i)`` for case-insensitive) gives
the label, and a caption no rule matches is labelled 0. It reads the raw caption(s) that
:mod:`oni_sys.annotators.prompts` stores in :attr:`Question.captions`, never the prompt, so a
caption cannot steer its label through prompt text.

- classification (one caption, choices positive first such as ``(" Yes", " No")``): the chosen
  answer gets log-probability 0 and the other ``-inf``;
- ranking (two captions, choices ``(" A", " B")``): the caption with the higher rule label is
  preferred; equal labels give each answer probability 1/2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from oni_sys.annotators.base import ChoiceScores, Question

logger = logging.getLogger(__name__)


class RulesBackend:
    """Deterministic labels from ``[{pattern, label}]`` rules (Backend protocol)."""

    def __init__(self, rules: Sequence[Mapping[str, Any]]) -> None:
        compiled: list[tuple[re.Pattern[str], int]] = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, Mapping) or set(rule) != {"pattern", "label"}:
                raise ValueError(f"annotator.rules[{i}]: expected {{pattern, label}}, got {rule!r}")
            label = rule["label"]
            if isinstance(label, bool) or label not in (0, 1):
                raise ValueError(f"annotator.rules[{i}].label: {label!r} is not 0 or 1")
            try:
                compiled.append((re.compile(str(rule["pattern"])), int(label)))
            except re.error as exc:
                raise ValueError(
                    f"annotator.rules[{i}].pattern: {rule['pattern']!r} is not a valid regex ({exc})"
                ) from None
        self._rules = compiled
        canonical = json.dumps([[p.pattern, label] for p, label in compiled])
        self.model_id = f"rules@{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"

    def label(self, caption: str) -> int:
        """The label of the first matching rule, 0 when none matches."""
        for pattern, label in self._rules:
            if pattern.search(caption):
                return label
        return 0

    async def score(self, question: Question) -> ChoiceScores:
        """Answer from the rules: log-probability 0 for the chosen choice, ``-inf`` for the other."""
        t0 = time.monotonic()
        if len(question.choices) != 2 or len(question.captions) not in (1, 2):
            raise ValueError(
                "the rules backend answers two-choice questions built by "
                "oni_sys.annotators.prompts (they carry their caption or caption pair)"
            )
        labels = [self.label(c) for c in question.captions]
        if len(labels) == 1:
            first = labels[0] == 1
            logprobs = [0.0, -math.inf] if first else [-math.inf, 0.0]
        elif labels[0] == labels[1]:
            logprobs = [math.log(0.5), math.log(0.5)]
        else:
            logprobs = [0.0, -math.inf] if labels[0] > labels[1] else [-math.inf, 0.0]
        return ChoiceScores(
            logprobs=logprobs,
            latency=time.monotonic() - t0,
            meta={"model": self.model_id, "rule_labels": labels},
        )

    async def close(self) -> None:
        """Nothing to release."""
