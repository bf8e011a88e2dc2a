"""The caption featuriser and scorer: hashed character n-grams -> mean embedding -> MLP.

:func:`tokenise` turns texts into hashed n-gram ids (vectorised in NumPy), :class:`TextScorer`
is the trainable network and :func:`_forward_texts` scores many texts under frozen weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oni_sys.envs.captions import normalise_caption
from oni_sys.learners.reward_models.base import _mix_array, _mix_int

# Encoder hyper-parameters (recorded in the state; a checkpoint from other values is refused).
NGRAMS = (3, 4, 5)
MAX_BYTES = 256  # NetHack's message line is at most 256 characters
BUCKETS = 1 << 15  # hashed n-gram vocabulary; 32k x 32 floats = 4 MB per model
EMBED_DIM = 32
HIDDEN = 64
_CHUNK = 1024  # texts per forward pass when scoring many captions

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
