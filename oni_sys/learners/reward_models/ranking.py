"""ONI-Ranking (online Motif): a scalar n-gram model trained with Bradley-Terry on preferences.

Rewards are the model's output normalised by a running mean/std of its outputs, then
thresholded (values below ``cfg.ranking_threshold`` become 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from oni_sys.config import RewardConfig
from oni_sys.contracts import PreferenceRecord
from oni_sys.learners.reward_models.base import PairData
from oni_sys.learners.reward_models.network import (
    NetworkSnapshot,
    _bootstrap_weights,
    _member_raw,
    _NetworkReward,
)
from oni_sys.learners.reward_models.text_scorer import _forward_texts, tokenise

NORM_WINDOW = 4096  # ranking: outputs the running mean/std remember (~32 updates of batch 64)


@dataclass(frozen=True, eq=False)
class RankingSnapshot(NetworkSnapshot):
    """ONI-Ranking: scalar model, normalised by running mean/std, then thresholded.

    ``raw_rewards`` -> ``normalised_rewards`` -> ``rewards`` make each stage visible; the policy
    receives ``rewards`` (normalised and thresholded, never the raw output).
    """

    mean: float
    std: float
    threshold: float

    def from_raw(self, raw: np.ndarray) -> np.ndarray:
        return ((raw - self.mean) / self.std).astype(np.float32)

    def raw_rewards(self, ids: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """The model's raw scalar output (0 for id 0 or blank text)."""
        return _member_raw((self,), self._check(ids, texts), texts)[0][0]

    def normalised_rewards(self, ids: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """``(raw - mean) / std`` with the statistics frozen into this snapshot (0 if invalid)."""
        return self.scores(ids, texts)

    def finish(self, scores: np.ndarray) -> np.ndarray:
        """ONI's sparsification: normalised values below the threshold become exactly 0."""
        return np.where(scores >= self.threshold, scores, 0.0).astype(np.float32)


class RankingReward(_NetworkReward):
    """ONI-Ranking: a scalar model trained with Bradley-Terry on preferences, then normalised."""

    kind = "ranking"

    def __init__(self, cfg: RewardConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self._data = PairData(cfg)
        # Running statistics of the model's outputs on training captions (ONI's RunningMeanStd),
        # with the weight of the past capped at NORM_WINDOW outputs so they follow the model as
        # it changes instead of averaging over every set of weights it ever had.
        self.norm_mean = 0.0
        self.norm_var = 1.0
        self.norm_count = 0.0

    def add_preferences(self, items: Sequence[PreferenceRecord]) -> int:
        return self._data.add(items)

    def _update_norm(self, x: np.ndarray) -> None:
        n = float(x.size)
        prior = min(self.norm_count, max(NORM_WINDOW - n, 0.0))
        total = prior + n
        delta = float(x.mean()) - self.norm_mean
        self.norm_mean += delta * n / total
        self.norm_var = (
            self.norm_var * prior + float(x.var()) * n + delta**2 * prior * n / total
        ) / total
        self.norm_count = total

    @property
    def norm_std(self) -> float:
        return math.sqrt(self.norm_var + 1e-8)

    def update(self) -> dict[str, float]:
        batch = self._minibatch()
        if batch is None:
            return {}
        slots, records = batch
        store = self._data.store
        b = len(records)
        targets = torch.tensor([r[4] for r in records], dtype=torch.float32)
        out = self.net(tokenise([r[1] for r in records] + [r[3] for r in records]))
        margin = out[:b] - out[b:]  # Bradley-Terry: P(a > b) = sigmoid(r_a - r_b)
        losses = F.binary_cross_entropy_with_logits(margin, targets, reduction="none")
        w = _bootstrap_weights(
            np.array([store.key(s) for s in slots], np.uint64), self.bootstrap_salt
        )
        loss = losses.mean() if w is None else (losses * w).sum() / w.sum().clamp(min=1.0)
        self._step(loss)
        self._update_norm(out.detach().numpy().astype(np.float64))
        decisive = targets != 0.5
        agree = ((margin.detach() > 0) == (targets > 0.5))[decisive].float()
        return {
            "loss": float(loss.detach()),
            "batch_agreement": float(agree.mean()) if agree.numel() else float("nan"),
            "norm_mean": self.norm_mean,
            "norm_std": self.norm_std,
        }

    def _make_snapshot(self, version: int) -> RankingSnapshot:
        return RankingSnapshot(
            version=version,
            kind=self.kind,
            params=self._params(),
            mean=self.norm_mean,
            std=self.norm_std,
            threshold=self.cfg.ranking_threshold,
        )

    def _agreement(self, slots: list[int]) -> tuple[float, int]:
        """Fraction of decisive pairs (P != 0.5) ordered as labelled, and how many there were."""
        store = self._data.store
        records = [store.record(s) for s in slots if store.record(s)[4] != 0.5]
        if not records:
            return float("nan"), 0
        b = len(records)
        raw = _forward_texts(
            [self._params(copy=False)], [r[1] for r in records] + [r[3] for r in records]
        )[0]
        pred = raw[:b] > raw[b:]
        want = np.array([r[4] > 0.5 for r in records])
        return float((pred == want).mean()), b

    def evaluate(self) -> dict[str, float]:
        """Pairwise agreement on held-back pairs (ties excluded), on training pairs, and counts."""
        store = self._data.store
        held, n_held = self._agreement(self._eval_slots(1))
        train, _ = self._agreement(self._eval_slots(0, 4096))
        return {
            "pairwise_agreement": held,
            "train_pairwise_agreement": train,
            "num_pairs": float(len(store)),
            "num_train": float(store.split_size(0)),
            "num_held_out": float(store.split_size(1)),
            "num_held_out_decisive": float(n_held),
            "evicted": float(store.evicted),
            "updates": float(self.num_updates),
            "norm_mean": self.norm_mean,
            "norm_std": self.norm_std,
        }

    def _extra_state(self) -> dict[str, Any]:
        return {"norm": {"mean": self.norm_mean, "var": self.norm_var, "count": self.norm_count}}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        norm = state["norm"]
        self.norm_mean = float(norm["mean"])
        self.norm_var = float(norm["var"])
        self.norm_count = float(norm["count"])
