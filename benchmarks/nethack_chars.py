"""NetHackScore as benchmarks/vs_sample_factory.py gives it to both systems.

The chars map as a 1x21x79 uint8 image (``chars``) plus the 27 bottom-line stats as float32
(``blstats``). It needs only nle, gymnasium and numpy, so sample-factory's virtualenv (gymnasium
0.29) imports it as well as oni-sys's (``env.id=nethack_chars:make`` with ``benchmarks/`` on
``PYTHONPATH``).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from nle.env.tasks import NetHackScore

ROWS, COLS, STATS = 21, 79, 27


class CharsImage(gym.ObservationWrapper):
    """``{"chars": (21, 79), "blstats": (27,) int64}`` -> ``{"chars": (1, 21, 79) uint8,
    "blstats": (27,) float32}``."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.observation_space = gym.spaces.Dict(
            {
                "chars": gym.spaces.Box(0, 255, (1, ROWS, COLS), np.uint8),
                "blstats": gym.spaces.Box(-np.inf, np.inf, (STATS,), np.float32),
            }
        )

    def observation(self, observation: dict) -> dict:
        return {
            "chars": observation["chars"][None],
            "blstats": observation["blstats"].astype(np.float32),
        }


def make(**kwargs) -> gym.Env:
    """NetHackScore with the chars image and stats (kwargs go to NLE's task)."""
    return CharsImage(NetHackScore(observation_keys=("chars", "blstats"), **kwargs))
