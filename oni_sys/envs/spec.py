"""Environment specs: one string in the config names how to build an environment.

Accepted forms (issue 5 adds more):
- ``gym:<id>``: a registered Gymnasium id, e.g. ``gym:CartPole-v1``;
- ``<id>``: the same without the prefix;
- ``nle:<task>``: a NetHack task, e.g. ``nle:Score``.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Callable
from typing import Any

import gymnasium as gym

import oni_sys.envs.keydoor  # noqa: F401  (registers gym:oni_sys/KeyDoor-v0)

ACCEPTED_FORMS = "gym:<gymnasium id> (e.g. gym:CartPole-v1) or nle:<task> (e.g. nle:Score)"

Captioner = Callable[[Any, dict], "str | None"]


def _nle_tasks() -> dict[str, str]:
    from oni_sys.envs.nethack import NETHACK_TASKS

    return NETHACK_TASKS


def check_env_spec(spec: str) -> str | None:
    """Return None if ``spec`` can be built, else one sentence saying why not."""
    if spec.startswith("nle:"):
        task = spec[4:]
        if importlib.util.find_spec("nle") is None:
            return f"{spec!r} needs the nle package: pip install 'oni-sys[nethack]'"
        tasks = _nle_tasks()
        if task not in tasks:
            return f"unknown NetHack task {task!r}; choose one of: {', '.join(tasks)}"
        return None
    gym_id = spec[4:] if spec.startswith("gym:") else spec
    if gym_id not in gym.registry:
        near = difflib.get_close_matches(gym_id, list(gym.registry), n=1)
        hint = f" (did you mean gym:{near[0]}?)" if near else ""
        return f"unknown environment {spec!r}{hint}; accepted forms: {ACCEPTED_FORMS}"
    return None


def is_nethack(spec: str) -> bool:
    """True for NetHack specs (they get the NetHack network and captioner by default)."""
    return spec.startswith("nle:")


def make_env(spec: str, kwargs: dict[str, Any] | None = None) -> gym.Env:
    """Build one environment from its spec string."""
    kwargs = dict(kwargs or {})
    if spec.startswith("nle:"):
        from oni_sys.envs.nethack import make_nethack_env

        return make_nethack_env(spec[4:], **kwargs)
    gym_id = spec[4:] if spec.startswith("gym:") else spec
    return gym.make(gym_id, **kwargs)


def info_captioner(obs: Any, info: dict) -> str | None:
    """Caption convention for any env: the text in ``info["caption"]``, if any."""
    caption = info.get("caption")
    return caption if isinstance(caption, str) and caption else None


def make_captioner(spec: str, captioner: str) -> Captioner | None:
    """The captioner for an env: ``auto``, ``none`` (issue 5 adds the other forms)."""
    if captioner == "none":
        return None
    if captioner == "nle" or (captioner == "auto" and is_nethack(spec)):
        from oni_sys.envs.nethack import nethack_captioner

        return nethack_captioner
    return info_captioner
