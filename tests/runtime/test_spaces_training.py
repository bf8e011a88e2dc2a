"""Observation and action spaces end to end: image observations train through the CNN, and
masks an env gives in ``info["action_mask"]`` are obeyed (the env raises on an illegal action)."""

from __future__ import annotations

import textwrap

import pytest

USER_MODULE = textwrap.dedent(
    '''
    import gymnasium as gym
    import numpy as np


    class BrightQuadrant(gym.Env):
        """One-step episodes: an 8x8 grey image with one bright pixel; name its quadrant."""

        observation_space = gym.spaces.Box(0, 255, (8, 8, 1), np.uint8)
        action_space = gym.spaces.Discrete(4)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.quadrant = int(self.np_random.integers(4))
            image = np.full((8, 8, 1), 40, np.uint8)
            row = 4 * (self.quadrant // 2) + int(self.np_random.integers(4))
            col = 4 * (self.quadrant % 2) + int(self.np_random.integers(4))
            image[row, col, 0] = 255
            return image, {}

        def step(self, action):
            image = np.zeros((8, 8, 1), np.uint8)
            return image, float(action == self.quadrant), True, False, {}


    class OnlySomeMoves(gym.Env):
        """Each step allows a random subset of 6 moves (given in info); an illegal move raises.
        The best legal move is the highest-numbered one."""

        observation_space = gym.spaces.Box(0.0, 1.0, (6,), np.float32)
        action_space = gym.spaces.Discrete(6)

        def _draw(self):
            self.mask = (self.np_random.random(6) < 0.5).astype(np.int8)
            self.mask[self.np_random.integers(6)] = 1
            return self.mask.astype(np.float32), {"action_mask": self.mask}

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return self._draw()

        def step(self, action):
            if not self.mask[action]:
                raise ValueError(f"illegal move {action} under mask {self.mask}")
            reward = float(action == np.flatnonzero(self.mask).max())
            self.t += 1
            obs, info = self._draw()
            return obs, reward, False, self.t >= 20, info
    '''
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_spaces.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_spaces"


def test_image_observations_train_through_the_cnn(train, user_module):
    runtime, _, rows = train(
        "configs/cartpole.yaml",
        f"env.id={user_module}:BrightQuadrant",
        "train.total_env_steps=15000",
        "train.tensorboard=false",
        "train.log_every_updates=1",
    )
    assert runtime.learner.policy.net.image_keys == ["obs"]  # the image goes through the CNN
    # Guessing scores 0.25; reading the image scores 1.
    assert rows[0]["episode_return_mean"] < 0.5
    assert rows[-1]["episode_return_mean"] > 0.9, [r["episode_return_mean"] for r in rows]


def test_masks_from_info_are_obeyed_and_learnt_with(train, user_module):
    _, _, rows = train(
        "configs/cartpole.yaml",
        f"env.id={user_module}:OnlySomeMoves",
        "train.total_env_steps=30000",
        "train.tensorboard=false",
        "train.log_every_updates=5",
    )
    # The env raises on an illegal move, so finishing the budget means none was made. Picking
    # among legal moves at random scores about 8 of 20; the best legal move every time, 20.
    assert rows[-1]["env_steps"] >= 30000
    assert rows[0]["episode_return_mean"] < 12
    assert rows[-1]["episode_return_mean"] > 17, [r["episode_return_mean"] for r in rows]
