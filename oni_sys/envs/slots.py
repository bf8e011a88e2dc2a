"""Agent slots: the one interface the env runner steps, whatever the environment.

A :class:`SlotEnv` holds one environment with one or more agents, each a *slot*. It says which
slots must act, takes their actions and reports each slot's :class:`Outcome` once it is known,
so every slot's experience is an ordinary single-agent trajectory. :class:`GymSlots` is a
Gymnasium env as one slot; :mod:`oni_sys.envs.pettingzoo_slots` has the PettingZoo kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

#: slot index -> (raw observation, info) of a slot that must act now
Decisions = dict[int, tuple[Any, dict]]


@dataclass
class Outcome:
    """What became of one slot's last action.

    ``obs``/``info`` are what the slot observed when the outcome was settled (for a finished
    episode, its final observation: the runner bootstraps a truncated episode from its value
    and reads the caption from it). ``reward`` is everything the slot earned since it acted.

    Every SlotEnv gets the same two normalisations here: a step reported as both terminated and
    truncated counts as terminated (NLE reports its step limit as both), and at an episode end
    ``obs`` and ``info`` are copied (envs such as NLE reuse their buffers, and the reset that
    follows would overwrite them).
    """

    slot: int
    reward: float
    terminated: bool
    truncated: bool
    obs: Any
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reward = float(self.reward)
        self.terminated = bool(self.terminated)
        self.truncated = bool(self.truncated) and not self.terminated
        if self.terminated or self.truncated:
            self.obs, self.info = copy_obs(self.obs), dict(self.info)


def copy_obs(obs: Any) -> Any:
    """A copy of an observation's arrays (dicts and tuples of arrays included)."""
    if isinstance(obs, dict):
        return {k: copy_obs(v) for k, v in obs.items()}
    if isinstance(obs, tuple):
        return tuple(copy_obs(v) for v in obs)
    return obs.copy() if isinstance(obs, np.ndarray) else obs


class SlotEnv:
    """Base class; subclasses set the attributes below and implement the three methods."""

    #: one name per slot (agent names for multi-agent envs; ``("agent",)`` for one agent)
    slot_names: tuple[str, ...] = ("agent",)
    #: the raw observation and action spaces, the same for every slot
    observation_space: gym.Space
    action_space: gym.Space

    def reset(self, seed: int | None = None) -> Decisions:
        """Start an episode; return the slots that must act first."""
        raise NotImplementedError

    def step(self, actions: dict[int, Any]) -> tuple[list[Outcome], Decisions]:
        """Apply the actions of exactly the slots last asked to act.

        Returns the outcomes settled by this step and the slots that must act next (after an
        episode end: the first decisions of the next episode, which has already been reset).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the environment."""


class GymSlots(SlotEnv):
    """A single-agent Gymnasium env as one slot that acts every step."""

    def __init__(self, env: gym.Env):
        self.env = env
        self.observation_space = env.observation_space
        self.action_space = env.action_space

    def reset(self, seed: int | None = None) -> Decisions:
        obs, info = self.env.reset(seed=seed)
        if seed is not None:
            self.env.action_space.seed(seed)
        return {0: (obs, info)}

    def step(self, actions: dict[int, Any]) -> tuple[list[Outcome], Decisions]:
        obs, reward, terminated, truncated, info = self.env.step(actions[0])
        outcome = Outcome(0, reward, terminated, truncated, obs, info)
        if outcome.terminated or outcome.truncated:
            obs, info = self.env.reset()
        return [outcome], {0: (obs, info)}

    def close(self) -> None:
        self.env.close()
