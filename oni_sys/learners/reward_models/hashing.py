"""ONI-Retrieval: the label (or probability) stored for the exact caption id; unlabelled -> 0."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oni_sys.config import RewardConfig
from oni_sys.contracts import LabelRecord
from oni_sys.learners.reward_models.base import (
    STATE_FORMAT,
    LabelData,
    RewardModel,
    RewardSnapshot,
    as_caption_ids,
)


@dataclass(frozen=True, eq=False)
class HashingSnapshot(RewardSnapshot):
    """ONI-Retrieval: a sorted id table; lookups are one ``np.searchsorted``."""

    keys: np.ndarray  # sorted uint64 caption ids
    values: np.ndarray  # float32 reward of each key

    def rewards(self, ids: np.ndarray, texts: Sequence[str] = ()) -> np.ndarray:
        """Stored value of each id, exactly 0 for ids never labelled (texts are not needed)."""
        u = as_caption_ids(ids)
        out = np.zeros(u.shape, dtype=np.float32)
        if self.keys.size == 0 or u.size == 0:
            return out
        pos = np.minimum(np.searchsorted(self.keys, u), self.keys.size - 1)
        hit = (self.keys[pos] == u) & (u != 0)
        out[hit] = self.values[pos[hit]]
        return out


class HashingReward(RewardModel):
    """ONI-Retrieval: the label (or probability) stored for the exact caption; unlabelled -> 0."""

    kind = "hashing"

    def __init__(self, cfg: RewardConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self._data = LabelData(cfg)
        self._table: tuple[np.ndarray, np.ndarray] | None = None  # cached sorted lookup

    def add_labels(self, items: Sequence[LabelRecord]) -> int:
        self._table = None  # new or changed values: rebuild the table at the next snapshot
        return self._data.add(items)

    def _learned(self) -> bool:
        return len(self._data.store) > 0 or self.version > 0

    def _make_snapshot(self, version: int) -> HashingSnapshot:
        if self._table is None:
            col = 2 if self.cfg.output == "probability" else 1
            keys, values = self._data.store.column(col)
            order = np.argsort(keys)
            keys, values = keys[order], values[order]
            keys.flags.writeable = values.flags.writeable = False
            self._table = (keys, values)
        return HashingSnapshot(
            version=version, kind=self.kind, keys=self._table[0], values=self._table[1]
        )

    def evaluate(self) -> dict[str, float]:
        """Held-back captions answered as if never labelled (0): what retrieval earns on new text.

        Hashing looks up every label (held-back ones too); this number is the baseline a
        learned model must beat on captions it has not been given.
        """
        store = self._data.store
        labels = np.array([store.record(s)[1] for s in store.slots(1)], dtype=np.float32)
        return {
            "accuracy": float((labels == 0).mean()) if labels.size else float("nan"),
            "num_labels": float(len(store)),
            "num_train": float(store.split_size(0)),
            "num_held_out": float(labels.size),
            "num_positive": float(store.group_size(1)),
            "evicted": float(store.evicted),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "kind": self.kind,
            "version": self.version,
            "num_updates": self.num_updates,
            "held_out_fraction": self.cfg.held_out_fraction,
            "data": self._data.store.state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        self.version = int(state["version"])
        self.num_updates = int(state["num_updates"])
        self._data.store.capacity = self.cfg.max_dataset
        self._data.store.load_state(state["data"])
        self._table = None
