"""Evaluate a run's latest checkpoint: play episodes and report their statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from oni_sys.config import ConfigError, config_from_dict, parse_overrides
from oni_sys.envs.spaces import dict_space, num_actions, obs_to_dict
from oni_sys.envs.spec import make_env
from oni_sys.models import build_model
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


@torch.no_grad()
def evaluate(run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Play ``episodes`` episodes with the latest checkpoint of ``run_dir``.

    Options (``key=value``): ``episodes`` (10), ``deterministic`` (false: sample actions as in
    training; true: take the most likely action), ``seed``, ``max_steps`` per episode.
    """
    opts = _eval_options(overrides or [])
    if not (run_dir / "checkpoints" / "latest.pt").is_file():
        raise ConfigError(
            [f"{run_dir}: no checkpoints/latest.pt; give a run directory written by oni-sys train"]
        )
    ckpt = load_checkpoint(run_dir)
    cfg = config_from_dict(ckpt["config"])
    env = make_env(cfg.env.id, cfg.env.kwargs)
    space = dict_space(env.observation_space)
    model = build_model(cfg.model, cfg.env.id, space, num_actions(env.action_space))
    model.load_state_dict(ckpt["learner"]["state"]["model"])
    model.eval()
    generator = torch.Generator().manual_seed(opts["seed"])
    returns, lengths, extras = [], [], {}
    for episode in range(opts["episodes"]):
        obs, info = env.reset(seed=opts["seed"] + episode)
        state, first = model.initial_state(1), torch.ones(1, 1, dtype=torch.bool)
        total, steps, done = 0.0, 0, False
        while not done and steps < opts["max_steps"]:
            o = obs_to_dict(obs, env.observation_space)
            o = {k: torch.from_numpy(np.asarray(v))[None, None] for k, v in o.items()}
            logits, _, state = model(o, state, first)
            first = torch.zeros(1, 1, dtype=torch.bool)
            if opts["deterministic"]:
                action = int(logits[0, 0].argmax())
            else:
                action = int(torch.multinomial(logits[0, 0].softmax(-1), 1, generator=generator))
            obs, reward, term, trunc, info = env.step(action)
            total += float(reward)
            steps += 1
            done = term or trunc
        returns.append(total)
        lengths.append(steps)
        for key, value in info.get("episode_extras", {}).items():
            extras.setdefault(key, []).append(float(value))
    env.close()
    stats: dict[str, Any] = {
        "checkpoint_env_steps": ckpt["tracker"]["env_steps"],
        "episodes": len(returns),
        "episode_return_mean": float(np.mean(returns)),
        "episode_return_std": float(np.std(returns)),
        "episode_return_min": float(np.min(returns)),
        "episode_return_max": float(np.max(returns)),
        "episode_length_mean": float(np.mean(lengths)),
    }
    stats.update({f"{k}_mean": float(np.mean(v)) for k, v in extras.items()})
    return stats
