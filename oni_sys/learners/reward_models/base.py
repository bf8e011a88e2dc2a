"""The reward-model interface, the snapshot base class and the bounded dataset of labels.

A :class:`RewardModel` learns from the annotator's labels (or preferences) and publishes frozen,
versioned :class:`RewardSnapshot` objects that the policy learner evaluates once per unique
caption id. Labels live in a :class:`BoundedStore` of at most ``cfg.max_dataset`` unique
records, each in a fixed train or held-back split (:func:`held_out_mask`).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oni_sys.config import RewardConfig
from oni_sys.contracts import LabelRecord, PreferenceRecord

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
_MASK64 = (1 << 64) - 1
_SPLIT_SALT = 0x5EED_0F_0A11_CAFE  # fixed: the split must agree on every node and in every run


def _mix_int(x: int) -> int:
    """splitmix64 finaliser on a Python int (pair keys)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised over a uint64 array (wrap-around is intended)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def as_caption_ids(ids: Any) -> np.ndarray:
    """Caption ids as a uint64 array (int64 arrays are reinterpreted, not converted)."""
    arr = np.asarray(ids)
    if arr.dtype == np.uint64:
        return arr.reshape(-1)
    if arr.dtype.kind == "i":
        return arr.astype(np.int64, copy=False).view(np.uint64).reshape(-1)
    return np.array([int(i) & _MASK64 for i in arr.reshape(-1).tolist()], dtype=np.uint64)


def held_out_mask(ids: Any, fraction: float) -> np.ndarray:
    """Which caption ids belong to the held-back split (deterministic in the id alone)."""
    u = as_caption_ids(ids)
    if fraction <= 0.0:
        return np.zeros(u.shape, dtype=bool)
    unit = (_mix_array(u ^ np.uint64(_SPLIT_SALT)) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return unit < fraction


@dataclass(frozen=True, eq=False)
class RewardSnapshot:
    """A frozen, picklable, CPU reward function of captions. Version 0: nothing learned, all 0."""

    version: int  # 0 = nothing learned yet
    kind: str

    def rewards(self, ids: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """``r_int`` (float32) for unique caption ids [K] with their texts [K]."""
        return np.zeros(len(as_caption_ids(ids)), dtype=np.float32)

    def _check(self, ids: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        u = as_caption_ids(ids)
        if len(texts) != len(u):
            raise ValueError(f"{len(u)} caption ids but {len(texts)} texts")
        return u


class BoundedStore:
    """Unique records keyed by a 64-bit key: O(1) insert, replace, evict and uniform sampling.

    Each record has a *group* (eviction evicts the oldest record of the largest group) and a
    split (0 train, 1 held back). Slots are reused, and everything that decides which record a
    sample picks is part of :meth:`state`, so a restored store samples exactly as the original.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.evicted = 0
        self._slot_of: dict[int, int] = {}
        self._keys: list[int] = []  # per slot; -1 for a free slot
        self._records: list[tuple | None] = []
        self._group: list[int] = []
        self._split: list[int] = []
        self._pos: list[int] = []  # index of the slot inside its split list
        self._splits: tuple[list[int], list[int]] = ([], [])
        self._free: list[int] = []
        self._fifo: dict[int, OrderedDict[int, None]] = {}

    def __len__(self) -> int:
        return len(self._slot_of)

    def split_size(self, split: int) -> int:
        return len(self._splits[split])

    def group_size(self, group: int) -> int:
        return len(self._fifo.get(group, ()))

    def put(self, key: int, record: tuple, group: int, held: bool) -> bool:
        """Insert or replace; returns True if the key is new."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._records[slot] = record
            old = self._group[slot]
            del self._fifo[old][key]
            self._fifo.setdefault(group, OrderedDict())[key] = None  # relabelled: fresh again
            self._group[slot] = group
            return False
        while len(self) >= self.capacity:
            self._evict_one()
        split = 1 if held else 0
        if self._free:
            slot = self._free.pop()
            self._keys[slot], self._records[slot] = key, record
            self._group[slot], self._split[slot] = group, split
            self._pos[slot] = len(self._splits[split])
        else:
            slot = len(self._keys)
            self._keys.append(key)
            self._records.append(record)
            self._group.append(group)
            self._split.append(split)
            self._pos.append(len(self._splits[split]))
        self._splits[split].append(slot)
        self._slot_of[key] = slot
        self._fifo.setdefault(group, OrderedDict())[key] = None
        return True

    def _evict_one(self) -> None:
        # Largest group first (ties: the lowest group id, i.e. negatives before positives).
        group = max(sorted(self._fifo), key=lambda g: len(self._fifo[g]))
        key, _ = self._fifo[group].popitem(last=False)
        slot = self._slot_of.pop(key)
        members = self._splits[self._split[slot]]
        last = members.pop()  # swap-remove: move the last slot of the split into the hole
        if last != slot:
            members[self._pos[slot]] = last
            self._pos[last] = self._pos[slot]
        self._keys[slot], self._records[slot] = -1, None
        self._free.append(slot)
        self.evicted += 1
        if self.evicted == 1:
            logger.info(
                "reward dataset reached %d records; evicting the oldest of the largest group",
                self.capacity,
            )

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        """``n`` training slots, uniformly with replacement."""
        train = self._splits[0]
        return [train[i] for i in rng.integers(0, len(train), size=n).tolist()]

    def slots(self, split: int) -> list[int]:
        return list(self._splits[split])

    def key(self, slot: int) -> int:
        return self._keys[slot]

    def record(self, slot: int) -> tuple:
        return self._records[slot]  # type: ignore[return-value]

    def column(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys (uint64) and field ``index`` of every record (float32), in slot order."""
        slots = self._splits[0] + self._splits[1]
        keys = np.fromiter((self._keys[s] for s in slots), np.uint64, len(slots))
        values = np.fromiter((self._records[s][index] for s in slots), np.float32, len(slots))
        return keys, values

    def state(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "evicted": self.evicted,
            "keys": list(self._keys),
            "records": list(self._records),
            "group": list(self._group),
            "split": list(self._split),
            "pos": list(self._pos),
            "splits": [list(self._splits[0]), list(self._splits[1])],
            "free": list(self._free),
            "fifo": [[g, list(q)] for g, q in self._fifo.items()],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.evicted = int(state["evicted"])
        self._keys = list(state["keys"])
        self._records = [None if r is None else tuple(r) for r in state["records"]]
        self._group = list(state["group"])
        self._split = list(state["split"])
        self._pos = list(state["pos"])
        self._splits = (list(state["splits"][0]), list(state["splits"][1]))
        self._free = list(state["free"])
        self._fifo = {int(g): OrderedDict((k, None) for k in q) for g, q in state["fifo"]}
        self._slot_of = {k: s for s, k in enumerate(self._keys) if k != -1}
        while len(self) > self.capacity:  # a smaller max_dataset on resume
            self._evict_one()


class LabelData:
    """Labelled captions: record = (text, label, probability), keyed by caption id."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.store = BoundedStore(cfg.max_dataset)

    def add(self, items: Sequence[LabelRecord]) -> int:
        items = list(items)
        if not items:
            return 0
        ids = [int(it.caption_id) & _MASK64 for it in items]
        held = held_out_mask(np.array(ids, dtype=np.uint64), self.cfg.held_out_fraction)
        new = 0
        for cid, record, h in zip(ids, items, held.tolist()):
            text, label, prob = record.text, int(record.label), record.probability
            if label not in (0, 1):
                raise ValueError(f"caption {cid}: label must be 0 or 1, got {label!r}")
            if cid == 0:
                continue  # id 0 means "no caption"
            p = float(label) if prob is None or not math.isfinite(float(prob)) else float(prob)
            new += self.store.put(cid, (str(text), label, min(max(p, 0.0), 1.0)), label, h)
        return new


class PairData:
    """Preference pairs: record = (id_a, text_a, id_b, text_b, P(a better than b)), id_a < id_b."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.store = BoundedStore(cfg.max_dataset)

    def add(self, items: Sequence[PreferenceRecord]) -> int:
        items = list(items)
        if not items:
            return 0
        a_ids = [int(it.id_a) & _MASK64 for it in items]
        b_ids = [int(it.id_b) & _MASK64 for it in items]
        frac = self.cfg.held_out_fraction
        held = held_out_mask(np.array(a_ids, np.uint64), frac) | held_out_mask(
            np.array(b_ids, np.uint64), frac
        )
        new = 0
        for a, b, record, h in zip(a_ids, b_ids, items, held.tolist()):
            ta, tb, p = record.text_a, record.text_b, float(record.preference)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"pair ({a}, {b}): preference must be in [0, 1], got {p!r}")
            if a == b or a == 0 or b == 0:
                continue  # a caption against itself carries no preference
            if a > b:  # one orientation per pair, so (a, b) and (b, a) are the same record
                a, b, ta, tb, p = b, a, tb, ta, 1.0 - p
            key = _mix_int(_mix_int(a) ^ b)
            new += self.store.put(key, (a, str(ta), b, str(tb), p), 0, h)
        return new


class RewardModel:
    """Base: the dataset, the learner state and the version counter of one reward model."""

    kind: str = "none"

    def __init__(self, cfg: RewardConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.version = 0
        self.num_updates = 0

    def add_labels(self, items: Sequence[LabelRecord]) -> int:
        """Add labels; returns how many captions were new."""
        return 0

    def add_preferences(self, items: Sequence[PreferenceRecord]) -> int:
        """Add preferences; only ranking uses them."""
        return 0

    def update(self) -> dict[str, float]:
        """One optimisation step on a minibatch (empty dict when there is nothing to learn)."""
        return {}

    def _learned(self) -> bool:
        return self.num_updates > 0

    def _make_snapshot(self, version: int) -> RewardSnapshot:
        raise NotImplementedError

    def snapshot(self) -> RewardSnapshot:
        """A new frozen snapshot with the next version (version 0 while nothing is learned)."""
        if not self._learned():
            return RewardSnapshot(version=0, kind=self.kind)
        self.version += 1
        return self._make_snapshot(self.version)

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _check_state(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT or state.get("kind") != self.kind:
            raise ValueError(
                f"cannot load a {state.get('kind')!r} reward state (format {state.get('format')}) "
                f"into a {self.kind!r} model (format {STATE_FORMAT})"
            )
        saved = state.get("held_out_fraction", self.cfg.held_out_fraction)
        if saved != self.cfg.held_out_fraction:
            # Stored records keep their split; only new captions use the new fraction.
            logger.warning(
                "reward.held_out_fraction changed from %s to %s since the checkpoint; stored "
                "labels keep their split",
                saved,
                self.cfg.held_out_fraction,
            )
