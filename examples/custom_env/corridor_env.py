"""An example of bringing your own environment and captioner to oni-sys.

A corridor: walk right to reach the exit (reward 1). Halfway along there is a lamp; lighting it
(by walking past) is an *event* the env reports in ``info``, and the captioner below turns
events into text for the LLM annotator to judge. Run it with::

    PYTHONPATH=examples/custom_env oni-sys train examples/custom_env/corridor.yaml

Nothing here imports oni_sys: an env is any Gymnasium ``Env`` (or a factory returning one), and
a captioner is any function ``caption(obs, info) -> str | None``.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class Corridor(gym.Env):
    """``length`` cells; actions 0 (left) and 1 (right); the exit is the last cell."""

    def __init__(self, length: int = 12, max_steps: int = 60):
        self.length, self.max_steps = length, max_steps
        self.observation_space = gym.spaces.Dict(
            {
                "position": gym.spaces.Discrete(length),
                "lamp_lit": gym.spaces.MultiBinary(1),
            }
        )
        self.action_space = gym.spaces.Discrete(2)

    def _obs(self):
        return {"position": self.pos, "lamp_lit": np.array([self.lit], np.int8)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.lit, self.t = 0, 0, 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        self.pos = int(np.clip(self.pos + (1 if action == 1 else -1), 0, self.length - 1))
        info = {}
        if self.pos == self.length // 2 and not self.lit:
            self.lit = 1
            info["event"] = "lamp"
        if self.pos == 0 and action == 0:
            info["event"] = "wall"
        at_exit = self.pos == self.length - 1
        truncated = self.t >= self.max_steps and not at_exit
        return self._obs(), float(at_exit), at_exit, truncated, info


EVENT_TEXT = {"lamp": "You light the lamp.", "wall": "You bump into the wall."}


def caption(obs, info):
    """Events become sentences; a step without an event has no caption (no intrinsic reward)."""
    return EVENT_TEXT.get(info.get("event"))
