"""Evaluate a run's latest checkpoint: play episodes and report their statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from oni_sys.config import ConfigError, config_from_dict, parse_overrides
from oni_sys.envs.spec import build_slot_env
from oni_sys.models.policy import Policy, interface_of, stack_obs
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
    env = build_slot_env(cfg.env)
    decisions = env.reset(seed=opts["seed"])
    policy = Policy(cfg.model, cfg.env.id, interface_of(env, decisions, cfg.model))
    policy.load_weights(ckpt["learner"]["state"]["model"])
    policy.net.eval()
    generator = torch.Generator().manual_seed(opts["seed"])
    names = policy.interface.slot_names
    returns, lengths, extras = [], [], {}
    agent_returns: dict[str, list[float]] = {}
    for episode in range(opts["episodes"]):
        if episode:
            decisions = env.reset(seed=opts["seed"] + episode)
        state = policy.initial_state(len(names))
        first = np.ones(len(names), dtype=bool)
        totals = np.zeros(len(names))
        acted, finished = set(), set()
        last_info: dict[int, dict] = {}
        steps = 0
        # One episode of every agent; a SlotEnv resets itself at the end, so stop there.
        while steps < opts["max_steps"] and (not acted or acted - finished):
            slots = sorted(s for s in decisions if s not in finished)
            if not slots:
                break
            obs = stack_obs([policy.model_obs(*decisions[s], s) for s in slots])
            idx = torch.as_tensor(slots)
            actions, _, state_out = policy.act(
                obs, state[idx], first[slots], generator, opts["deterministic"]
            )
            state[idx], first[slots] = state_out, False
            acted.update(slots)
            outcomes, decisions = env.step(
                {s: policy.to_env(a) for s, a in zip(slots, actions, strict=True)}
            )
            steps += 1
            for out in outcomes:
                totals[out.slot] += out.reward
                last_info[out.slot] = out.info
                if out.terminated or out.truncated:
                    finished.add(out.slot)
        # An episode cut by max_steps reports its extras (e.g. NetHack's score) as they stand.
        for s in sorted(acted):
            for key, value in last_info.get(s, {}).get("episode_extras", {}).items():
                extras.setdefault(key, []).append(float(value))
        for s in sorted(acted):
            returns.append(float(totals[s]))
            if len(names) > 1:
                agent_returns.setdefault(names[s], []).append(float(totals[s]))
        lengths.append(steps)
    env.close()
    stats: dict[str, Any] = {
        "checkpoint_env_steps": ckpt["tracker"]["env_steps"],
        "episodes": len(lengths),
        "episode_return_mean": float(np.mean(returns)),
        "episode_return_std": float(np.std(returns)),
        "episode_return_min": float(np.min(returns)),
        "episode_return_max": float(np.max(returns)),
        "episode_length_mean": float(np.mean(lengths)),
    }
    stats.update({f"{k}_mean": float(np.mean(v)) for k, v in extras.items()})
    stats.update({f"agent_return/{k}_mean": float(np.mean(v)) for k, v in agent_returns.items()})
    return stats
