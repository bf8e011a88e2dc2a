"""The reward the policy is trained on: ``c_ext * r_ext + c_int * r_int(caption) / N^beta``.

``r_int`` comes from the reward learner's current snapshot and is computed once per unique
caption id and snapshot version (cached), then spread over the ``[T, N]`` steps with one
vectorised lookup: no per-step model calls and no per-step Python string work.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import numpy as np

from oni_sys.config import RewardConfig

logger = logging.getLogger(__name__)


class IntrinsicReward:
    """Caption registry, per-snapshot reward cache and per-episode intrinsic returns."""

    def __init__(self, cfg: RewardConfig, return_window: int = 100):
        self.cfg = cfg
        self.texts: dict[int, str] = {}
        self.snapshot: Any = None
        self._ids = np.zeros(0, dtype=np.uint64)  # sorted ids with a cached reward
        self._values = np.zeros(0, dtype=np.float32)
        self._episode_sums: dict[tuple[int, int], float] = {}
        self.intrinsic_returns: deque[float] = deque(maxlen=return_window)

    @property
    def enabled(self) -> bool:
        """False for ``reward.kind=none``: the policy sees only the (scaled) extrinsic reward."""
        return self.cfg.kind != "none"

    @property
    def snapshot_version(self) -> int:
        """Version of the reward snapshot in use (0: none yet)."""
        return 0 if self.snapshot is None else int(self.snapshot.version)

    def set_snapshot(self, snapshot: Any) -> None:
        """Use a newer reward snapshot; older ones (from a late message) are ignored."""
        if snapshot is not None and snapshot.version > self.snapshot_version:
            self.snapshot = snapshot
            self._ids = np.zeros(0, dtype=np.uint64)
            self._values = np.zeros(0, dtype=np.float32)

    def register(self, captions: dict[int, str]) -> None:
        """Remember caption texts (each arrives once per env runner)."""
        self.texts.update(captions)

    def caption_rewards(self, caption_ids: np.ndarray) -> np.ndarray:
        """``r_int`` for every entry of ``caption_ids`` (0 for no caption or no snapshot)."""
        out = np.zeros(caption_ids.shape, dtype=np.float32)
        if self.snapshot is None:
            return out
        present = caption_ids != 0
        unique = np.unique(caption_ids[present])
        if unique.size == 0:
            return out
        if self._ids.size:
            pos = np.minimum(np.searchsorted(self._ids, unique), self._ids.size - 1)
            new = unique[self._ids[pos] != unique]
        else:
            new = unique
        if new.size:
            texts = [self.texts.get(int(i), "") for i in new]
            values = np.asarray(self.snapshot.rewards(new, texts), dtype=np.float32)
            ids = np.concatenate([self._ids, new])
            order = np.argsort(ids, kind="stable")
            self._ids = ids[order]
            self._values = np.concatenate([self._values, values])[order]
        idx = np.searchsorted(self._ids, caption_ids[present])
        out[present] = self._values[idx]
        return out

    def shape(
        self,
        rewards: np.ndarray,
        caption_ids: np.ndarray,
        caption_counts: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The training reward ``[T, N]`` and its intrinsic part (already weighted by ``c_int``)."""
        if not self.enabled:
            return self.cfg.c_ext * rewards, np.zeros_like(rewards)
        r_int = self.caption_rewards(caption_ids)
        counts = np.maximum(caption_counts, 1).astype(np.float32)
        intrinsic = self.cfg.c_int * r_int / counts**self.cfg.beta
        return self.cfg.c_ext * rewards + intrinsic, intrinsic

    def track_episodes(self, runner_index: int, intrinsic: np.ndarray, done: np.ndarray) -> None:
        """Accumulate per-episode intrinsic returns for one runner's ``[T, N]`` fragment."""
        for env in range(intrinsic.shape[1]):
            key = (runner_index, env)
            total = self._episode_sums.get(key, 0.0)
            ends = np.flatnonzero(done[:, env])
            start = 0
            for end in ends:
                total += float(intrinsic[start : end + 1, env].sum())
                self.intrinsic_returns.append(total)
                total, start = 0.0, end + 1
            self._episode_sums[key] = total + float(intrinsic[start:, env].sum())
