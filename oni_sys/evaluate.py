"""Evaluate a run's latest checkpoint: play episodes and report their statistics."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from oni_sys.actors.env_runner import EnvRunner
from oni_sys.config import ConfigError, config_from_dict, parse_overrides
from oni_sys.runtime.run_dir import load_checkpoint

EVAL_KEYS = {"episodes": int, "deterministic": bool, "seed": int, "max_steps": int}


def _eval_options(overrides: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "episodes": 10,
        "deterministic": False,
        "seed": 12345,
        "max_steps": 100_000,
    }
    errors = []
    for key, value in parse_overrides(overrides).items():
        if key not in EVAL_KEYS:
            errors.append(f"{key}: unknown eval option; valid options: {', '.join(EVAL_KEYS)}")
        elif EVAL_KEYS[key] is bool and not isinstance(value, bool):
            errors.append(f"{key}: expected true or false, got {value!r}")
        elif EVAL_KEYS[key] is int and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            errors.append(f"{key}: expected a positive integer, got {value!r}")
        else:
            opts[key] = value
    if errors:
        raise ConfigError(errors)
    return opts


def evaluate(run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Play ``episodes`` episodes with the latest checkpoint of ``run_dir``, through the env
    runner's own loop (:meth:`EnvRunner.play`) on one env of the run's config.

    Options (``key=value``): ``episodes`` (10), ``deterministic`` (false: sample actions as in
    training; true: take the most likely action), ``seed``, ``max_steps`` per episode.

    Example::

        stats = evaluate(Path("runs/cartpole"), ["episodes=5", "deterministic=true"])
        stats["episode_return_mean"]
    """
    opts = _eval_options(overrides or [])
    if not (run_dir / "checkpoints" / "latest.pt").is_file():
        raise ConfigError(
            [f"{run_dir}: no checkpoints/latest.pt; give a run directory written by oni-sys train"]
        )
    ckpt = load_checkpoint(run_dir)
    cfg = config_from_dict(ckpt["config"])
    cfg = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, num_envs=1))
    runner = EnvRunner(cfg)
    try:
        runner.set_weights(ckpt["learner"]["state"]["model"], ckpt["learner"]["state"]["version"])
        played = runner.play(
            opts["episodes"], opts["seed"], opts["deterministic"], opts["max_steps"]
        )
    finally:
        runner.close()
    returns = [e["return"] for e in played]
    stats: dict[str, Any] = {
        "checkpoint_env_steps": ckpt["tracker"]["env_steps"],
        "episodes": opts["episodes"],
        "episode_return_mean": float(np.mean(returns)),
        "episode_return_std": float(np.std(returns)),
        "episode_return_min": float(np.min(returns)),
        "episode_return_max": float(np.max(returns)),
        "episode_length_mean": float(np.mean([e["length"] for e in played])),
    }
    # The env's extras (e.g. NetHack's score) and, with several agents, each agent's return.
    extra_keys = sorted({k for e in played for k in e} - {"return", "length"})
    for key in extra_keys:
        stats[f"{key}_mean"] = float(np.mean([e[key] for e in played if key in e]))
    return stats
