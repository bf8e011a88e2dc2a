"""ONI's five NetHack tasks on NLE 1.3.0: Score, Staircase, StaircaseLvl3/4 and Oracle.

Each task subclasses NLE's ``nle.env.tasks.NetHackScore`` and replaces ``step`` with the
behaviour of ONI's ``rl_baseline/tasks_nle.py`` (written against NLE 0.9): its action sets,
rewards and goals, and the automatic answering of ``--More--`` and prompts. docs/ENVIRONMENTS.md
("NetHack") describes each, with where this module and plain NLE differ from ONI.
"""

from __future__ import annotations

import enum
import logging
import re
from typing import Any, ClassVar, SupportsFloat

import numpy as np
from nle import nethack
from nle.env import tasks as nle_tasks
from nle.env.base import ASCII_ESC, ASCII_SPACE

logger = logging.getLogger(__name__)

#: NLE's 23 task actions (ONI's default action set).
TASK_ACTIONS: tuple[int, ...] = tuple(nle_tasks.TASK_ACTIONS)

#: ONI's extended set: the task actions plus cast, quaff, pray, pick up, pay (28).
EXTENDED_TASK_ACTIONS: tuple[int, ...] = (
    *TASK_ACTIONS,
    nethack.Command.CAST,
    nethack.Command.QUAFF,
    nethack.Command.PRAY,
    nethack.Command.PICKUP,
    nethack.Command.PAY,
)

#: Single-key prompts containing one of these are left for the agent to answer (NLE 1.3's
#: ``SKIP_EXCEPTIONS`` plus ONI's ``b"drink"``); all others are declined with ESC.
AGENT_PROMPTS: tuple[bytes, ...] = (b"eat", b"attack", b"direction?", b"pray", b"drink")

#: Item prompts whose answer the agent gives with its NW key ``y`` (first offered letter).
ITEM_PROMPTS: tuple[bytes, ...] = (b"What do you want to eat?", b"What do you want to drink?")

#: Automatic keystrokes allowed per agent step. Random play on every task needs at most a few
#: dozen (a death is the longest chain); the bound only guards against a prompt loop.
DEFAULT_MAX_AUTO_STEPS = 100

#: ONI's goal reward (``NetHackStaircase._reward_fn``).
SUCCESS_REWARD = 50.0
#: ONI's (and NLE's) Score stand-still penalty and per-turn penalty.
PENALTY_STEP = -0.01
PENALTY_TIME = 0.0

DESCEND_MESSAGE = b"You descend the stairs"
_CONFIDENT_MESSAGE = b"You feel more confident in"
_YES_KEY = ord("y")  # The NW direction key doubles as "yes" in NetHack prompts.
_FIRST_CHOICE = ord("a")
_ITEM_LETTER = re.compile(rb"\[([a-zA-Z])")

_BL_X, _BL_Y = nethack.NLE_BL_X, nethack.NLE_BL_Y
_BL_SCORE, _BL_TIME = nethack.NLE_BL_SCORE, nethack.NLE_BL_TIME
_BL_DEPTH, _BL_DLEVEL = nethack.NLE_BL_DEPTH, nethack.NLE_BL_DLEVEL

# NLE ``internal`` observation fields.
_IN_YN, _IN_GETLIN, _WAIT_FOR_SPACE = 1, 2, 3

# The NLE arguments our tasks pass through. The others are fixed: ``actions`` comes from
# ``extended_actions``, and ``allow_all_yn_questions``/``allow_all_modes`` would switch off the
# prompt handling that is part of the task definition.
_NLE_KWARGS = frozenset(
    {
        "save_ttyrec_every",
        "savedir",
        "character",
        "max_episode_steps",
        "observation_keys",
        "options",
        "wizard",
        "spawn_monsters",
        "render_mode",
        "fix_moon_phase",
    }
)


# ----------------------------------------------------------------------------- pure functions


def score_reward(
    last_blstats: np.ndarray,
    blstats: np.ndarray,
    *,
    penalty_step: float = PENALTY_STEP,
    penalty_time: float = PENALTY_TIME,
) -> float:
    """ONI's Score reward for one agent step: score delta plus the stand-still penalty.

    ``penalty_step`` (negative) is added when the game clock did not advance, and
    ``penalty_time * (time - last_time)`` always. Zeroed blstats (depth 0: the game has ended)
    give 0, as NLE's reward does outside a running game.
    """
    if blstats[_BL_DEPTH] == 0 or last_blstats[_BL_DEPTH] == 0:
        return 0.0
    delta = float(blstats[_BL_SCORE]) - float(last_blstats[_BL_SCORE])
    elapsed = float(blstats[_BL_TIME]) - float(last_blstats[_BL_TIME])
    penalty = penalty_step if elapsed == 0 else 0.0
    return delta + penalty + penalty_time * elapsed


def descended_to(message: np.ndarray | bytes, blstats: np.ndarray, level: int) -> bool:
    """True when the step's message says the hero took stairs down to dungeon level ``level``.

    ``level`` is compared with ``blstats[NLE_BL_DLEVEL]`` (the level within the current branch),
    as ONI does.
    """
    raw = message if isinstance(message, bytes) else message.tobytes()
    return DESCEND_MESSAGE in raw and int(blstats[_BL_DLEVEL]) == level


def next_to_glyph(glyphs: np.ndarray, blstats: np.ndarray, glyph: int) -> bool:
    """True when ``glyph`` is shown in the 3x3 neighbourhood of the hero (border-safe)."""
    x, y = int(blstats[_BL_X]), int(blstats[_BL_Y])
    # Clamp: ONI slices ``y - 1`` directly, which wraps to an empty slice on row 0.
    window = glyphs[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
    return bool(np.any(window == glyph))


def item_prompt_key(last_message: bytes, key: int) -> int | None:
    """The key to send when the agent answers an eat/drink item prompt with ``key``.

    Returns None when ``last_message`` is no such prompt. ``y`` (the agent's NW action) picks
    the first inventory letter offered in the prompt's ``[...]``; anything else, or a prompt
    offering no letter, cancels with ESC.
    """
    if not any(prompt in last_message for prompt in ITEM_PROMPTS):
        return None
    match = _ITEM_LETTER.search(last_message)
    if key == _YES_KEY and match is not None:
        return match.group(1)[0]
    return ASCII_ESC


def oracle_glyph() -> int:
    """The monster glyph NetHack shows for the Oracle."""
    for glyph in range(nethack.GLYPH_MON_OFF, nethack.GLYPH_PET_OFF):
        if nethack.permonst(nethack.glyph_to_mon(glyph)).mname == "Oracle":
            return glyph
    raise RuntimeError("NetHack's monster list has no Oracle")


# ----------------------------------------------------------------------------- environments


class Score(nle_tasks.NetHackScore):
    """ONI's Score task: maximise the in-game score (docs/ENVIRONMENTS.md, "NetHack").

    Args:
        extended_actions: use ONI's 28 actions instead of NLE's 23 task actions.
        max_auto_steps: automatic keystrokes (``--More--``, declined prompts, macros) allowed
            per agent step.
        auto_enhance: advance skills automatically when the game offers it; defaults to
            ``extended_actions`` (ONI does it in its extended-action envs only).
        penalty_step: added to the reward on steps where the game clock stands still.
        penalty_time: multiplied by the number of game turns a step took.
        **kwargs: NLE's arguments (``character``, ``max_episode_steps``, ...; all of them:
            :meth:`allowed_kwargs`).
    """

    class StepStatus(enum.IntEnum):
        """NLE's end statuses plus the goal tasks' success (unused by Score itself)."""

        ABORTED = -1
        RUNNING = 0
        DEATH = 1
        TASK_SUCCESSFUL = 2

    #: Whether the task has a goal (and so a success flag).
    is_goal_task: ClassVar[bool] = False

    def __init__(
        self,
        *,
        extended_actions: bool = False,
        max_auto_steps: int = DEFAULT_MAX_AUTO_STEPS,
        auto_enhance: bool | None = None,
        penalty_step: float = PENALTY_STEP,
        penalty_time: float = PENALTY_TIME,
        **kwargs: Any,
    ) -> None:
        if not isinstance(extended_actions, bool):
            raise TypeError(f"extended_actions must be true or false, got {extended_actions!r}")
        if not isinstance(max_auto_steps, int) or max_auto_steps < 1:
            raise ValueError(f"max_auto_steps must be a positive integer, got {max_auto_steps!r}")
        self._check_kwargs(set(kwargs) - _NLE_KWARGS)
        self.extended_actions = extended_actions
        self.max_auto_steps = max_auto_steps
        self.auto_enhance = extended_actions if auto_enhance is None else bool(auto_enhance)
        actions = EXTENDED_TASK_ACTIONS if extended_actions else TASK_ACTIONS
        super().__init__(
            actions=actions,
            penalty_step=penalty_step,
            penalty_time=penalty_time,
            allow_all_yn_questions=False,
            allow_all_modes=False,
            **kwargs,
        )
        self.auto_step_limit_hits = 0

    @classmethod
    def allowed_kwargs(cls) -> tuple[str, ...]:
        """Every keyword argument the constructor accepts, sorted."""
        own = {"extended_actions", "max_auto_steps", "auto_enhance"} | cls._task_kwargs()
        return tuple(sorted(own | _NLE_KWARGS))

    @classmethod
    def _task_kwargs(cls) -> set[str]:
        return {"penalty_step", "penalty_time"}

    @classmethod
    def _check_kwargs(cls, unknown: set[str]) -> None:
        if unknown:
            raise TypeError(
                f"{cls.__name__} got unknown argument(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(cls.allowed_kwargs())}"
            )

    # -- game logic -------------------------------------------------------------------------

    def _reward_fn(
        self,
        last_observation: tuple[np.ndarray, ...],
        action: int,
        observation: tuple[np.ndarray, ...],
        end_status: int,
    ) -> float:
        """Score delta plus the stand-still penalty (:func:`score_reward`)."""
        del action, end_status  # The Score reward depends on the game state only.
        return score_reward(
            last_observation[self._blstats_index],
            observation[self._blstats_index],
            penalty_step=self.penalty_step,
            penalty_time=self.penalty_time,
        )

    def _goal_reached(self, observation: tuple[np.ndarray, ...]) -> bool:
        """Whether the task's goal holds in ``observation`` (Score has none)."""
        del observation
        return False

    def _is_episode_end(self, observation: tuple[np.ndarray, ...]) -> int:
        """NLE's hook (used by its ``reset``), answered by :meth:`_goal_reached`."""
        if self._goal_reached(observation):
            return self.StepStatus.TASK_SUCCESSFUL
        return self.StepStatus.RUNNING

    def _message(self, observation: tuple[np.ndarray, ...]) -> bytes:
        return observation[self._message_index].tobytes()

    def _auto_answer(
        self, observation: tuple[np.ndarray, ...], done: bool, key: int
    ) -> tuple[tuple[np.ndarray, ...], bool, int]:
        """Answer ``--More--`` and prompts until NetHack waits for a real command.

        Returns the observation, NetHack's done flag and the number of keystrokes sent.
        """
        sent = 0
        descent_message: np.ndarray | None = None
        cast_pending = self.extended_actions and key == nethack.Command.CAST
        enhance_pending = False
        enhanced = False
        while not done and sent < self.max_auto_steps:
            internal = observation[self._internal_index]
            message = self._message(observation)
            if self.auto_enhance and not enhanced and _CONFIDENT_MESSAGE in message:
                enhance_pending = True
            if cast_pending:
                cast_pending = False
                if internal[_WAIT_FOR_SPACE] and not message.strip(b"\0"):
                    # The spell menu is open (a menu leaves the message empty; "You don't know
                    # any spells" would not): cast the first spell, as ONI's macro does.
                    observation, done = self.nethack.step(_FIRST_CHOICE)
                    sent += 1
                    continue
            if internal[_WAIT_FOR_SPACE]:
                if DESCEND_MESSAGE in message:
                    # The next screen (the new level) would wipe this message; keep a copy.
                    descent_message = observation[self._message_index].copy()
                observation, done = self.nethack.step(ASCII_SPACE)
            elif internal[_IN_GETLIN]:
                observation, done = self.nethack.step(ASCII_ESC)
            elif internal[_IN_YN]:
                if any(prompt in message for prompt in AGENT_PROMPTS):
                    break
                observation, done = self.nethack.step(ASCII_ESC)
            elif enhance_pending:
                enhance_pending, enhanced = False, True
                observation, done = self.nethack.step(nethack.Command.ENHANCE)
                sent += 1
                menu_open = not done and observation[self._internal_index][_WAIT_FOR_SPACE]
                if menu_open and sent < self.max_auto_steps:
                    # The skill menu is open: advance the first skill (the loop then closes
                    # whatever follows, including a menu that offers nothing to advance).
                    observation, done = self.nethack.step(_FIRST_CHOICE)
                    sent += 1
                continue
            else:
                break
            sent += 1
        else:
            if not done:
                self._note_auto_step_limit(observation)
        if descent_message is not None and not done:
            i = self._message_index
            observation = (*observation[:i], descent_message, *observation[i + 1 :])
        return observation, done, sent

    def _note_auto_step_limit(self, observation: tuple[np.ndarray, ...]) -> None:
        internal = observation[self._internal_index]
        if not (internal[_WAIT_FOR_SPACE] or internal[_IN_GETLIN] or internal[_IN_YN]):
            return  # The last automatic keystroke happened to settle the game: nothing pending.
        self.auto_step_limit_hits += 1
        # Warn once per env; after that only at debug level, a stuck game would flood the log.
        log = logger.warning if self.auto_step_limit_hits == 1 else logger.debug
        log(
            "%s: still prompting after %d automatic keystrokes (message %r); "
            "returning the prompt to the agent",
            type(self).__name__,
            self.max_auto_steps,
            self._message(observation).rstrip(b"\0"),
        )

    # -- gymnasium API ----------------------------------------------------------------------

    def step(
        self, action: int
    ) -> tuple[dict[str, np.ndarray], SupportsFloat, bool, bool, dict[str, Any]]:
        """Take one agent action, answer the prompts it causes, score the result."""
        # NLE overwrites its observation buffers in place on every NetHack step.
        last_observation = tuple(a.copy() for a in self.last_observation)
        key = int(self.actions[action])
        if last_observation[self._internal_index][_IN_YN]:
            answer = item_prompt_key(self._message(last_observation), key)
            if answer is not None:
                key = answer
        observation, done = self.nethack.step(key)
        observation, done, sent = self._auto_answer(observation, done, key)
        self._steps += 1
        self.last_observation = observation

        if done:
            end_status = self.StepStatus.DEATH
        elif self._is_episode_end(observation) == self.StepStatus.TASK_SUCCESSFUL:
            end_status = self.StepStatus.TASK_SUCCESSFUL
        elif self._steps >= self._max_episode_steps:
            end_status = self.StepStatus.ABORTED
        else:
            end_status = self.StepStatus.RUNNING
        reward = float(self._reward_fn(last_observation, key, observation, end_status))

        if end_status != self.StepStatus.RUNNING and not done:
            # Quitting the game zeroes NLE's buffers: hand back a copy of the live state.
            observation = tuple(a.copy() for a in observation)
            self._quit_game(observation, done)

        info = self._get_information(end_status)
        info["auto_steps"] = sent
        terminated = end_status in (self.StepStatus.DEATH, self.StepStatus.TASK_SUCCESSFUL)
        truncated = end_status == self.StepStatus.ABORTED
        return self._get_observation(observation), reward, terminated, truncated, info


class _GoalTask(Score):
    """A task that ends with a reward of ``success_reward`` (ONI: 50) when its goal is reached.

    Args:
        success_reward: the reward on the step that reaches the goal.
        **kwargs: as for :class:`Score`.
    """

    is_goal_task: ClassVar[bool] = True

    def __init__(self, *, success_reward: float = SUCCESS_REWARD, **kwargs: Any) -> None:
        # Score's penalty arguments would be accepted silently but never used.
        self._check_kwargs(set(kwargs) & {"penalty_step", "penalty_time"})
        self.success_reward = float(success_reward)
        super().__init__(**kwargs)

    @classmethod
    def _task_kwargs(cls) -> set[str]:
        # ONI's goal reward has no time penalty, so the penalty arguments do not apply.
        return {"success_reward"}

    def _reward_fn(
        self,
        last_observation: tuple[np.ndarray, ...],
        action: int,
        observation: tuple[np.ndarray, ...],
        end_status: int,
    ) -> float:
        """``success_reward`` on success, else 0."""
        del last_observation, action, observation
        return self.success_reward if end_status == self.StepStatus.TASK_SUCCESSFUL else 0.0


class Staircase(_GoalTask):
    """ONI's Staircase task: take the stairs down to dungeon level 2."""

    target_level: ClassVar[int] = 2

    def _goal_reached(self, observation: tuple[np.ndarray, ...]) -> bool:
        return descended_to(
            observation[self._message_index],
            observation[self._blstats_index],
            self.target_level,
        )


class StaircaseLvl3(Staircase):
    """ONI's StaircaseLvl3 task: take the stairs down to dungeon level 3."""

    target_level: ClassVar[int] = 3


class StaircaseLvl4(Staircase):
    """ONI's StaircaseLvl4 task: take the stairs down to dungeon level 4."""

    target_level: ClassVar[int] = 4


class Oracle(_GoalTask):
    """ONI's Oracle task: stand next to the Oracle (usually 5 to 9 levels down)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.oracle_glyph = oracle_glyph()

    def _goal_reached(self, observation: tuple[np.ndarray, ...]) -> bool:
        return next_to_glyph(
            observation[self._glyph_index], observation[self._blstats_index], self.oracle_glyph
        )


#: Task name (as in ``env.id=nle:<name>``) -> environment class.
TASKS: dict[str, type[Score]] = {
    "Score": Score,
    "Staircase": Staircase,
    "StaircaseLvl3": StaircaseLvl3,
    "StaircaseLvl4": StaircaseLvl4,
    "Oracle": Oracle,
}
