"""NetHack (NLE) environments: the ``nle:<task>`` tasks, episode statistics and the captioner.

:func:`make_nethack_env` builds ONI's tasks (:data:`ONI_TASKS`, from
:mod:`oni_sys.envs.nethack_tasks`) and NLE's own (:data:`NLE_TASKS`), wrapped in
:class:`NetHackStats`; :func:`nethack_captioner` captions a step by its in-game message. NLE is
imported lazily, so the rest of ``oni_sys`` works without the ``nle`` extra. The NLE 1.3.0
behaviours this module works around are in docs/ENVIRONMENTS.md ("NetHack").
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from typing import Any, SupportsFloat

import gymnasium
import numpy as np
from gymnasium.envs.registration import load_env_creator

logger = logging.getLogger(__name__)

#: ONI's tasks, built by :mod:`oni_sys.envs.nethack_tasks` (kept in step with its ``TASKS``;
#: named here so that listing tasks does not need nle).
ONI_TASKS: tuple[str, ...] = ("Score", "Staircase", "StaircaseLvl3", "StaircaseLvl4", "Oracle")

#: NLE's own tasks without ONI's changes: our name -> NLE gym id (registered by ``import nle``).
NLE_TASKS: dict[str, str] = {
    "Gold": "NetHackGold-v0",
    "Eat": "NetHackEat-v0",
    "Scout": "NetHackScout-v0",
    "Challenge": "NetHackChallenge-v0",
}

#: Every task name accepted by :func:`make_nethack_env` -> where it comes from.
NETHACK_TASKS: dict[str, str] = {
    **{task: f"oni_sys.envs.nethack_tasks.{task}" for task in ONI_TASKS},
    **NLE_TASKS,
}

DEFAULT_OBSERVATION_KEYS: tuple[str, ...] = ("glyphs", "blstats", "message")

# Fallback blstats indices (NLE's NLE_BL_SCORE / NLE_BL_DEPTH); the constants are read from
# nle when it is importable, these only document the layout.
_BL_SCORE = 9
_BL_DEPTH = 12

_NLE_MISSING = "NetHack environments need the nle package: pip install 'oni-sys[nethack]'"

# Bounded so a long run with ever-new messages (they embed names, counts, ...) cannot grow it.
_CAPTION_CACHE_SIZE = 4096


def _import_nle() -> Any:
    """Import nle (which registers the NetHack gym ids) or raise a helpful ImportError."""
    try:
        import nle  # noqa: F401  (import registers the envs)
        from nle import nethack
    except ImportError as exc:
        raise ImportError(_NLE_MISSING) from exc
    return nethack


class NetHackStats(gymnasium.Wrapper, gymnasium.utils.RecordConstructorArgs):
    """Put ``info["episode_extras"] = {"score", "depth"}`` on every reset and step.

    The values come from ``blstats``. When a game ends NLE may hand back zeroed ``blstats``,
    so the wrapper keeps the values from the last step on which the game was still running;
    the extras of the final step are the episode's real final score and dungeon depth.

    Goal tasks (ONI's with ``is_goal_task``, NLE's whose ``StepStatus`` has
    ``TASK_SUCCESSFUL``) also get ``success``: 1.0 from the step that reaches the goal, else 0.0.
    """

    def __init__(self, env: gymnasium.Env) -> None:
        gymnasium.utils.RecordConstructorArgs.__init__(self)
        gymnasium.Wrapper.__init__(self, env)
        spaces = getattr(env.observation_space, "spaces", {})
        if "blstats" not in spaces:
            raise ValueError(
                f"NetHackStats needs 'blstats' among the observation keys; got {sorted(spaces)}"
            )
        try:
            nethack = _import_nle()
            self._score_index = int(nethack.NLE_BL_SCORE)
            self._depth_index = int(nethack.NLE_BL_DEPTH)
        except (ImportError, AttributeError):
            self._score_index, self._depth_index = _BL_SCORE, _BL_DEPTH
        status = getattr(getattr(env.unwrapped, "StepStatus", None), "TASK_SUCCESSFUL", None)
        # ONI's tasks say whether they have a goal (Score shares their StepStatus); NLE's own
        # tasks have TASK_SUCCESSFUL exactly when they have one.
        is_goal = getattr(env.unwrapped, "is_goal_task", status is not None)
        self._success_status = int(status) if is_goal and status is not None else None
        self._score = 0.0
        self._depth = 0.0
        self._success = 0.0

    def _seed_nethack(self, seed: int) -> None:
        core, disp = (int(v) for v in np.random.SeedSequence(seed).generate_state(2))
        try:
            # reseed=False: NetHack would otherwise re-draw true randomness mid-game. The seeds
            # apply to the next reset only; later episodes are random again.
            self.unwrapped.seed(core=core, disp=disp, reseed=False)
        except RuntimeError:
            # NetHackChallenge forbids seeding by design.
            logger.warning("%s does not accept seeds; the game stays random", self.unwrapped)

    def _update(self, blstats: np.ndarray) -> None:
        # Depth is >= 1 in any running game, so 0 means NLE zeroed the buffer.
        depth = float(blstats[self._depth_index])
        if depth > 0:
            self._score = float(blstats[self._score_index])
            self._depth = depth

    def _extras(self) -> dict[str, float]:
        extras = {"score": self._score, "depth": self._depth}
        if self._success_status is not None:
            extras["success"] = self._success
        return extras

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Reset the env and start tracking a new episode.

        A ``seed`` also seeds NetHack's own RNGs for this episode: NLE's ``reset(seed=...)``
        only seeds gymnasium's ``np_random`` and leaves the game itself random. ``options`` may
        be any dict (NLE 1.3.0 itself raises KeyError unless it holds ``wizkit_items``).
        """
        if seed is not None:
            self._seed_nethack(seed)
        if options is not None:
            options = {"wizkit_items": None, **options}
        obs, info = self.env.reset(seed=seed, options=options)
        self._score = 0.0
        self._depth = 0.0
        self._success = 0.0
        self._update(obs["blstats"])
        info = dict(info)
        info["episode_extras"] = self._extras()
        return obs, info

    def step(
        self, action: Any
    ) -> tuple[dict[str, np.ndarray], SupportsFloat, bool, bool, dict[str, Any]]:
        """Step the env, adding the episode extras to ``info``."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        # Zeroed blstats (a game NetHack has already ended) are skipped by _update; the live
        # observations ONI's tasks return at success or the step limit are counted.
        self._update(obs["blstats"])
        if self._success_status is not None and int(info.get("end_status", 0)) == (
            self._success_status
        ):
            self._success = 1.0
        info = dict(info)
        info["episode_extras"] = self._extras()
        return obs, reward, terminated, truncated, info


def _constructor_kwargs(cls: type) -> set[str]:
    """Keyword arguments accepted by ``cls`` and the ``__init__`` of its base classes."""
    names: set[str] = set()
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.name != "self" and param.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.KEYWORD_ONLY,
            ):
                names.add(param.name)
    return names


def _check_kwargs(task: str, kwargs: dict[str, Any], allowed: set[str] | tuple[str, ...]) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown argument(s) {', '.join(unknown)} for NetHack task {task!r}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def make_nethack_env(task: str, **kwargs: Any) -> gymnasium.Env:
    """Create the env for ``task`` (a key of :data:`NETHACK_TASKS`), wrapped in NetHackStats.

    ONI's tasks (:data:`ONI_TASKS`) are built from :mod:`oni_sys.envs.nethack_tasks`; their
    ``kwargs`` are ``extended_actions`` (28 actions instead of 23), ``max_episode_steps``,
    ``max_auto_steps``, ``auto_enhance``, the task's reward settings and NLE's own arguments
    (``character``, ``observation_keys``, ``savedir``, ...). NLE's tasks (:data:`NLE_TASKS`)
    take NLE's arguments. Unknown arguments raise ValueError naming the allowed ones.

    ``observation_keys`` defaults to ``("glyphs", "blstats", "message")``. ``max_episode_steps``
    is handled by the env itself (which quits the game cleanly), never by a gymnasium
    ``TimeLimit`` as ``gymnasium.make`` would do.
    """
    if task not in NETHACK_TASKS:
        raise ValueError(
            f"Unknown NetHack task {task!r}; allowed tasks: {', '.join(sorted(NETHACK_TASKS))}"
        )
    _import_nle()
    kwargs.setdefault("observation_keys", DEFAULT_OBSERVATION_KEYS)
    if task in ONI_TASKS:
        from oni_sys.envs.nethack_tasks import TASKS

        cls = TASKS[task]
        _check_kwargs(task, kwargs, cls.allowed_kwargs())
        env: gymnasium.Env = cls(**kwargs)
        logger.debug("Created ONI task %s (%d actions)", task, env.action_space.n)
        return NetHackStats(env)

    spec = gymnasium.spec(NLE_TASKS[task])
    entry_point = load_env_creator(spec.entry_point)
    _check_kwargs(task, kwargs, _constructor_kwargs(entry_point))
    if "max_episode_steps" in kwargs:
        # gymnasium.make would swallow this keyword for its own TimeLimit wrapper.
        spec = dataclasses.replace(
            spec, kwargs={**spec.kwargs, "max_episode_steps": kwargs.pop("max_episode_steps")}
        )
    # The passive checker only inspects the first reset/step; NLE's spaces are known-good.
    env = gymnasium.make(spec, disable_env_checker=True, **kwargs)
    logger.debug("Created %s for task %s", spec.id, task)
    return NetHackStats(env)


@functools.lru_cache(maxsize=_CAPTION_CACHE_SIZE)
def _decode_bytes(raw: bytes) -> str | None:
    text = raw.decode("latin-1").strip()
    return text or None


def decode_message(message: np.ndarray) -> str | None:
    """Decode an NLE ``message`` array: bytes up to the first NUL, latin-1, stripped.

    Returns None for an empty (or all-blank) message.
    """
    if message.size == 0 or message.flat[0] == 0:
        return None
    if message.dtype != np.uint8:
        # e.g. a batch copied into a wider integer buffer: one byte per character again.
        message = message.astype(np.uint8)
    raw = message.tobytes()
    end = raw.find(b"\0")
    if end >= 0:
        raw = raw[:end]
    return _decode_bytes(raw)


def nethack_captioner(obs: dict[str, np.ndarray], info: dict[str, Any]) -> str | None:
    """Caption a NetHack step by its in-game message (None when there is none)."""
    del info  # The message is the whole caption; info carries nothing textual.
    return decode_message(obs["message"])
