"""Observations travel as dicts of arrays: these helpers give every env that shape."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


def dict_space(space: gym.Space) -> gym.spaces.Dict:
    """The observation space as a Dict (a plain Box becomes ``{"obs": box}``)."""
    if isinstance(space, gym.spaces.Dict):
        return space
    if isinstance(space, gym.spaces.Box):
        return gym.spaces.Dict({"obs": space})
    if isinstance(space, gym.spaces.Discrete):
        return gym.spaces.Dict({"obs": gym.spaces.Box(0, 1, (int(space.n),), np.float32)})
    raise TypeError(
        f"observation space {space} is not supported yet; use Box, Discrete or Dict of Box"
    )


def obs_to_dict(obs: Any, space: gym.Space) -> dict[str, np.ndarray]:
    """One observation in the shape described by :func:`dict_space`."""
    if isinstance(space, gym.spaces.Dict):
        return obs
    if isinstance(space, gym.spaces.Discrete):
        onehot = np.zeros(int(space.n), np.float32)
        onehot[int(obs) - int(space.start)] = 1.0
        return {"obs": onehot}
    return {"obs": np.asarray(obs)}


def num_actions(space: gym.Space) -> int:
    """Number of discrete actions (other action spaces arrive with issue 5)."""
    if not isinstance(space, gym.spaces.Discrete):
        raise TypeError(f"action space {space} is not supported yet; only Discrete actions are")
    return int(space.n)
