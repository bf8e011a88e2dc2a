"""ONI-Classification: P(label 1 | caption) from the n-gram scorer, trained on the hard labels.

The reward is that probability, or the probability thresholded to 0/1 (``cfg.output``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from oni_sys.config import RewardConfig
from oni_sys.contracts import LabelRecord
from oni_sys.learners.reward_models.base import LabelData
from oni_sys.learners.reward_models.network import (
    NetworkSnapshot,
    _bootstrap_weights,
    _NetworkReward,
)
from oni_sys.learners.reward_models.text_scorer import _forward_texts, tokenise


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


@dataclass(frozen=True, eq=False)
class ClassificationSnapshot(NetworkSnapshot):
    """ONI-Classification: the classifier's weights; reward = P(1) or ``P(1) >= threshold``."""

    output: str  # "label" | "probability"
    threshold: float

    def from_raw(self, raw: np.ndarray) -> np.ndarray:
        return _sigmoid(raw)

    def probabilities(self, ids: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """P(label 1) of each caption (0 for id 0 or blank text)."""
        return self.scores(ids, texts)

    def finish(self, scores: np.ndarray) -> np.ndarray:
        if self.output == "label":
            return (scores >= self.threshold).astype(np.float32)
        return np.clip(scores, 0.0, 1.0).astype(np.float32)


class ClassificationReward(_NetworkReward):
    """ONI-Classification: P(label 1 | caption) from the n-gram encoder, hard-label BCE."""

    kind = "classification"

    def __init__(self, cfg: RewardConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self._data = LabelData(cfg)

    def add_labels(self, items: Sequence[LabelRecord]) -> int:
        return self._data.add(items)

    def update(self) -> dict[str, float]:
        batch = self._minibatch()
        if batch is None:
            return {}
        slots, records = batch
        store = self._data.store
        targets = torch.tensor([r[1] for r in records], dtype=torch.float32)
        logits = self.net(tokenise([r[0] for r in records]))
        losses = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        w = _bootstrap_weights(
            np.array([store.key(s) for s in slots], np.uint64), self.bootstrap_salt
        )
        loss = losses.mean() if w is None else (losses * w).sum() / w.sum().clamp(min=1.0)
        self._step(loss)
        correct = ((logits.detach() >= 0).float() == targets).float().mean()
        return {"loss": float(loss.detach()), "batch_accuracy": float(correct)}

    def _make_snapshot(self, version: int) -> ClassificationSnapshot:
        return ClassificationSnapshot(
            version=version,
            kind=self.kind,
            params=self._params(),
            output=self.cfg.output,
            threshold=self.cfg.threshold,
        )

    def _probabilities(self, slots: list[int]) -> tuple[np.ndarray, np.ndarray]:
        store = self._data.store
        records = [store.record(s) for s in slots]
        probs = _sigmoid(_forward_texts([self._params(copy=False)], [r[0] for r in records])[0])
        return probs, np.array([r[1] for r in records], dtype=np.float32)

    def evaluate(self) -> dict[str, float]:
        """Accuracy of ``P >= threshold`` and BCE on held-back captions; training accuracy too."""
        store = self._data.store
        out = {
            "num_labels": float(len(store)),
            "num_train": float(store.split_size(0)),
            "num_held_out": float(store.split_size(1)),
            "num_positive": float(store.group_size(1)),
            "evicted": float(store.evicted),
            "updates": float(self.num_updates),
        }
        for name, split, limit in (("", 1, None), ("train_", 0, 4096)):
            slots = self._eval_slots(split, limit)
            if not slots:
                out[f"{name}accuracy"] = float("nan")
                continue
            p, y = self._probabilities(slots)
            out[f"{name}accuracy"] = float(((p >= self.cfg.threshold) == (y > 0.5)).mean())
            pc = np.clip(p, 1e-6, 1 - 1e-6)
            out[f"{name}loss"] = float(-(y * np.log(pc) + (1 - y) * np.log(1 - pc)).mean())
        return out
