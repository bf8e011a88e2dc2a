"""Intrinsic reward models learned online from an LLM's labels of captions (ONI's reward side).

Four kinds, one interface (:class:`RewardModel`), each publishing frozen, versioned
:class:`RewardSnapshot` objects that the policy learner evaluates once per unique caption id:

- ``hashing`` (ONI-Retrieval): caption id -> its stored label (or probability); unlabelled -> 0.
- ``classification`` (ONI-Classification): a text encoder + MLP trained with cross-entropy on the
  labels; reward = P(label 1), or that probability thresholded to 0/1.
- ``ranking`` (ONI-Ranking / online Motif): the same encoder with a scalar head, trained with a
  Bradley-Terry loss on pairwise preferences; rewards are normalised by running mean/std of the
  model's outputs and then thresholded, as ONI intended (its release trained on the raw output).
- ``ensemble``: K classification or ranking members with seeds ``seed .. seed+K-1``, each
  trained on every label; reward = mean - ``ensemble_pessimism`` * std across members.

Design choices (the why):

- **Encoder.** A hashed character n-gram bag (n = 3, 4, 5 over lower-cased UTF-8 bytes, with
  start/end markers) -> 32-d embeddings averaged -> MLP (64 hidden) -> one logit: fastText
  (Joulin et al. 2017) with a hidden layer. ONI used a 6-layer char-CNN; a CNN over ~80 bytes
  x 2B texts costs tens of ms per step on a CPU core, and the ensemble multiplies that by K. The
  bag takes ~2-4 ms per classification step of 64 captions on one core (~4-7 ms for 64 ranking
  pairs; sparse gradients and lazy Adam on the table), is tokenised fully vectorised in NumPy,
  and generalises across NetHack's templated messages: ``You kill the <unseen monster>!`` shares
  most of its n-grams (``you``, `` kil``, ``ill t``, ...) with the labelled kills. A max-pool
  added beside the mean was tried: its backward tripled the step cost and it was no more
  accurate, on single messages or on multi-sentence ones.
- **Classification targets.** The hard label, not the annotator's probability: the label is the
  annotator's decision (its own threshold applied), the small LLM's probabilities are poorly
  calibrated, and it is what ONI trained on. ``cfg.output`` then picks the model's probability or
  ``probability >= cfg.threshold`` as the reward.
- **Bounded dataset.** At most ``cfg.max_dataset`` unique captions (pairs for ranking).
  Past that, the oldest record of the most numerous group is evicted (groups: the label for
  classification/hashing, so the rare positive captions that carry the reward signal are not
  pushed out by a flood of "You hear ..." negatives while they are the minority; one FIFO for
  preference pairs). The price: once full, the training set drifts toward class balance, which
  raises the classifier's positive rate (``cfg.threshold`` controls sparsity). A relabelled
  caption replaces its record and counts as fresh.
- **Held-back split.** A caption is held back iff ``splitmix64(id ^ salt) / 2^64 <
  held_out_fraction``: deterministic, identical on every node and across runs, so a caption is
  always in the same split. A preference pair is held back if either caption is, so held-back
  captions never reach training. Hashing keeps every label in its lookup (holding labels back
  would only withhold reward); its ``evaluate`` answers held-back captions as if unseen.
- **Ranking normalisation.** Running mean/variance of the model's outputs on its training
  minibatches (both captions of each pair), with the past's weight capped at ``NORM_WINDOW``
  outputs so the statistics follow the weights as they change. They are part of the state and
  frozen into each snapshot; the snapshot exposes raw, normalised and final rewards.
- **Version 0** means "nothing learned yet" and always gives zero rewards; :meth:`snapshot`
  returns it (without counting) until the model has a label (hashing) or an update (networks).
- **Empty captions and id 0** ("no caption") always earn exactly 0.
- **Threads.** Steps this small run best on one torch thread (``runtime.torch_threads=1``); with
  two intra-op threads on a busy 2-core machine a step was measured 5-10x slower.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oni_sys.config import RewardConfig
from oni_sys.envs.captions import normalise_caption

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
_MASK64 = (1 << 64) - 1
_SPLIT_SALT = 0x5EED_0F_0A11_CAFE  # fixed: the split must agree on every node and in every run

# Encoder hyper-parameters (recorded in the state; a checkpoint from other values is refused).
NGRAMS = (3, 4, 5)
MAX_BYTES = 256  # NetHack's message line is at most 256 characters
BUCKETS = 1 << 15  # hashed n-gram vocabulary; 32k x 32 floats = 4 MB per model
EMBED_DIM = 32
HIDDEN = 64
NORM_WINDOW = 4096  # ranking: outputs the running mean/std remember (~32 updates of batch 64)
_CHUNK = 1024  # texts per forward pass when scoring many captions


# ----------------------------------------------------------------------------------------------
# hashing helpers
# ----------------------------------------------------------------------------------------------


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


def _bootstrap_weights(keys: np.ndarray, salt: int | None) -> torch.Tensor | None:
    """Double-or-nothing online bootstrap (Osband et al. 2016): each member keeps a fixed half."""
    if salt is None:
        return None
    bit = _mix_array(keys ^ np.uint64(_mix_int(salt))) >> np.uint64(63)
    return torch.from_numpy(bit.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# the text encoder
# ----------------------------------------------------------------------------------------------

_NGRAM_SEEDS = {n: np.uint64(_mix_int(1000 + n)) for n in NGRAMS}
_FNV_PRIME = np.uint64(0x100000001B3)


def _encode_bytes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> zero-padded byte matrix [K, L] and lengths [K] (with \\x02/\\x03 boundary marks)."""
    raw = [
        b"\x02"
        + normalise_caption(t).lower().encode("utf-8", "replace").replace(b"\0", b" ")[:MAX_BYTES]
        + b"\x03"
        for t in texts
    ]
    lengths = np.fromiter((len(b) for b in raw), dtype=np.int64, count=len(raw))
    width = int(lengths.max()) if len(raw) else 0
    buf = b"".join(b.ljust(width, b"\0") for b in raw)
    return np.frombuffer(buf, dtype=np.uint8).reshape(len(raw), width), lengths


def tokenise(texts: Sequence[str]) -> torch.Tensor:
    """Hashed character n-gram ids [K, N] (int64, 0 = padding), fully vectorised over the batch."""
    arr, lengths = _encode_bytes(texts)
    k, width = arr.shape
    a = arr.astype(np.uint64)
    parts = []
    for n in NGRAMS:
        w = width - n + 1
        if w <= 0:
            continue
        h = np.full((k, w), _NGRAM_SEEDS[n], dtype=np.uint64)
        for j in range(n):  # FNV-1a over the n bytes of every window at once
            h ^= a[:, j : j + w]
            h *= _FNV_PRIME
        h = _mix_array(h)  # FNV's low bits are weak; mix before taking the bucket
        idx = (h % np.uint64(BUCKETS - 1)).astype(np.int64) + 1
        idx[np.arange(w)[None, :] + n > lengths[:, None]] = 0  # windows running into padding
        parts.append(idx)
    if not parts:
        return torch.zeros((k, 1), dtype=torch.int64)
    return torch.from_numpy(np.concatenate(parts, axis=1))


def _score(p: Mapping[str, torch.Tensor], ids: torch.Tensor, sparse: bool = False) -> torch.Tensor:
    """One scalar per text: mean of its n-gram embeddings -> MLP. ids [K, N] -> [K]."""
    # [K, N, D]; padding rows are 0. A sparse gradient touches only the ~1-2k rows in the batch.
    e = F.embedding(ids, p["emb.weight"], padding_idx=0, sparse=sparse)
    mean = e.sum(1) / (ids > 0).sum(1, keepdim=True).clamp(min=1)  # no n-gram: pools to 0
    h = F.relu(F.linear(mean, p["fc1.weight"], p["fc1.bias"]))
    return F.linear(h, p["fc2.weight"], p["fc2.bias"]).squeeze(-1)


class TextScorer(nn.Module):
    """The trainable network behind :func:`_score` (parameters named as ``_score`` reads them)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(BUCKETS, EMBED_DIM, padding_idx=0)
        self.fc1 = nn.Linear(EMBED_DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, 1)
        # Small embeddings: n-grams never trained on (unseen monsters) should add little noise.
        nn.init.normal_(self.emb.weight, std=0.1)
        with torch.no_grad():
            self.emb.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _score(dict(self.named_parameters()), ids, sparse=True)


def _valid_captions(ids: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """Entries that can earn a reward: a real caption id and a non-blank text."""
    return (ids != 0) & np.fromiter((bool(t and t.strip()) for t in texts), bool, len(texts))


@torch.no_grad()
def _forward_texts(
    params: Sequence[Mapping[str, torch.Tensor]], texts: Sequence[str]
) -> np.ndarray:
    """Raw scores [M, K] of K texts under M parameter sets: tokenised once, in bounded chunks."""
    out = np.zeros((len(params), len(texts)), dtype=np.float32)
    for start in range(0, len(texts), _CHUNK):
        chunk = texts[start : start + _CHUNK]
        tokens = tokenise(chunk)
        for i, p in enumerate(params):
            out[i, start : start + len(chunk)] = _score(p, tokens).numpy()
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# snapshots (what the policy learner receives)
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# the bounded dataset
# ----------------------------------------------------------------------------------------------


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

    def add(self, items: Sequence[tuple[int, str, int, float]]) -> int:
        items = list(items)
        if not items:
            return 0
        ids = [int(it[0]) & _MASK64 for it in items]
        held = held_out_mask(np.array(ids, dtype=np.uint64), self.cfg.held_out_fraction)
        new = 0
        for cid, (_, text, label, prob), h in zip(ids, items, held.tolist()):
            label = int(label)
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

    def add(self, items: Sequence[tuple[int, str, int, str, float]]) -> int:
        items = list(items)
        if not items:
            return 0
        a_ids = [int(it[0]) & _MASK64 for it in items]
        b_ids = [int(it[2]) & _MASK64 for it in items]
        frac = self.cfg.held_out_fraction
        held = held_out_mask(np.array(a_ids, np.uint64), frac) | held_out_mask(
            np.array(b_ids, np.uint64), frac
        )
        new = 0
        for a, b, (_, ta, _, tb, p), h in zip(a_ids, b_ids, items, held.tolist()):
            p = float(p)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"pair ({a}, {b}): preference must be in [0, 1], got {p!r}")
            if a == b or a == 0 or b == 0:
                continue  # a caption against itself carries no preference
            if a > b:  # one orientation per pair, so (a, b) and (b, a) are the same record
                a, b, ta, tb, p = b, a, tb, ta, 1.0 - p
            key = _mix_int(_mix_int(a) ^ b)
            new += self.store.put(key, (a, str(ta), b, str(tb), p), 0, h)
        return new


# ----------------------------------------------------------------------------------------------
# reward models
# ----------------------------------------------------------------------------------------------


class RewardModel:
    """Base: the dataset, the learner state and the version counter of one reward model."""

    kind: str = "none"

    def __init__(self, cfg: RewardConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.version = 0
        self.num_updates = 0

    def add_labels(self, items: Sequence[tuple[int, str, int, float]]) -> int:
        """Add ``(caption_id, text, label, P(label 1))``; returns how many captions were new."""
        return 0

    def add_preferences(self, items: Sequence[tuple[int, str, int, str, float]]) -> int:
        """Add ``(id_a, text_a, id_b, text_b, P(a better than b))``; only ranking uses them."""
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


class HashingReward(RewardModel):
    """ONI-Retrieval: the label (or probability) stored for the exact caption; unlabelled -> 0."""

    kind = "hashing"

    def __init__(self, cfg: RewardConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self._data = LabelData(cfg)
        self._table: tuple[np.ndarray, np.ndarray] | None = None  # cached sorted lookup

    def add_labels(self, items: Sequence[tuple[int, str, int, float]]) -> int:
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


class ClassificationReward(_NetworkReward):
    """ONI-Classification: P(label 1 | caption) from the n-gram encoder, hard-label BCE."""

    kind = "classification"

    def __init__(self, cfg: RewardConfig, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self._data = LabelData(cfg)

    def add_labels(self, items: Sequence[tuple[int, str, int, float]]) -> int:
        return self._data.add(items)

    def update(self) -> dict[str, float]:
        store = self._data.store
        if store.split_size(0) == 0:
            return {}
        slots = store.sample(self._rng, self.cfg.batch_size)
        records = [store.record(s) for s in slots]
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

    def add_preferences(self, items: Sequence[tuple[int, str, int, str, float]]) -> int:
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
        store = self._data.store
        if store.split_size(0) == 0:
            return {}
        slots = store.sample(self._rng, self.cfg.batch_size)
        records = [store.record(s) for s in slots]
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


class EnsembleReward(RewardModel):
    """K members of ``cfg.member`` (seeds seed..seed+K-1) sharing one dataset.

    Members differ in initialisation and minibatch order (their own RNG), so they agree where
    the labels pin the answer down and disagree on captions unlike any labelled one: the
    uncertainty a pessimistic reward should discount. The snapshot combines the members'
    continuous scores as ``mean - ensemble_pessimism * std`` and only then applies the member
    kind's output rule.

    ``bootstrap=True`` instead gives each member a fixed random half of the data
    (double-or-nothing online bootstrap, Osband et al. 2016). It is off by default: with the
    few rare positive captions that carry ONI's signal, each of them is withheld from about
    half the members, which then score it ~0. Measured on KeyDoor (K=3, 150k steps, seeds
    0-2): the mean ensemble reached the goal on 2/3 seeds and the ``mean - 1 * std`` one on 0/3,
    against 3/3 for one classifier (docs/PERFORMANCE.md, Ensembles). Deep ensembles trained on
    all the data with different initialisations are also what Lakshminarayanan et al. (2017)
    found better calibrated than bagged ones.
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

    def add_labels(self, items: Sequence[tuple[int, str, int, float]]) -> int:
        return self.members[0].add_labels(items)

    def add_preferences(self, items: Sequence[tuple[int, str, int, str, float]]) -> int:
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


def make_reward_model(cfg: RewardConfig, seed: int = 0) -> RewardModel:
    """The reward model for ``cfg.kind``; ``none`` has no model (ValueError)."""
    kinds: dict[str, type[RewardModel]] = {
        "hashing": HashingReward,
        "classification": ClassificationReward,
        "ranking": RankingReward,
        "ensemble": EnsembleReward,
    }
    if cfg.kind not in kinds:
        raise ValueError(
            f"reward.kind={cfg.kind!r} has no reward model; choose one of {', '.join(kinds)}"
        )
    return kinds[cfg.kind](cfg, seed)
