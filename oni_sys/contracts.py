"""The records the roles exchange, in one module that every role imports and that imports none.

Imports point one way: roles (``envs``, ``models``, ``actors``, ``learners``, ``annotators``)
import this module; the runtimes import the roles; nothing here imports ``oni_sys``. Each record
is a dataclass of numpy arrays, numbers and strings, so it pickles cheaply (Ray's object store,
the serial runtime's direct calls) and says what it carries by name, not by position. The label
records, which travel by the thousand, are typed named tuples: the same names, at the cost and
size of a tuple.

Example::

    from oni_sys.contracts import Fragment

    def steps(fragment: Fragment) -> int:
        return fragment.env_steps
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np

#: observation key of the legal-action mask (Discrete and MultiDiscrete actions)
MASK_KEY = "action_mask"
#: observation key of an agent's policy group (``model.policy_groups``)
GROUP_KEY = "policy_group"


@dataclass
class EnvInterface:
    """The spaces of one environment as the policy sees them.

    ``obs_space`` is the model's input: a flat Dict of arrays, with an ``action_mask`` entry
    when the env gives masks (in its observation, or in ``info["action_mask"]``, which is then
    copied into the observation dict so it travels with it to the learner), and a
    ``policy_group`` entry when agents are split into policy groups.
    """

    obs_space: gym.spaces.Dict
    raw_obs_space: gym.Space
    action_space: gym.Space
    slot_names: tuple[str, ...]
    mask_from_info: bool = False
    #: policy group of each slot (``model.policy_groups``), or None when all share one policy
    slot_groups: tuple[int, ...] | None = None


@dataclass
class FragmentSummary:
    """What the driver needs of a fragment without its arrays (counting, captions, lag)."""

    env_steps: int
    episodes: list[dict[str, float]]
    policy_version: int
    sample_time: float
    new_captions: dict[int, str]
    caption_sightings: dict[int, int]


@dataclass
class Fragment:
    """``T`` steps of ``N`` environments, plus what the learner and annotator need from them.

    ``obs`` and ``first`` have ``T + 1`` rows: the last row is the observation to bootstrap from.
    ``actions`` are ``[T, N, *action_shape]`` (int64 for discrete spaces, float32 for Box).
    ``caption_ids[t]`` is the caption of the observation reached by action ``t`` (0: none) and
    ``caption_counts[t]`` how often that caption has been seen in the episode so far, itself
    included. ``new_captions`` holds the texts this runner has not sent before. ``episodes``
    holds one dict per episode that ended in the fragment (``return``, ``length`` and the env's
    ``episode_extras``).
    """

    obs: dict[str, np.ndarray]
    first: np.ndarray
    actions: np.ndarray
    behaviour_logp: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    bootstrap_values: np.ndarray
    caption_ids: np.ndarray
    caption_counts: np.ndarray
    initial_state: np.ndarray
    policy_version: int  # the oldest weights any step of the fragment was acted with
    runner_index: int
    new_captions: dict[int, str] = field(default_factory=dict)
    episodes: list[dict[str, float]] = field(default_factory=list)
    sample_time: float = 0.0

    def caption_sightings(self) -> dict[int, int]:
        """How often each caption appears in this fragment (id -> count)."""
        ids, counts = np.unique(self.caption_ids[self.caption_ids != 0], return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    @property
    def env_steps(self) -> int:
        """Steps this fragment holds (T x N; with several agents per env, agent steps)."""
        return int(self.actions.shape[0] * self.actions.shape[1])

    def summary(self) -> FragmentSummary:
        """The fragment without its arrays."""
        return FragmentSummary(
            env_steps=self.env_steps,
            episodes=self.episodes,
            policy_version=self.policy_version,
            sample_time=self.sample_time,
            new_captions=self.new_captions,
            caption_sightings=self.caption_sightings(),
        )


@dataclass
class WeightsPacket:
    """Policy weights (CPU tensors) published by the policy learner, with their version (the
    number of updates they result from)."""

    weights: dict[str, Any]
    version: int


class LabelRecord(NamedTuple):
    """One caption's answer from the annotator, for the reward learner."""

    caption_id: int
    text: str
    label: int  # 1: the caption is good for the goal, 0: it is not
    probability: float  # P(label 1) read from the LLM's answer


class PreferenceRecord(NamedTuple):
    """One comparison of two captions from the annotator (ranking rewards)."""

    id_a: int
    text_a: str
    id_b: int
    text_b: str
    preference: float  # P(a is better than b)
