"""Observations as flat dicts of numeric arrays, whatever the env's observation space.

:func:`dict_space` turns an observation space into a flat ``Dict`` and :func:`obs_to_dict` one
observation into the matching dict of arrays; docs/ENVIRONMENTS.md ("Observations and
networks") lists the conversions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from oni_sys.contracts import MASK_KEY

_SUPPORTED = "Box, Discrete, MultiDiscrete, MultiBinary, Text, and Dict or Tuple of these"

# One leaf of a nested observation: (flat name, path of keys/indices into the raw obs,
# converted space, per-step conversion).
_Leaf = tuple[str, tuple[Any, ...], gym.Space, Callable[[Any], np.ndarray]]

# Converters built so far, by id of the space (the space is kept so the id stays unique).
_MAX_CACHED = 1024
_CONVERTERS: dict[int, tuple[gym.Space, gym.spaces.Dict, Callable[[Any], dict]]] = {}


def dict_space(space: gym.Space) -> gym.spaces.Dict:
    """The observation space as a flat Dict of numeric spaces.

    ``Box`` is kept; ``Discrete`` and ``MultiDiscrete`` become one-hots, ``MultiBinary`` float32;
    ``Dict`` and ``Tuple`` are flattened with ``"."``-joined names; ``Text`` is dropped; any other
    space is the single entry ``"obs"``.

    Example::

        space = gym.spaces.Dict(pos=gym.spaces.Discrete(3), map=gym.spaces.Box(0, 1, (2, 2)))
        dict_space(space)  # Dict with "map": Box (2, 2) and "pos": Box (3,) (the one-hot)
    """
    return _converter(space)[1]


def obs_to_dict(obs: Any, space: gym.Space) -> dict[str, np.ndarray]:
    """One observation of ``space`` in the shape described by :func:`dict_space`.

    Example::

        obs_to_dict(1, gym.spaces.Discrete(3))  # {"obs": array([0., 1., 0.])}
        obs_to_dict({"pos": 2, "map": np.zeros((2, 2))}, space)  # {"map": ..., "pos": [0, 0, 1]}
    """
    entry = _CONVERTERS.get(id(space))
    if entry is None or entry[0] is not space:
        entry = _converter(space)
    return entry[2](obs)


def _converter(space: gym.Space) -> tuple[gym.Space, gym.spaces.Dict, Callable[[Any], dict]]:
    entry = _CONVERTERS.get(id(space))
    if entry is not None and entry[0] is space:
        return entry
    if len(_CONVERTERS) >= _MAX_CACHED:
        _CONVERTERS.clear()
    if (
        isinstance(space, gym.spaces.Dict)
        and space.spaces
        and all(
            isinstance(s, gym.spaces.Box)
            or (k == MASK_KEY and isinstance(s, gym.spaces.MultiBinary))
            for k, s in space.spaces.items()
        )
    ):
        entry = (space, space, _identity)
    elif isinstance(space, gym.spaces.Box):
        entry = (space, gym.spaces.Dict({"obs": space}), _single_box)
    else:
        leaves = _leaves(space, "", ())
        if not leaves:
            raise TypeError(
                f"observation space {space} has nothing numeric for the model once Text is "
                f"dropped; it needs at least one of {_SUPPORTED.split(', Text')[0]}"
            )
        names = [leaf[0] for leaf in leaves]
        if len(set(names)) != len(names):
            raise ValueError(
                f"observation space {space} gives two entries the same flat name "
                f"({sorted(n for n in names if names.count(n) > 1)[0]!r}); rename keys that "
                "contain '.'"
            )
        flat = gym.spaces.Dict({name: s for name, _, s, _ in leaves})
        entry = (space, flat, _flatten_fn(leaves))
    _CONVERTERS[id(space)] = entry
    return entry


def _identity(obs: dict) -> dict:
    return obs


def _single_box(obs: Any) -> dict[str, np.ndarray]:
    return {"obs": np.asarray(obs)}


def _flatten_fn(leaves: list[_Leaf]) -> Callable[[Any], dict]:
    if len(leaves) == 1 and not leaves[0][1]:  # a single non-container space
        fn = leaves[0][3]
        return lambda obs: {"obs": fn(obs)}

    def convert(obs: Any) -> dict[str, np.ndarray]:
        out = {}
        for name, path, _, fn in leaves:
            value = obs
            for step in path:
                value = value[step]
            out[name] = fn(value)
        return out

    return convert


def _leaves(space: gym.Space, name: str, path: tuple[Any, ...]) -> list[_Leaf]:
    """Every numeric leaf of ``space`` with its flat name, path and converter."""
    if isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple)):
        items = (
            space.spaces.items() if isinstance(space, gym.spaces.Dict) else enumerate(space.spaces)
        )
        out: list[_Leaf] = []
        for key, sub in items:
            sub_name = f"{name}.{key}" if name else str(key)
            if not path and key == MASK_KEY and isinstance(sub, gym.spaces.MultiBinary):
                out.append((sub_name, (key,), sub, np.asarray))
            else:
                out += _leaves(sub, sub_name, (*path, key))
        return out
    name = name or "obs"
    if isinstance(space, gym.spaces.Text):
        return []
    if isinstance(space, gym.spaces.Box):
        return [(name, path, space, np.asarray)]
    if isinstance(space, gym.spaces.Discrete):
        n, start = int(space.n), int(space.start)
        box = gym.spaces.Box(0.0, 1.0, (n,), np.float32)
        return [(name, path, box, lambda x: _one_hot(x, n, start, space))]
    if isinstance(space, gym.spaces.MultiDiscrete):
        nvec = space.nvec.reshape(-1).astype(np.int64)
        start = np.asarray(space.start, np.int64).reshape(-1)
        offsets = np.concatenate([[0], np.cumsum(nvec)[:-1]]).astype(np.int64)
        total = int(nvec.sum())
        box = gym.spaces.Box(0.0, 1.0, (total,), np.float32)
        return [(name, path, box, lambda x: _multi_hot(x, nvec, start, offsets, total, space))]
    if isinstance(space, gym.spaces.MultiBinary):
        box = gym.spaces.Box(0.0, 1.0, space.shape, np.float32)
        return [(name, path, box, lambda x: np.asarray(x, np.float32))]
    raise TypeError(f"observation space {space} is not supported; use {_SUPPORTED}")


def _one_hot(x: Any, n: int, start: int, space: gym.Space) -> np.ndarray:
    i = int(x) - start
    if not 0 <= i < n:
        raise ValueError(f"observation {x!r} is outside {space}")
    out = np.zeros(n, np.float32)
    out[i] = 1.0
    return out


def _multi_hot(
    x: Any, nvec: np.ndarray, start: np.ndarray, offsets: np.ndarray, total: int, space: gym.Space
) -> np.ndarray:
    idx = np.asarray(x, np.int64).reshape(-1) - start
    if idx.shape != nvec.shape or ((idx < 0) | (idx >= nvec)).any():
        raise ValueError(f"observation {np.asarray(x).tolist()} is outside {space}")
    out = np.zeros(total, np.float32)
    out[offsets + idx] = 1.0
    return out
