"""Intrinsic reward models learned online from an LLM's labels of captions (ONI's reward side).

Four kinds behind one interface (:class:`RewardModel`), each publishing frozen, versioned
:class:`RewardSnapshot` objects that the policy learner evaluates once per unique caption id:

- ``hashing`` (ONI-Retrieval): caption id -> its stored label (or probability); unlabelled -> 0.
- ``classification`` (ONI-Classification): a text encoder + MLP trained with cross-entropy on the
  labels; reward = P(label 1), or that probability thresholded to 0/1.
- ``ranking`` (ONI-Ranking / online Motif): the same encoder with a scalar head, trained with a
  Bradley-Terry loss on pairwise preferences; rewards are normalised by running mean/std of the
  model's outputs and then thresholded.
- ``ensemble``: K classification or ranking members with seeds ``seed .. seed+K-1``, each
  trained on every label; reward = mean - ``ensemble_pessimism`` * std across members.

docs/ALGORITHM.md §8 explains the design choices.
"""

from __future__ import annotations

from oni_sys.config import RewardConfig
from oni_sys.learners.reward_models.base import (
    STATE_FORMAT,
    BoundedStore,
    LabelData,
    PairData,
    RewardModel,
    RewardSnapshot,
    as_caption_ids,
    held_out_mask,
)
from oni_sys.learners.reward_models.classification import (
    ClassificationReward,
    ClassificationSnapshot,
)
from oni_sys.learners.reward_models.ensemble import EnsembleReward, EnsembleSnapshot
from oni_sys.learners.reward_models.hashing import HashingReward, HashingSnapshot
from oni_sys.learners.reward_models.network import NetworkSnapshot
from oni_sys.learners.reward_models.ranking import RankingReward, RankingSnapshot
from oni_sys.learners.reward_models.text_scorer import TextScorer, tokenise

__all__ = [
    "STATE_FORMAT",
    "BoundedStore",
    "ClassificationReward",
    "ClassificationSnapshot",
    "EnsembleReward",
    "EnsembleSnapshot",
    "HashingReward",
    "HashingSnapshot",
    "LabelData",
    "NetworkSnapshot",
    "PairData",
    "RankingReward",
    "RankingSnapshot",
    "RewardModel",
    "RewardSnapshot",
    "TextScorer",
    "as_caption_ids",
    "held_out_mask",
    "make_reward_model",
    "tokenise",
]


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
