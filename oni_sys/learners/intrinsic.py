"""The reward the policy is trained on: ``c_ext * clip(r_ext) + c_int * r_int(caption) / N^beta``.

``r_int`` comes from the reward learner's current snapshot and is computed once per unique
caption id and snapshot version (cached), then spread over the ``[T, N]`` steps with one
vectorised lookup: no per-step model calls and no per-step Python string work.

It also keeps the books for the reward-hacking report (:class:`CaptionTally`): per caption id,
the intrinsic reward paid and the steps it was seen, over the run and over the last few batches.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import numpy as np

from oni_sys.config import RewardConfig

logger = logging.getLogger(__name__)


#: the share window never spans fewer updates than this (a 2-update window flickers)
MIN_SHARE_WINDOW = 20


def share_window(log_every_updates: int) -> int:
    """Updates whose payouts ``intrinsic_top_caption_share`` covers."""
    return max(log_every_updates, MIN_SHARE_WINDOW)


#: rows of :meth:`IntrinsicReward.table` (the captions that earned most); the totals count all
TABLE_ROWS = 1000


def _merge_sorted(
    ids: np.ndarray, columns: list[np.ndarray], new_ids: np.ndarray, new_columns: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Add ``new_columns`` (rows keyed by sorted unique ``new_ids``) into sorted ``ids``' columns."""
    pos = np.searchsorted(ids, new_ids)
    found = pos < ids.size
    found[found] = ids[pos[found]] == new_ids[found]
    for col, add in zip(columns, new_columns, strict=True):
        col[pos[found]] += add[found]  # ids are unique: no position repeats
    fresh = ~found
    if fresh.any():
        at = pos[fresh]
        ids = np.insert(ids, at, new_ids[fresh])
        columns = [np.insert(c, at, a[fresh]) for c, a in zip(columns, new_columns, strict=True)]
    return ids, columns


class CaptionTally:
    """Per caption id: intrinsic reward paid and sightings (steps the caption was seen) over the
    run, and the reward paid in each of the last ``window`` batches.

    Vectorised: one ``np.unique`` and two ``bincount`` per batch, merged into sorted arrays.
    """

    def __init__(self, window: int):
        self.ids = np.zeros(0, dtype=np.uint64)
        self.paid = np.zeros(0, dtype=np.float64)
        self.seen = np.zeros(0, dtype=np.int64)
        self.window: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=window)

    def add(self, caption_ids: np.ndarray, intrinsic: np.ndarray) -> None:
        """Count one batch: ``caption_ids`` and the intrinsic reward paid, same shape."""
        present = caption_ids != 0
        ids, inv = np.unique(caption_ids[present], return_inverse=True)
        paid = np.bincount(inv, weights=intrinsic[present].astype(np.float64), minlength=ids.size)
        seen = np.bincount(inv, minlength=ids.size).astype(np.int64)
        self.window.append((ids, paid))
        if ids.size:
            self.ids, (self.paid, self.seen) = _merge_sorted(
                self.ids, [self.paid, self.seen], ids, [paid, seen]
            )

    def window_paid(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted caption ids and the reward each was paid over the window's batches."""
        if not self.window:
            return np.zeros(0, dtype=np.uint64), np.zeros(0)
        ids, inv = np.unique(np.concatenate([w[0] for w in self.window]), return_inverse=True)
        paid = np.bincount(inv, weights=np.concatenate([w[1] for w in self.window]))
        return ids, paid.astype(np.float64)

    def top_share(self) -> tuple[float, int]:
        """The share of the window's (positive) intrinsic reward that its top caption earned,
        and that caption's id; ``(0.0, 0)`` when nothing was paid."""
        ids, paid = self.window_paid()
        positive = np.maximum(paid, 0.0)
        total = float(positive.sum())
        if total <= 0.0:
            return 0.0, 0
        k = int(np.argmax(positive))
        return float(positive[k]) / total, int(ids[k])

    def state_dict(self) -> dict[str, Any]:
        """Lifetime totals and the window, for the learner's checkpoint."""
        return {
            "ids": self.ids.copy(),
            "paid": self.paid.copy(),
            "seen": self.seen.copy(),
            "window": [(i.copy(), p.copy()) for i, p in self.window],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`. Copies: the totals are added to in place, and
        arrays that came through Ray's object store are read-only."""
        self.ids = np.array(state["ids"], dtype=np.uint64)
        self.paid = np.array(state["paid"], dtype=np.float64)
        self.seen = np.array(state["seen"], dtype=np.int64)
        self.window.clear()
        self.window.extend(
            (np.array(i, dtype=np.uint64), np.array(p, dtype=np.float64))
            for i, p in state["window"]
        )


class IntrinsicReward:
    """Caption registry, per-snapshot reward cache, per-episode intrinsic returns and the
    per-caption tally of what was paid (``share_window``: batches in the top-share window)."""

    def __init__(self, cfg: RewardConfig, return_window: int = 100, share_window: int = 10):
        self.cfg = cfg
        self.tally = CaptionTally(share_window)
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
        """The training reward ``[T, N]`` and its intrinsic part (already weighted by ``c_int``).

        The raw extrinsic reward is clipped to ``[-clip_ext, clip_ext]`` before ``c_ext``.
        """
        if self.cfg.clip_ext is not None:
            rewards = np.clip(rewards, -self.cfg.clip_ext, self.cfg.clip_ext)
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

    # -- what was paid, per caption (the reward-hacking report) --------------------------------
    def record(self, caption_ids: np.ndarray, intrinsic: np.ndarray) -> dict[str, float]:
        """Count one batch's payouts per caption; returns ``intrinsic_top_caption_share`` (the
        share of the window's intrinsic reward its top caption earned), nothing for
        ``reward.kind=none``."""
        if not self.enabled:
            return {}
        self.tally.add(caption_ids, intrinsic)
        return {"intrinsic_top_caption_share": self.tally.top_share()[0]}

    def table(self, rows: int = TABLE_ROWS) -> dict[str, Any]:
        """JSON-ready report: totals, the window's top caption, and the ``rows`` captions that
        earned most (paid, sightings, reward paid in the window, current ``r_int``)."""
        tally = self.tally
        order = np.lexsort((-tally.seen, -tally.paid))[:rows]  # most paid first, then most seen
        ids = tally.ids[order]
        known = np.array([int(i) in self.texts for i in ids], dtype=bool)
        r_int = np.full(ids.shape, np.nan)
        if self.snapshot is not None and known.any():
            r_int[known] = self.caption_rewards(ids[known])
        w_ids, w_paid = tally.window_paid()
        window = np.zeros(ids.shape)
        if w_ids.size:
            pos = np.minimum(np.searchsorted(w_ids, ids), w_ids.size - 1)
            hit = w_ids[pos] == ids
            window[hit] = w_paid[pos[hit]]
        share, top = tally.top_share()
        return {
            "reward_kind": self.cfg.kind,
            "c_int": self.cfg.c_int,
            "beta": self.cfg.beta,
            "snapshot_version": self.snapshot_version,
            "captions_total": int(tally.ids.size),
            "paid_total": float(tally.paid.sum()),
            "window_batches": len(tally.window),
            "window_paid_total": float(np.maximum(w_paid, 0.0).sum()),
            "window_top_share": share,
            "window_top_id": top,
            "window_top_text": self.texts.get(top) if top else None,
            "captions": [
                {
                    "id": int(cid),
                    "text": self.texts.get(int(cid)),
                    "paid": float(paid),
                    "sightings": int(seen),
                    "window_paid": float(wp),
                    "r_int": None if np.isnan(r) else float(r),
                }
                for cid, paid, seen, wp, r in zip(
                    ids, tally.paid[order], tally.seen[order], window, r_int, strict=True
                )
            ],
        }

    def state_dict(self) -> dict[str, Any]:
        """The tally, the texts of its captions (a resumed run may not see them again) and the
        window of episode intrinsic returns."""
        texts = {int(i): self.texts[int(i)] for i in self.tally.ids if int(i) in self.texts}
        return {
            "tally": self.tally.state_dict(),
            "texts": texts,
            "returns": list(self.intrinsic_returns),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the tally, its texts and the window of episode
        intrinsic returns (``intrinsic_return_mean``; older checkpoints: empty). Episodes in
        progress are not kept: a resumed run starts new ones."""
        self.tally.load_state_dict(state["tally"])
        self.register(state["texts"])
        self.intrinsic_returns.clear()
        self.intrinsic_returns.extend(float(r) for r in state.get("returns", ()))
