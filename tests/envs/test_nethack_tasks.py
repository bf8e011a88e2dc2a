"""Tests for ONI's NetHack tasks (oni_sys.envs.nethack_tasks) on the real NLE.

Goal success is reached for real in NetHack's wizard mode: the test sends wizard commands
(map the level, teleport, level-teleport) straight to the NetHack process, bypassing the env,
to put the hero on the down staircase or next to the Oracle; the decisive move (taking the
stairs, waiting next to the Oracle) is then an ordinary agent action through ``env.step``, which
must detect the goal and pay the success reward. Rewards are also checked on constructed
blstats.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("nle")

from nle import nethack  # noqa: E402

from oni_sys.envs.nethack import (  # noqa: E402
    NETHACK_TASKS,
    ONI_TASKS,
    decode_message,
    make_nethack_env,
)
from oni_sys.envs.nethack_tasks import (  # noqa: E402
    AGENT_PROMPTS,
    EXTENDED_TASK_ACTIONS,
    PENALTY_STEP,
    SUCCESS_REWARD,
    TASK_ACTIONS,
    TASKS,
    descended_to,
    item_prompt_key,
    next_to_glyph,
    oracle_glyph,
    score_reward,
)

C = nethack.Command
DOWN = TASK_ACTIONS.index(nethack.MiscDirection.DOWN)
UP = TASK_ACTIONS.index(nethack.MiscDirection.UP)
SEARCH = TASK_ACTIONS.index(C.SEARCH)
EAT = TASK_ACTIONS.index(C.EAT)
KICK = TASK_ACTIONS.index(C.KICK)
YES = TASK_ACTIONS.index(nethack.CompassDirection.NW)  # the ``y`` key
GOAL_TASKS = ("Staircase", "StaircaseLvl3", "StaircaseLvl4", "Oracle")
DEBUG_KEYS = ("glyphs", "chars", "blstats", "message", "tty_chars", "internal")


def _blstats(score: int = 0, time: int = 1, depth: int = 1) -> np.ndarray:
    bl = np.zeros(nethack.BLSTATS_SHAPE, dtype=np.int64)
    bl[nethack.NLE_BL_SCORE] = score
    bl[nethack.NLE_BL_TIME] = time
    bl[nethack.NLE_BL_DEPTH] = depth
    bl[nethack.NLE_BL_DLEVEL] = depth
    return bl


def _raw(env, *keys: int | str) -> tuple[np.ndarray, ...]:
    """Send keystrokes straight to NetHack (bypassing the env's step); return its observation."""
    obs: tuple[np.ndarray, ...] = ()
    for key in keys:
        obs, done = env.unwrapped.nethack.step(key if isinstance(key, int) else ord(key))
        assert not done
    return obs


def _random_actions(n: int, seed: int) -> Iterator[int]:
    rng = np.random.default_rng(seed)
    while True:
        yield int(rng.integers(n))


# ----------------------------------------------------------------------------- construction


def test_oni_task_names_match_the_implementations() -> None:
    assert tuple(TASKS) == ONI_TASKS
    assert set(ONI_TASKS) <= set(NETHACK_TASKS)


def test_extended_actions_are_onis_28() -> None:
    assert len(TASK_ACTIONS) == 23
    assert EXTENDED_TASK_ACTIONS[:23] == TASK_ACTIONS
    assert EXTENDED_TASK_ACTIONS[23:] == (C.CAST, C.QUAFF, C.PRAY, C.PICKUP, C.PAY)


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("task", ONI_TASKS)
def test_every_task_builds_with_both_action_sets(task: str, extended: bool) -> None:
    env = make_nethack_env(task, extended_actions=extended)
    try:
        assert env.action_space.n == (28 if extended else 23)
        assert tuple(env.unwrapped.actions) == (EXTENDED_TASK_ACTIONS if extended else TASK_ACTIONS)
        obs, info = env.reset(seed=1)
        assert set(obs) == {"glyphs", "blstats", "message"}
        expected = {"score", "depth", "success"} if task in GOAL_TASKS else {"score", "depth"}
        assert set(info["episode_extras"]) == expected
        obs, reward, terminated, truncated, info = env.step(SEARCH)
        assert set(info["episode_extras"]) == expected
        assert info["episode_extras"]["depth"] == 1.0
        assert not (terminated or truncated)
    finally:
        env.close()


def test_unknown_kwargs_name_the_allowed_ones() -> None:
    with pytest.raises(ValueError) as excinfo:
        make_nethack_env("Score", extended_action=True)
    message = str(excinfo.value)
    assert "extended_action" in message
    for name in ("extended_actions", "max_episode_steps", "penalty_step", "character"):
        assert name in message
    # Goal tasks have no time penalty, so the penalty settings are refused there.
    with pytest.raises(ValueError, match="success_reward"):
        make_nethack_env("Staircase", penalty_step=-0.1)
    # NLE's own tasks keep NLE's arguments only.
    with pytest.raises(ValueError, match="penalty_mode"):
        make_nethack_env("Gold", extended_actions=True)


def test_extended_actions_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="extended_actions"):
        make_nethack_env("Score", extended_actions="yes")


# ----------------------------------------------------------------------------- rewards


def test_score_reward_is_score_delta_plus_stand_still_penalty() -> None:
    assert PENALTY_STEP == -0.01
    # Time passes: plain score delta.
    assert score_reward(_blstats(10, 5), _blstats(30, 6)) == 20.0
    assert score_reward(_blstats(10, 5), _blstats(10, 9)) == 0.0
    # Time stands still: the penalty, also when the score moved.
    assert score_reward(_blstats(10, 5), _blstats(10, 5)) == pytest.approx(-0.01)
    assert score_reward(_blstats(10, 5), _blstats(14, 5)) == pytest.approx(3.99)
    # Configurable, as in ONI/NLE.
    assert score_reward(_blstats(0, 5), _blstats(0, 5), penalty_step=-0.5) == -0.5
    assert score_reward(_blstats(0, 5), _blstats(0, 8), penalty_time=-0.1) == pytest.approx(-0.3)
    # A game that has ended (NLE zeroes blstats) earns nothing.
    assert score_reward(_blstats(50, 100), np.zeros_like(_blstats())) == 0.0


def test_env_reward_functions_on_constructed_observations() -> None:
    score = TASKS["Score"]()
    stairs = TASKS["Staircase"]()
    try:

        def obs(env, bl: np.ndarray) -> tuple[np.ndarray, ...]:
            parts = [np.zeros(1) for _ in env._observation_keys]
            parts[env._blstats_index] = bl
            return tuple(parts)

        running, success = score.StepStatus.RUNNING, stairs.StepStatus.TASK_SUCCESSFUL
        before, after = _blstats(4, 7), _blstats(24, 7)
        assert score._reward_fn(obs(score, before), 0, obs(score, after), running) == (
            pytest.approx(19.99)
        )
        assert stairs._reward_fn(obs(stairs, before), 0, obs(stairs, after), running) == 0.0
        assert stairs._reward_fn(obs(stairs, before), 0, obs(stairs, after), success) == 50.0
        assert SUCCESS_REWARD == 50.0
    finally:
        score.close()
        stairs.close()


def test_goal_checks_on_constructed_observations() -> None:
    bl = _blstats(depth=3)
    assert descended_to(b"You descend the stairs.\0\0", bl, 3)
    assert not descended_to(b"You descend the stairs.", bl, 2)
    assert not descended_to(b"A trap door opens up under you!", bl, 3)

    oracle = oracle_glyph()
    glyphs = np.zeros((21, 79), dtype=np.int16)
    bl[nethack.NLE_BL_X], bl[nethack.NLE_BL_Y] = 10, 0  # top row: no wrap-around
    assert not next_to_glyph(glyphs, bl, oracle)
    glyphs[1, 11] = oracle
    assert next_to_glyph(glyphs, bl, oracle)
    glyphs[1, 11], glyphs[2, 10] = 0, oracle  # two rows away
    assert not next_to_glyph(glyphs, bl, oracle)


def test_item_prompt_answers() -> None:
    prompt = b"What do you want to eat? [fghi or ?*]"
    assert item_prompt_key(prompt, ord("y")) == ord("f")
    assert item_prompt_key(prompt, ord("s")) == 27  # any other key cancels (ESC)
    assert item_prompt_key(b"What do you want to drink? [e or ?*]", ord("y")) == ord("e")
    assert item_prompt_key(b"What do you want to eat? [*]", ord("y")) == 27
    assert item_prompt_key(b"It's a wall.", ord("y")) is None


# ----------------------------------------------------------------------------- random play


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("task", ONI_TASKS)
def test_random_play_never_shows_more_or_pending_prompts(task: str, extended: bool) -> None:
    env = make_nethack_env(
        task, extended_actions=extended, observation_keys=DEBUG_KEYS, max_episode_steps=1500
    )
    actions = _random_actions(env.action_space.n, seed=len(task) + extended)
    death = int(env.unwrapped.StepStatus.DEATH)
    ends = 0
    try:
        obs, info = env.reset(seed=11)
        last = obs["blstats"].copy()
        for _ in range(10_000):
            obs, reward, terminated, truncated, info = env.step(next(actions))
            assert "episode_extras" in info
            message = decode_message(obs["message"]) or ""
            assert "--More--" not in message
            assert b"--More--" not in obs["tty_chars"].tobytes()
            internal = obs["internal"]
            # After a death NetHack has shut down and its flags mean nothing; success and the
            # step limit hand back the live observation, which must be clean too.
            if int(info["end_status"]) != death:
                assert not internal[3], "a --More-- or menu was left waiting"
                assert not internal[2], "a text prompt was left waiting"
                if internal[1]:
                    assert any(p.decode() in message for p in AGENT_PROMPTS), message
            if task == "Score":
                assert reward == pytest.approx(score_reward(last, obs["blstats"]))
            else:
                assert reward in (0.0, SUCCESS_REWARD)
            last = obs["blstats"].copy()
            if terminated or truncated:
                ends += 1
                obs, info = env.reset()
                last = obs["blstats"].copy()
        assert ends >= 1
    finally:
        env.close()


def test_step_limit_truncates_with_the_live_observation() -> None:
    env = make_nethack_env("Score", max_episode_steps=5)
    try:
        env.reset(seed=2)
        for _ in range(4):
            _, _, terminated, truncated, _ = env.step(SEARCH)
            assert not (terminated or truncated)
        obs, _, terminated, truncated, info = env.step(SEARCH)
        assert truncated and not terminated
        assert int(info["end_status"]) == int(env.unwrapped.StepStatus.ABORTED)
        assert obs["blstats"][nethack.NLE_BL_DEPTH] == 1  # live, not zeroed
        assert info["episode_extras"]["depth"] == 1.0
    finally:
        env.close()


# ----------------------------------------------------------------------------- prompts


def test_eat_prompt_goes_to_the_agent_and_y_picks_the_first_item() -> None:
    env = make_nethack_env("Score", observation_keys=DEBUG_KEYS)
    try:
        env.reset(seed=3)  # the default Monk starts with food
        obs, *_ = env.step(EAT)
        assert decode_message(obs["message"]).startswith("What do you want to eat? [")
        assert obs["internal"][1]
        obs, *_ = env.step(YES)
        assert decode_message(obs["message"]) != "Never mind."
        assert not obs["internal"][1]
        assert obs["blstats"][nethack.NLE_BL_TIME] > 1  # eating took game time

        env.reset(seed=3)
        env.step(EAT)
        obs, *_ = env.step(SEARCH)  # anything but ``y`` cancels
        assert decode_message(obs["message"]) == "Never mind."
    finally:
        env.close()


def test_direction_prompt_goes_to_the_agent() -> None:
    env = make_nethack_env("Score", observation_keys=DEBUG_KEYS)
    try:
        env.reset(seed=3)
        obs, *_ = env.step(KICK)
        assert decode_message(obs["message"]) == "In what direction?"
        assert obs["internal"][1]
    finally:
        env.close()


def test_other_yes_no_questions_are_declined() -> None:
    env = make_nethack_env("Staircase", observation_keys=DEBUG_KEYS, wizard=True)
    try:
        env.reset(seed=1)
        _raw(env, nethack.C("t"), "<", ".")  # wizard teleport onto the up staircase
        obs, reward, terminated, truncated, info = env.step(UP)
        # "Beware, there will be no return! Still climb? [yn] (n)" was answered with ESC (no).
        assert "Still climb?" in decode_message(obs["message"])
        assert info["auto_steps"] >= 1
        assert not obs["internal"][1]
        assert not (terminated or truncated)
        assert obs["blstats"][nethack.NLE_BL_DEPTH] == 1
    finally:
        env.close()


def test_extended_cast_picks_the_first_spell_and_pray_asks_the_agent() -> None:
    env = make_nethack_env("Score", extended_actions=True, observation_keys=DEBUG_KEYS)
    cast, pray = EXTENDED_TASK_ACTIONS.index(C.CAST), EXTENDED_TASK_ACTIONS.index(C.PRAY)
    try:
        env.reset(seed=3)  # a Monk who knows "protection" and has the power for one cast
        obs, *_ = env.step(cast)
        assert decode_message(obs["message"]) == (
            "The air around you begins to shimmer with a golden haze."
        )
        assert not obs["internal"][3]  # the spell menu was answered, not left open
        obs, *_ = env.step(pray)
        assert decode_message(obs["message"]) == "Are you sure you want to pray? [yn] (n)"
        assert obs["internal"][1]
    finally:
        env.close()


# ----------------------------------------------------------------------------- goal success


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize(
    ("task", "level"), [("Staircase", 2), ("StaircaseLvl3", 3), ("StaircaseLvl4", 4)]
)
def test_taking_the_stairs_to_the_target_level_succeeds(
    task: str, level: int, extended: bool
) -> None:
    env = make_nethack_env(task, extended_actions=extended, wizard=True)
    try:
        env.reset(seed=1)
        # Standing on the stairs is not enough (unlike NLE's own Staircase task).
        _raw(env, nethack.C("f"), nethack.C("t"), ">", ".")
        _, reward, terminated, _, info = env.step(SEARCH)
        assert (reward, terminated, info["episode_extras"]["success"]) == (0.0, False, 0.0)
        for depth in range(2, level + 1):
            if depth > 2:
                _raw(env, nethack.C("f"), nethack.C("t"), ">", ".")
            obs, reward, terminated, truncated, info = env.step(DOWN)
            # The descent message sits behind a --More-- and is put back into the observation.
            assert decode_message(obs["message"]) == "You descend the stairs."
            assert obs["blstats"][nethack.NLE_BL_DEPTH] == depth
            if depth < level:
                assert (reward, terminated, info["episode_extras"]["success"]) == (0.0, False, 0.0)
        assert reward == SUCCESS_REWARD
        assert terminated and not truncated
        assert int(info["end_status"]) == int(env.unwrapped.StepStatus.TASK_SUCCESSFUL)
        # NetHack scores 50 points for each new, deeper level reached.
        extras = {"score": 50.0 * (level - 1), "depth": float(level), "success": 1.0}
        assert info["episode_extras"] == extras
    finally:
        env.close()


@pytest.mark.parametrize("extended", [False, True])
def test_standing_next_to_the_oracle_succeeds(extended: bool) -> None:
    env = make_nethack_env(
        "Oracle", extended_actions=extended, observation_keys=DEBUG_KEYS, wizard=True
    )
    keys = env.unwrapped._observation_keys
    try:
        env.reset(seed=1)
        # Level-teleport to the Oracle's level and map it.
        raw = _raw(env, nethack.C("v"), *"oracle", "\r", nethack.C("f"))
        chars, blstats = raw[keys.index("chars")], raw[keys.index("blstats")]
        # The Oracle sits in the middle of Delphi's plus-shaped group of four fountains.
        fountains = {(int(y), int(x)) for y, x in np.argwhere(chars == ord("{"))}
        centres = [
            (y, x + 1)
            for y, x in fountains
            if {(y, x + 2), (y - 1, x + 1), (y + 1, x + 1)} <= fountains
        ]
        assert len(centres) == 1, fountains
        (cy, cx), hero_x, hero_y = centres[0], int(blstats[0]), int(blstats[1])
        _, reward, terminated, _, _ = env.step(SEARCH)  # not next to the Oracle yet
        assert (reward, terminated) == (0.0, False)
        # Teleport diagonally next to the Oracle by moving the wizard-teleport cursor.
        dx, dy = cx + 1 - hero_x, cy + 1 - hero_y
        cursor = ("l" if dx > 0 else "h") * abs(dx) + ("j" if dy > 0 else "k") * abs(dy)
        _raw(env, nethack.C("t"), *cursor, ".")
        obs, reward, terminated, truncated, info = env.step(SEARCH)
        assert obs["glyphs"][cy, cx] == oracle_glyph()
        assert reward == SUCCESS_REWARD
        assert terminated and not truncated
        assert info["episode_extras"]["success"] == 1.0
        assert info["episode_extras"]["depth"] >= 5.0
    finally:
        env.close()


def _with_message(env, text: bytes) -> tuple[np.ndarray, ...]:
    """The env's current observation with ``text`` as the message (a constructed state)."""
    obs = list(env.last_observation)
    message = np.zeros_like(obs[env._message_index])
    message[: len(text)] = np.frombuffer(text, dtype=np.uint8)
    obs[env._message_index] = message
    return tuple(obs)


def test_auto_enhance_runs_enhance_and_closes_the_menu() -> None:
    # Random play never gets a skill ready to advance, so the trigger message is constructed;
    # the #enhance command and the menu it opens are NetHack's own (a fresh Monk has nothing to
    # advance, so the menu only lists the current skills and must be closed again).
    env = TASKS["Score"](extended_actions=True, observation_keys=DEBUG_KEYS)
    keys = env._observation_keys
    try:
        env.seed(core=1, disp=1, reseed=False)
        env.reset()
        trigger = b"You feel more confident in your martial arts skills."
        obs, done, sent = env._auto_answer(_with_message(env, trigger), False, ord("s"))
        assert not done and sent == 3  # #enhance, "a", space to close the skills menu
        assert not obs[keys.index("internal")][3]
        assert not bytes(obs[keys.index("tty_chars")][0]).strip()
        # Without the message nothing happens.
        obs, done, sent = env._auto_answer(env.last_observation, False, ord("s"))
        assert sent == 0
    finally:
        env.close()


def test_auto_steps_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    env = TASKS["Score"](extended_actions=True, max_auto_steps=2, observation_keys=DEBUG_KEYS)
    keys = env._observation_keys
    try:
        env.seed(core=1, disp=1, reseed=False)
        env.reset()
        trigger = b"You feel more confident in your martial arts skills."
        with caplog.at_level("WARNING", logger="oni_sys.envs.nethack_tasks"):
            obs, done, sent = env._auto_answer(_with_message(env, trigger), False, ord("s"))
        assert sent == 2
        assert obs[keys.index("internal")][3]  # the menu is left for the agent
        assert "automatic keystrokes" in caplog.text
        assert env.auto_step_limit_hits == 1
    finally:
        env.close()
