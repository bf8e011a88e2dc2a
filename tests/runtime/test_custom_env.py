"""A user's own environment and captioner, named in config as ``module.path:Name`` and
``module.path:function``, written here (not shipped in the package), trains end to end in both
runtimes, with captions labelled by the annotator turning into intrinsic reward."""

from __future__ import annotations

import sqlite3
import textwrap

import pytest

USER_MODULE = textwrap.dedent(
    '''
    """A user's corridor: walk right to the exit; a lamp halfway says so in the info dict."""
    import gymnasium as gym
    import numpy as np


    class Corridor(gym.Env):
        def __init__(self, length=8, max_steps=40):
            self.length, self.max_steps = length, max_steps
            self.observation_space = gym.spaces.Dict(
                {
                    "position": gym.spaces.Box(0.0, 1.0, (length,), np.float32),
                    "lamp_lit": gym.spaces.MultiBinary(1),
                }
            )
            self.action_space = gym.spaces.Discrete(2)  # 0 left, 1 right

        def _obs(self):
            onehot = np.zeros(self.length, np.float32)
            onehot[self.pos] = 1.0
            return {"position": onehot, "lamp_lit": np.array([self.lit], np.int8)}

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.pos, self.lit, self.t = 0, 0, 0
            return self._obs(), {}

        def step(self, action):
            self.t += 1
            self.pos = int(np.clip(self.pos + (1 if action == 1 else -1), 0, self.length - 1))
            event = None
            if self.pos == self.length // 2 and not self.lit:
                self.lit, event = 1, "lamp"
            done = self.pos == self.length - 1
            info = {"event": event} if event else {}
            return self._obs(), float(done), done, self.t >= self.max_steps and not done, info


    def caption(obs, info):
        """The user's captioner: events in the info dict become sentences."""
        return {"lamp": "You light the lamp."}.get(info.get("event"))
    '''
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    pkg = tmp_path / "user_code"
    pkg.mkdir()
    (pkg / "corridor_env.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(pkg))
    # Ray workers are separate processes: they find the module through PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", str(pkg))
    return "corridor_env"


@pytest.mark.parametrize("runtime", ["serial", "ray"])
def test_user_env_and_captioner_train_end_to_end(train, user_module, runtime):
    extra = ["runtime.num_env_runners=2"] if runtime == "ray" else []
    _, run_dir, rows = train(
        "configs/cartpole.yaml",
        f"env.id={user_module}:Corridor",
        "env.kwargs={length: 8, max_steps: 40}",
        f"env.captioner={user_module}:caption",
        "env.num_envs=8",
        f"runtime.kind={runtime}",
        *extra,
        "reward.kind=hashing",
        "reward.c_int=0.5",
        "annotator.backend=rules",
        "annotator.rules=[{pattern: 'lamp', label: 1}]",
        "train.total_env_steps=40000",
        "train.tensorboard=false",
        "train.log_every_updates=5",
    )
    # Every episode reaches the exit (return 1) once the policy has learnt the corridor.
    assert rows[-1]["episode_return_mean"] > 0.95, [r["episode_return_mean"] for r in rows]
    # The custom caption was seen, labelled by the annotator and paid out as intrinsic reward:
    # exactly once per episode (c_int 0.5, first sighting), on about 1 step in 7.
    assert rows[-1]["intrinsic_return_mean"] == pytest.approx(0.5, abs=0.05)
    assert 0.05 < rows[-1]["intrinsic_reward_nonzero"] < 0.3
    with sqlite3.connect(run_dir / "labels.sqlite") as db:
        labelled = db.execute(
            "SELECT c.text, l.label FROM labels l JOIN captions c ON c.id = l.caption_id"
        ).fetchall()
    assert labelled == [("You light the lamp.", 1)]
