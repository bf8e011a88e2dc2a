"""Can this config continue that checkpoint? Checked before anything is written or started.

A checkpoint holds the weights of one network (and of one reward model): resuming it with a
config that builds another one (``model.hidden_size``, ``model.kind``, ``env.id``...) would
fail deep inside ``load_state_dict`` with a traceback. :func:`check_resumable` builds this
config's networks on the CPU and loads the checkpoint into them first; a mismatch is one
:class:`~oni_sys.config.ConfigError` naming the keys that differ from the run's own config.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from oni_sys.config import Config, ConfigError, config_to_dict
from oni_sys.contracts import EnvInterface

#: config sections that decide the shape of the policy network and of the reward model
_POLICY_SECTIONS = ("model", "env")
_REWARD_SECTIONS = ("reward",)
_ALLOWED = (
    "resume with the run's own config.yaml plus overrides that do not change the model "
    "(e.g. train.total_env_steps, algo.lr, runtime.*)"
)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and prefix == "":
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_differences(saved: dict[str, Any], cfg: Config, sections: tuple[str, ...]) -> list[str]:
    """``key (run: a, here: b)`` for every key of ``sections`` that differs between the run's
    saved config and ``cfg``."""
    before, now = _flat(saved), _flat(config_to_dict(cfg))
    keys = sorted(
        k
        for k in set(before) | set(now)
        if k.split(".", 1)[0] in sections and before.get(k) != now.get(k)
    )
    return [f"{k} (run: {before.get(k)!r}, here: {now.get(k)!r})" for k in keys]


def _first_mismatch(saved: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> str | None:
    """The first weight that is missing, extra or of another shape, or None when they fit."""
    for key in sorted(set(saved) | set(fresh)):
        if key not in fresh:
            return f"the checkpoint has {key}, this model does not"
        if key not in saved:
            return f"this model has {key}, the checkpoint does not"
        if tuple(saved[key].shape) != tuple(fresh[key].shape):
            return f"{key} is {tuple(saved[key].shape)} there, {tuple(fresh[key].shape)} here"
    return None


def check_resumable(
    cfg: Config, checkpoint: dict[str, Any], interface: EnvInterface | None, run: Any
) -> None:
    """Raise :class:`ConfigError` when ``checkpoint`` cannot continue under ``cfg``: its policy
    weights do not fit the network this config builds for ``interface``, or its reward model
    state does not load into this config's reward model. Changes no global RNG state."""
    saved_cfg = checkpoint.get("config") or {}
    problems: list[str] = []
    with rng_kept():
        if interface is not None:
            from oni_sys.models.policy import Policy

            fresh = Policy(cfg.model, cfg.env.id, interface, "cpu").get_weights()
            mismatch = _first_mismatch(checkpoint["learner"]["state"]["model"], fresh)
            if mismatch is not None:
                diff = config_differences(saved_cfg, cfg, _POLICY_SECTIONS)
                hint = _ALLOWED
                if "map_" in mismatch and "map_embedding_dim" not in saved_cfg.get("model", {}):
                    # The key came after the run, and with it a new default (8).
                    hint = (
                        "the run predates model.map_embedding_dim, so its NetHack network was "
                        "trained with model.map_embedding_dim=0: add that override"
                    )
                problems.append(
                    f"resume: {run} holds a policy this config cannot load ({mismatch}); "
                    + (f"it differs from the run's config in {'; '.join(diff)}; " if diff else "")
                    + hint
                )
        reward_state = checkpoint["learner"].get("reward")
        if reward_state is not None and cfg.reward.kind != "none":
            from oni_sys.learners.reward_learner import RewardLearner

            try:
                RewardLearner(cfg).load_state_dict(reward_state)
            except Exception as exc:  # noqa: BLE001 (any way the state does not fit)
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                diff = config_differences(saved_cfg, cfg, _REWARD_SECTIONS)
                problems.append(
                    f"resume: {run} holds a reward model this config cannot load ({reason}); "
                    + (f"it differs from the run's config in {'; '.join(diff)}; " if diff else "")
                    + _ALLOWED
                )
    if problems:
        raise ConfigError(problems)


class rng_kept:
    """Restore torch's, NumPy's and Python's global RNG state on exit (building a network
    draws from them)."""

    def __enter__(self) -> None:
        self._state = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    def __exit__(self, *exc: object) -> None:
        torch_state, np_state, py_state = self._state
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)
