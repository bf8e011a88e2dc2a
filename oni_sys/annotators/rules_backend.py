"""The ``rules`` backend: labels from regular expressions, no LLM (for ablations and deterministic
tests); how rules match and answer: docs/ANNOTATOR.md, "The rules backend".
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
    """Deterministic labels from ``[{pattern, label}]`` rules (Backend protocol).

    Example::

        backend = RulesBackend([{"pattern": "(?i)kill|gold", "label": 1}])
        backend.label("You kill the newt!")  # 1
        scores = await backend.score(build_classification("It's a wall.", cfg))
        scores.probabilities()  # [0.0, 1.0]
    """

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
