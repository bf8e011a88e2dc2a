"""Tests for the NLE env factory, the episode-extras wrapper and the message captioner."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nle")

from nle import nethack  # noqa: E402

from oni_sys.envs.nethack import (  # noqa: E402
    NETHACK_TASKS,
    NLE_TASKS,
    ONI_TASKS,
    decode_message,
    make_nethack_env,
    nethack_captioner,
)

GOAL_TASKS = {"Staircase", "StaircaseLvl3", "StaircaseLvl4", "Oracle"}


def _random_actions(env, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        yield int(rng.integers(env.action_space.n))


def test_blstats_indices_match_nle() -> None:
    assert nethack.NLE_BL_SCORE == 9
    assert nethack.NLE_BL_DEPTH == 12


@pytest.mark.parametrize("task", sorted(NETHACK_TASKS))
def test_every_task_resets_and_steps(task: str) -> None:
    env = make_nethack_env(task)
    try:
        obs, info = env.reset()
        assert set(obs) == {"glyphs", "blstats", "message"}
        assert obs["glyphs"].shape == (21, 79)
        assert info["episode_extras"]["depth"] == 1.0
        obs, reward, terminated, truncated, info = env.step(0)
        assert np.isfinite(float(reward))
        expected = {"score", "depth", "success"} if task in GOAL_TASKS else {"score", "depth"}
        assert set(info["episode_extras"]) == expected
    finally:
        env.close()


def test_task_lists_keep_oni_and_nle_tasks_apart() -> None:
    assert set(ONI_TASKS) == {"Score", "Staircase", "StaircaseLvl3", "StaircaseLvl4", "Oracle"}
    assert not set(ONI_TASKS) & set(NLE_TASKS)
    assert set(NETHACK_TASKS) == set(ONI_TASKS) | set(NLE_TASKS)
    for task in ONI_TASKS:
        env = make_nethack_env(task)
        try:
            assert type(env.unwrapped).__module__ == "oni_sys.envs.nethack_tasks"
        finally:
            env.close()


def test_unknown_task_lists_allowed_tasks() -> None:
    with pytest.raises(ValueError) as excinfo:
        make_nethack_env("Sokoban")
    for task in NETHACK_TASKS:
        assert task in str(excinfo.value)


def test_observation_keys_can_be_overridden() -> None:
    env = make_nethack_env("Score", observation_keys=("glyphs", "blstats", "message", "chars"))
    try:
        obs, _ = env.reset()
        assert "chars" in obs
    finally:
        env.close()


def test_captioner_decodes_welcome_and_play_messages() -> None:
    env = make_nethack_env("Score")
    try:
        obs, info = env.reset(seed=3)
        caption = nethack_captioner(obs, info)
        assert caption is not None
        assert "welcome to NetHack" in caption

        captions = []
        actions = _random_actions(env, seed=3)
        for _ in range(500):
            obs, _, terminated, truncated, info = env.step(next(actions))
            caption = nethack_captioner(obs, info)
            if caption is not None:
                captions.append(caption)
            if terminated or truncated:
                obs, info = env.reset()
        assert len(set(captions)) >= 2
        for caption in captions:
            assert caption == caption.strip()
            assert "\0" not in caption
    finally:
        env.close()


def test_decode_message_edge_cases() -> None:
    buf = np.zeros(256, dtype=np.uint8)
    assert decode_message(buf) is None
    text = b"  It's a wall.  "
    buf[: len(text)] = np.frombuffer(text, dtype=np.uint8)
    assert decode_message(buf) == "It's a wall."
    # Bytes after the first NUL are stale and must be ignored.
    buf[len(text) + 1 : len(text) + 4] = np.frombuffer(b"xyz", dtype=np.uint8)
    assert decode_message(buf) == "It's a wall."
    blank = np.full(256, ord(" "), dtype=np.uint8)
    assert decode_message(blank) is None
    high = np.array([0xE9, 0], dtype=np.uint8)
    assert decode_message(high) == "\u00e9"
    # A wider integer copy of the buffer decodes the same.
    assert decode_message(buf.astype(np.int64)) == "It's a wall."


def test_seeded_reset_replays_the_game() -> None:
    env = make_nethack_env("Score")
    try:
        first, _ = env.reset(seed=7)
        first = {k: v.copy() for k, v in first.items()}  # NLE reuses its buffers.
        second, _ = env.reset(seed=7)
        np.testing.assert_array_equal(first["glyphs"], second["glyphs"])
        np.testing.assert_array_equal(first["blstats"], second["blstats"])
    finally:
        env.close()


def _play_episode(env, seed: int, max_steps: int) -> tuple[np.ndarray, dict, np.ndarray, bool]:
    """Random play to the end; returns (last live blstats, final info, final blstats, truncated)."""
    obs, info = env.reset(seed=seed)
    assert info["episode_extras"]["depth"] >= 1.0
    actions = _random_actions(env, seed)
    for _ in range(max_steps):
        live = obs["blstats"].copy()
        obs, _, terminated, truncated, info = env.step(next(actions))
        assert "episode_extras" in info
        if terminated or truncated:
            return live, info, obs["blstats"].copy(), truncated
    raise AssertionError(f"episode did not end within {max_steps} steps")


def test_extras_at_game_end_report_last_live_score_and_depth() -> None:
    # Short step limit: random play ends some games by death (NetHack zeroes the final
    # blstats; terminated) and others at the limit (ONI's Score quits the game itself and
    # hands back the live observation; truncated).
    env = make_nethack_env("Score", max_episode_steps=1500)
    death, aborted = int(env.unwrapped.StepStatus.DEATH), int(env.unwrapped.StepStatus.ABORTED)
    seen: set[int] = set()
    try:
        for seed in range(20):
            live, info, final, truncated = _play_episode(env, seed, max_steps=2000)
            extras = info["episode_extras"]
            status = int(info["end_status"])
            if status == death:
                assert not truncated
                assert not final.any()
                last = live
            else:
                assert status == aborted and truncated
                assert final[nethack.NLE_BL_DEPTH] >= 1
                last = final
            assert extras["score"] == float(last[nethack.NLE_BL_SCORE])
            assert extras["depth"] == float(last[nethack.NLE_BL_DEPTH])
            assert extras["depth"] >= 1.0
            if extras["score"] > 0:
                seen.add(status)
            if {death, aborted} <= seen:
                break
        else:
            pytest.fail(f"wanted a scoring death and a scoring abort, saw end statuses {seen}")
    finally:
        env.close()


def test_nle_task_extras_at_game_end_report_last_live_values() -> None:
    # NLE's own tasks still zero the final observation at their step limit.
    env = make_nethack_env("Gold", max_episode_steps=50)
    try:
        live, info, final, _ = _play_episode(env, seed=0, max_steps=100)
        assert not final.any()
        assert info["episode_extras"]["depth"] == float(live[nethack.NLE_BL_DEPTH])
        assert info["episode_extras"]["score"] == float(live[nethack.NLE_BL_SCORE])
    finally:
        env.close()


@pytest.mark.parametrize(
    "task, kwargs",
    [("Score", {}), ("Oracle", {"extended_actions": True}), ("Gold", {})],
)
def test_nethack_envs_pass_gymnasiums_env_checker(task, kwargs):
    """Gymnasium's own checker on what ``nle:<task>`` builds (our wrapper included): spaces,
    seeded determinism, ``reset(options={})`` (which NLE 1.3.0 alone fails) and re-creation."""
    from gymnasium.utils.env_checker import check_env

    env = make_nethack_env(task, **kwargs)
    try:
        check_env(env, skip_render_check=True)
    finally:
        env.close()
