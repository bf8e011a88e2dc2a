"""Shared machinery of the learned reward models (classification and ranking).

:class:`_NetworkReward` owns a :class:`TextScorer`, its optimisers, the minibatch RNG and the
checkpoint state; :class:`NetworkSnapshot` is a frozen copy of the weights that maps a raw output
to a continuous score and then to a reward.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from oni_sys.config import RewardConfig
from oni_sys.learners.reward_models.base import (
    STATE_FORMAT,
    LabelData,
    PairData,
    RewardModel,
    RewardSnapshot,
    _mix_array,
    _mix_int,
)
from oni_sys.learners.reward_models.text_scorer import (
    BUCKETS,
    EMBED_DIM,
    NGRAMS,
    TextScorer,
    _forward_texts,
)


def _valid_captions(ids: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """Entries that can earn a reward: a real caption id and a non-blank text."""
    return (ids != 0) & np.fromiter((bool(t and t.strip()) for t in texts), bool, len(texts))


def _bootstrap_weights(keys: np.ndarray, salt: int | None) -> torch.Tensor | None:
    """Double-or-nothing online bootstrap (Osband et al. 2016): each member keeps a fixed half."""
    if salt is None:
        return None
    bit = _mix_array(keys ^ np.uint64(_mix_int(salt))) >> np.uint64(63)
    return torch.from_numpy(bit.astype(np.float32))


@dataclass(frozen=True, eq=False)
class NetworkSnapshot(RewardSnapshot):
    """A copy of a text model's weights: raw output -> continuous score -> reward."""

    params: dict[str, torch.Tensor]

    def from_raw(self, raw: np.ndarray) -> np.ndarray:
        """Continuous score of a raw output (what an ensemble averages)."""
        raise NotImplementedError

    def finish(self, scores: np.ndarray) -> np.ndarray:
        """Score -> reward (the output rule of the kind)."""
        raise NotImplementedError

    def scores(self, ids: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """Continuous scores [K] (0 for id 0 or blank text)."""
        return _member_scores((self,), self._check(ids, texts), texts)[0]

    def rewards(self, ids: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        u = self._check(ids, texts)
        out = self.finish(_member_scores((self,), u, texts)[0])
        # Masked after the output rule too: with threshold 0, a caption that cannot be scored
        # would otherwise count as label 1.
        return np.where(_valid_captions(u, texts), out, 0.0).astype(np.float32)


def _member_raw(
    members: Sequence[NetworkSnapshot], u: np.ndarray, texts: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Raw outputs [M, K] (0 where invalid) and the validity mask [K]."""
    valid = _valid_captions(u, texts)
    raw = np.zeros((len(members), len(u)), dtype=np.float32)
    if valid.any():
        chosen = [texts[i] for i in np.flatnonzero(valid)]
        raw[:, valid] = _forward_texts([m.params for m in members], chosen)
    return raw, valid


def _member_scores(
    members: Sequence[NetworkSnapshot], u: np.ndarray, texts: Sequence[str]
) -> np.ndarray:
    """Scores [M, K] of every member (0 where invalid)."""
    raw, valid = _member_raw(members, u, texts)
    return np.stack([np.where(valid, m.from_raw(r), 0.0) for m, r in zip(members, raw)]).astype(
        np.float32
    )


class _NetworkReward(RewardModel):
    """Shared machinery of the learned models: network, Adam, minibatch RNG, optional bootstrap."""

    def __init__(self, cfg: RewardConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        with torch.random.fork_rng(devices=[]):  # seed the init without touching global RNG
            torch.manual_seed(self.seed)
            self.net = TextScorer()
        # Lazy (sparse) Adam for the n-gram table (1M weights), so a step costs O(rows in the batch)
        # rather than O(table) and n-grams absent from a batch keep still; Adam for the MLP.
        self.optimizers = {
            "embedding": torch.optim.SparseAdam([self.net.emb.weight], lr=cfg.lr),
            "mlp": torch.optim.Adam(
                [p for n, p in self.net.named_parameters() if n != "emb.weight"], lr=cfg.lr
            ),
        }
        self._rng = np.random.default_rng(self.seed)
        self.bootstrap_salt: int | None = None  # set by EnsembleReward for its members
        self._data: LabelData | PairData

    def _minibatch(self) -> tuple[list[int], list[tuple]] | None:
        """Slots and records of ``reward.batch_size`` training records drawn with replacement
        (None: no training data yet)."""
        store = self._data.store
        if store.split_size(0) == 0:
            return None
        slots = store.sample(self._rng, self.cfg.batch_size)
        return slots, [store.record(s) for s in slots]

    def _step(self, loss: torch.Tensor) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
        self.num_updates += 1

    def _params(self, copy: bool = True) -> dict[str, torch.Tensor]:
        """The weights; a snapshot needs a copy, a read-only evaluation does not."""
        return {
            k: v.detach().clone() if copy else v.detach() for k, v in self.net.named_parameters()
        }

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def _state(self, include_data: bool = True) -> dict[str, Any]:
        state = {
            "format": STATE_FORMAT,
            "kind": self.kind,
            "version": self.version,
            "num_updates": self.num_updates,
            "seed": self.seed,
            "held_out_fraction": self.cfg.held_out_fraction,
            "encoder": {"ngrams": list(NGRAMS), "buckets": BUCKETS, "dim": EMBED_DIM},
            # Copies, not views of the live tensors: the state may be written out while the
            # learner keeps training (a checkpoint thread, a Ray object in flight).
            "net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "optimizers": {
                k: copy.deepcopy(opt.state_dict()) for k, opt in self.optimizers.items()
            },
            "rng": self._rng.bit_generator.state,
            "bootstrap_salt": self.bootstrap_salt,
            **self._extra_state(),
        }
        if include_data:
            state["data"] = self._data.store.state()
        return state

    def state_dict(self) -> dict[str, Any]:
        return self._state(include_data=True)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_state(state)
        enc = state["encoder"]
        if (tuple(enc["ngrams"]), enc["buckets"], enc["dim"]) != (NGRAMS, BUCKETS, EMBED_DIM):
            raise ValueError(f"checkpoint encoder {enc} differs from this code's encoder")
        self.version = int(state["version"])
        self.num_updates = int(state["num_updates"])
        self.seed = int(state["seed"])
        self.net.load_state_dict(state["net"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            for group in opt.param_groups:  # the configured lr wins over the saved one
                group["lr"] = self.cfg.lr
        self._rng.bit_generator.state = state["rng"]
        self.bootstrap_salt = state["bootstrap_salt"]
        self._load_extra_state(state)
        if "data" in state:
            self._data.store.capacity = self.cfg.max_dataset
            self._data.store.load_state(state["data"])

    def _eval_slots(self, split: int, limit: int | None = None) -> list[int]:
        slots = self._data.store.slots(split)
        if limit is not None and len(slots) > limit:  # evenly strided: no RNG draw, no bias
            slots = slots[:: math.ceil(len(slots) / limit)]
        return slots
