"""Tests for the Vault sparse-reward grid world (oni_sys.envs.vault)."""

from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from oni_sys.annotators.rules_backend import RulesBackend
from oni_sys.config import load_config
from oni_sys.envs import vault
from oni_sys.envs.captioners import info_captioner
from oni_sys.envs.spec import make_env
from oni_sys.envs.vault import (
    ENV_ID,
    KEY_CAPTION,
    LOCKED_CAPTION,
    VAULT_CAPTION,
    WALL_CAPTION,
    State,
    VaultEnv,
    transition,
)

UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3
#: The shortest solution for size 9: from the centre (4, 4) to the key (1, 1), then to (7, 7).
OPTIMAL = [UP] * 3 + [LEFT] * 3 + [DOWN] * 6 + [RIGHT] * 6
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "vault.yaml"


def agent(obs: np.ndarray, size: int = 9) -> tuple[int, tuple[int, int]]:
    """(plane, (x, y)) of the agent's single one-hot unit."""
    cells = size * size
    assert obs.sum() == 1.0
    plane, cell = divmod(int(np.argmax(obs)), cells)
    return plane, (cell % size, cell // size)


# -- API conformance -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"size": 5, "max_steps": 20}])
def test_passes_gymnasium_env_checker(kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make(ENV_ID, **kwargs).unwrapped  # made through the registry: it has a spec
        check_env(env, skip_render_check=False)
        env.close()
    env = VaultEnv(render_mode="ansi", **kwargs)
    env.reset(seed=0)
    picture = env.render()
    assert picture.count("@") == 1 and picture.count("k") == 1 and picture.count("V") == 1
    assert VaultEnv().render() is None


def test_gymnasium_make_and_env_spec() -> None:
    vault.register()  # idempotent: a second registration neither fails nor warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vault.register()
    assert ENV_ID == "oni_sys/Vault-v0"
    assert gym.spec(ENV_ID).entry_point == "oni_sys.envs.vault:VaultEnv"
    env = gym.make("oni_sys/Vault-v0")
    try:
        assert isinstance(env.unwrapped, VaultEnv)
        assert env.action_space == gym.spaces.Discrete(4)
        assert env.observation_space.shape == (2 * 9 * 9,)
    finally:
        env.close()
    env = make_env(f"gym:{ENV_ID}", {"max_steps": 12})
    try:
        assert env.unwrapped.max_steps == 12
        obs, info = env.reset(seed=0)
        assert "caption" not in info
        for _ in range(3):
            obs, _, _, _, info = env.step(UP)
        assert info_captioner(obs, info) is None  # (4, 1): the top interior row
        obs, _, _, _, info = env.step(UP)
        assert info_captioner(obs, info) == WALL_CAPTION
    finally:
        env.close()


# -- the key-vault chain -------------------------------------------------------------------


def test_optimal_sequence_enters_the_vault_with_captions_in_order() -> None:
    env = VaultEnv()
    obs, _ = env.reset(seed=0)
    assert agent(obs) == (0, (4, 4))
    assert len(OPTIMAL) == 18
    captions, rewards = [], []
    for i, action in enumerate(OPTIMAL):
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        if "caption" in info:
            captions.append(info["caption"])
        assert not truncated
        assert terminated == (i == len(OPTIMAL) - 1)
    assert captions == [KEY_CAPTION, VAULT_CAPTION]
    assert rewards == [0.0] * 17 + [1.0]
    assert isinstance(rewards[-1], float)
    assert agent(obs) == (1, (7, 7))


def test_bumping_the_locked_vault_repeats_the_locked_caption() -> None:
    env = VaultEnv()
    env.reset(seed=0)
    for action in [DOWN] * 3 + [RIGHT] * 2:  # to (6, 7), left of the vault, without the key
        _, _, _, _, info = env.step(action)
        assert "caption" not in info
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(RIGHT)
        assert info == {"caption": LOCKED_CAPTION}
        assert reward == 0.0 and not terminated and not truncated
        assert agent(obs) == (0, (6, 7))
    env.state = State((7, 6))  # from above, too
    obs, _, terminated, _, info = env.step(DOWN)
    assert info["caption"] == LOCKED_CAPTION and not terminated and agent(obs) == (0, (7, 6))


def test_key_is_picked_up_once_and_then_gone() -> None:
    lay = vault.fixed_layout(9)
    assert transition(lay, State((2, 1)), LEFT) == (State((1, 1), True), KEY_CAPTION)
    assert transition(lay, State((2, 1), True), LEFT) == (State((1, 1), True), None)
    assert transition(lay, State((6, 7), True), RIGHT) == (State((7, 7), True), VAULT_CAPTION)
    with pytest.raises(ValueError, match="invalid action"):
        transition(lay, State((4, 4)), 4)


def test_walls_all_around_leave_the_agent_in_place() -> None:
    env = VaultEnv()
    env.reset(seed=0)
    for pos, action in [((1, 1), UP), ((1, 1), LEFT), ((4, 7), DOWN), ((7, 3), RIGHT)]:
        env.state = State(pos, has_key=True)
        obs, reward, terminated, _, info = env.step(action)
        assert info == {"caption": WALL_CAPTION}
        assert reward == 0.0 and not terminated
        assert agent(obs) == (1, pos)
    # interior is 7x7: walking 10 steps in any direction from the centre ends 3 cells away
    for action, end in [(UP, (4, 1)), (DOWN, (4, 7)), (LEFT, (1, 4)), (RIGHT, (7, 4))]:
        env.reset()
        captions = [env.step(action)[4].get("caption") for _ in range(10)]
        assert env.state.pos == end
        assert captions[:3] == [None] * 3 and captions[3:] == [WALL_CAPTION] * 7


def test_silent_steps_have_no_caption_key() -> None:
    env = VaultEnv()
    env.reset(seed=0)
    assert env.step(DOWN)[4] == {}


# -- observation ---------------------------------------------------------------------------


def test_observation_is_the_agent_in_its_key_plane() -> None:
    env = VaultEnv()
    obs, _ = env.reset(seed=0)
    assert obs.shape == (162,) and obs.dtype == np.float32
    assert env.observation_space.contains(obs)
    for i, action in enumerate(OPTIMAL):
        obs, *_ = env.step(action)
        assert set(np.unique(obs)) == {0.0, 1.0}
        plane, pos = agent(obs)
        assert pos == env.state.pos
        assert plane == (1 if i >= 5 else 0)  # the key is picked up on step 6
    size7 = VaultEnv(size=7)
    obs, _ = size7.reset(seed=0)
    assert obs.shape == (98,) and agent(obs, 7) == (0, (3, 3))


# -- episode limits ------------------------------------------------------------------------


def test_truncates_at_max_steps() -> None:
    env = VaultEnv(max_steps=5)
    env.reset(seed=0)
    for i in range(5):
        _, reward, terminated, truncated, _ = env.step(UP)
        assert reward == 0.0 and not terminated
        assert truncated == (i == 4)
    env.reset()
    _, _, _, truncated, _ = env.step(UP)
    assert not truncated  # reset starts a fresh count, the agent back in the centre
    assert env.state == State((4, 3))


def test_reaching_the_vault_on_the_last_step_terminates_without_truncation() -> None:
    env = VaultEnv(max_steps=18)
    env.reset(seed=0)
    for action in OPTIMAL:
        _, reward, terminated, truncated, _ = env.step(action)
    assert reward == 1.0 and terminated and not truncated


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size"):
        VaultEnv(size=4)
    with pytest.raises(ValueError, match="max_steps"):
        VaultEnv(max_steps=0)
    with pytest.raises(ValueError, match="render_mode"):
        VaultEnv(render_mode="human")


# -- the config's rules --------------------------------------------------------------------


def test_config_rules_reward_key_and_vault_but_not_the_locked_door() -> None:
    config = load_config(str(CONFIG))
    assert config.env.id == f"gym:{ENV_ID}"
    rules = RulesBackend(config.annotator.rules)
    assert rules.label(KEY_CAPTION) == 1
    assert rules.label(VAULT_CAPTION) == 1
    assert rules.label(LOCKED_CAPTION) == 0
    assert rules.label(WALL_CAPTION) == 0
    careless = RulesBackend([{"pattern": "key", "label": 1}])  # the trap this env exists for
    assert careless.label(KEY_CAPTION) == careless.label(LOCKED_CAPTION) == 1


def test_random_policy_chances_match_the_docstring() -> None:
    """Exact forward propagation of a uniformly random policy over ``transition`` (the vault
    absorbing): the figures quoted in docs/ENVIRONMENTS.md ("Vault", "How sparse")."""
    lay = vault.fixed_layout(9)
    cells = [(x, y) for x in range(1, 8) for y in range(1, 8)]
    states = [State(c, k) for c in cells for k in (False, True)]
    index = {s: i for i, s in enumerate(states)}
    step = np.zeros((len(states), len(states)))
    bumps = np.zeros(len(states))
    for s in states:
        if s.pos == lay.vault:
            step[index[s], index[s]] = 1.0
            continue
        for action in range(4):
            nxt, caption = transition(lay, s, action)
            step[index[s], index[nxt]] += 0.25
            bumps[index[s]] += 0.25 * (caption == LOCKED_CAPTION)
    p = np.zeros(len(states))
    p[index[State(lay.start)]] = 1.0
    expected_bumps = 0.0
    for _ in range(100):
        expected_bumps += p @ bumps
        p = p @ step
    assert sum(p[index[s]] for s in states if s.has_key) == pytest.approx(0.37, abs=0.005)
    assert p[index[State(lay.vault, True)]] == pytest.approx(0.040, abs=0.0005)
    assert expected_bumps == pytest.approx(0.89, abs=0.005)
