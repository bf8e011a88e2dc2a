"""K classification or ranking members on one dataset; reward = mean - pessimism * std."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oni_sys.config import RewardConfig
from oni_sys.contracts import LabelRecord, PreferenceRecord
from oni_sys.learners.reward_models.base import STATE_FORMAT, RewardModel, RewardSnapshot
from oni_sys.learners.reward_models.classification import ClassificationReward
from oni_sys.learners.reward_models.network import (
    NetworkSnapshot,
    _member_scores,
    _NetworkReward,
    _valid_captions,
)
from oni_sys.learners.reward_models.ranking import RankingReward


@dataclass(frozen=True, eq=False)
class EnsembleSnapshot(RewardSnapshot):
    """K member snapshots; reward = finish(mean - pessimism * std) over the members' scores."""

    members: tuple[NetworkSnapshot, ...]
    pessimism: float

    def member_scores(self, ids: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """[K_members, K] scores: probabilities (classification) or normalised values (ranking)."""
        return _member_scores(self.members, self._check(ids, texts), texts)

    def combined_scores(self, ids: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """Pessimistic score: mean - pessimism * std across members (before the output rule)."""
        s = self.member_scores(ids, texts)
        return (s.mean(0) - self.pessimism * s.std(0)).astype(np.float32)

    def rewards(self, ids: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        u = self._check(ids, texts)
        out = self.members[0].finish(self.combined_scores(u, texts))
        return np.where(_valid_captions(u, texts), out, 0.0).astype(np.float32)


class EnsembleReward(RewardModel):
    """K members of ``cfg.member`` (seeds seed..seed+K-1) sharing one dataset.

    Members differ in initialisation and minibatch order (their own RNG), so they agree where
    the labels pin the answer down and disagree on captions unlike any labelled one: the
    uncertainty a pessimistic reward should discount. The snapshot combines the members'
    continuous scores as ``mean - ensemble_pessimism * std`` and only then applies the member
    kind's output rule.

    ``bootstrap=True`` instead gives each member a fixed random half of the data
    (double-or-nothing online bootstrap); it is off by default (docs/ALGORITHM.md §8 says why).
    """

    kind = "ensemble"

    def __init__(self, cfg: RewardConfig, seed: int = 0, bootstrap: bool = False) -> None:
        super().__init__(cfg, seed)
        member_cls = {"classification": ClassificationReward, "ranking": RankingReward}[cfg.member]
        self.members: list[_NetworkReward] = [
            member_cls(cfg, self.seed + i) for i in range(cfg.ensemble_size)
        ]
        shared = self.members[0]._data
        for i, m in enumerate(self.members):
            m._data = shared  # one dataset for all: the members only sample it differently
            if bootstrap and cfg.ensemble_size > 1:
                m.bootstrap_salt = self.seed + i

    def add_labels(self, items: Sequence[LabelRecord]) -> int:
        return self.members[0].add_labels(items)

    def add_preferences(self, items: Sequence[PreferenceRecord]) -> int:
        return self.members[0].add_preferences(items)

    def _learned(self) -> bool:
        return all(m.num_updates > 0 for m in self.members)

    def update(self) -> dict[str, float]:
        stats = [m.update() for m in self.members]
        if not all(stats):
            return {}
        self.num_updates += 1
        out = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
        return out

    def _make_snapshot(self, version: int) -> EnsembleSnapshot:
        return EnsembleSnapshot(
            version=version,
            kind=self.kind,
            members=tuple(m._make_snapshot(version) for m in self.members),  # type: ignore[misc]
            pessimism=self.cfg.ensemble_pessimism,
        )

    def evaluate(self) -> dict[str, float]:
        """The combined (pessimistic) reward's accuracy/agreement on held-back data, and spread."""
        first = self.members[0]
        member_evals = [m.evaluate() for m in self.members]
        out = {k: v for k, v in member_evals[0].items() if k.startswith(("num_", "evicted"))}
        out["updates"] = float(self.num_updates)
        metric = "accuracy" if self.cfg.member == "classification" else "pairwise_agreement"
        out[f"member_{metric}_mean"] = float(np.mean([e[metric] for e in member_evals]))
        snap = self._make_snapshot(self.version)
        store = first._data.store
        slots = store.slots(1)
        if self.cfg.member == "classification":
            records = [store.record(s) for s in slots]
            ids = np.array([store.key(s) for s in slots], dtype=np.uint64)
            texts = [r[0] for r in records]
            if records:
                s = snap.member_scores(ids, texts)
                combined = s.mean(0) - self.cfg.ensemble_pessimism * s.std(0)
                y = np.array([r[1] for r in records]) > 0.5
                out["accuracy"] = float(((combined >= self.cfg.threshold) == y).mean())
                out["spread"] = float(s.std(0).mean())
            else:
                out["accuracy"] = out["spread"] = float("nan")
        else:
            records = [store.record(s) for s in slots if store.record(s)[4] != 0.5]
            if records:
                b = len(records)
                ids = np.array([r[0] for r in records] + [r[2] for r in records], np.uint64)
                texts = [r[1] for r in records] + [r[3] for r in records]
                s = snap.member_scores(ids, texts)
                combined = s.mean(0) - self.cfg.ensemble_pessimism * s.std(0)
                want = np.array([r[4] > 0.5 for r in records])
                out["pairwise_agreement"] = float(((combined[:b] > combined[b:]) == want).mean())
                out["spread"] = float(s.std(0).mean())
            else:
                out["pairwise_agreement"] = out["spread"] = float("nan")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "kind": self.kind,
            "member": self.cfg.member,
            "version": self.version,
            "num_updates": self.num_updates,
            "held_out_fraction": self.cfg.held_out_fraction,
            "data": self.members[0]._data.store.state(),
            "members": [m._state(include_data=False) for m in self.members],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        if state["member"] != self.cfg.member or len(state["members"]) != len(self.members):
            raise ValueError(
                f"checkpoint holds {len(state['members'])} {state['member']} members; this "
                f"ensemble has {len(self.members)} {self.cfg.member} members"
            )
        self.version = int(state["version"])
        self.num_updates = int(state["num_updates"])
        for m, ms in zip(self.members, state["members"]):
            m.load_state_dict(ms)
        store = self.members[0]._data.store
        store.capacity = self.cfg.max_dataset
        store.load_state(state["data"])
