"""What the policy sees of an environment, and how one decision becomes model input.

Every role that builds a model (env runners, the learner, evaluation, the Ray driver) takes
the observation and action spaces from :func:`probe_env`, so they always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from oni_sys.envs.slots import Decisions, SlotEnv, make_slot_env
from oni_sys.envs.spaces import MASK_KEY, dict_space, obs_to_dict
from oni_sys.models.distributions import ActionDist, make_action_dist
from oni_sys.models.grouped import GROUP_KEY


@dataclass
class EnvInterface:
    """The spaces of one environment as the policy sees them.

    ``obs_space`` is the model's input: a flat Dict of arrays, with an ``action_mask`` entry
    when the env gives masks (in its observation, or in ``info["action_mask"]``, which is then
    copied into the observation dict so it travels with it to the learner).
    """

    obs_space: gym.spaces.Dict
    raw_obs_space: gym.Space
    action_space: gym.Space
    slot_names: tuple[str, ...]
    mask_from_info: bool = False
    #: policy group of each slot (``model.policy_groups``), or None when all share one policy
    slot_groups: tuple[int, ...] | None = None

    def dist(self, model_cfg) -> ActionDist:
        """The action distribution for this env's action space."""
        return make_action_dist(self.action_space, model_cfg.action_squash, model_cfg.log_std_init)

    def model_obs(self, raw: Any, info: dict, slot: int = 0) -> dict[str, np.ndarray]:
        """One raw observation (and its info) of agent slot ``slot`` as the model's input."""
        obs = obs_to_dict(raw, self.raw_obs_space)
        if self.mask_from_info or self.slot_groups is not None:
            obs = dict(obs)
        if self.mask_from_info:
            obs[MASK_KEY] = _mask_vector(info.get(MASK_KEY), self.obs_space[MASK_KEY].shape[0])
        if self.slot_groups is not None:
            obs[GROUP_KEY] = np.int64(self.slot_groups[slot])
        return obs


def _mask_vector(mask: Any, size: int) -> np.ndarray:
    if mask is None:  # no mask on this step: every action is legal
        return np.ones(size, np.int8)
    if isinstance(mask, (tuple, list)) and mask and not np.isscalar(mask[0]):
        mask = np.concatenate([np.asarray(m).reshape(-1) for m in mask])
    out = np.asarray(mask).astype(np.int8).reshape(-1)
    if out.shape[0] != size:
        raise ValueError(
            f"info['action_mask'] has {out.shape[0]} entries; the action space needs {size} "
            "(one per action, MultiDiscrete dimensions concatenated)"
        )
    return out


def interface_of(env: SlotEnv, decisions: Decisions, model_cfg) -> EnvInterface:
    """The interface of ``env``, given the decisions of its first reset (masks show up there)."""
    obs_space = dict_space(env.observation_space)
    mask_from_info = MASK_KEY not in obs_space.spaces and any(
        MASK_KEY in info for _, info in decisions.values()
    )
    if mask_from_info:
        size = make_action_dist(env.action_space, model_cfg.action_squash).mask_size
        if size == 0:
            raise ValueError(
                f"the env gives info['action_mask'] but its action space {env.action_space} "
                "takes no mask; masks work with Discrete and MultiDiscrete actions"
            )
        obs_space = gym.spaces.Dict({**obs_space.spaces, MASK_KEY: gym.spaces.MultiBinary(size)})
    slot_groups = _slot_groups(tuple(env.slot_names), model_cfg.policy_groups)
    if slot_groups is not None:
        obs_space = gym.spaces.Dict(
            {**obs_space.spaces, GROUP_KEY: gym.spaces.Discrete(len(model_cfg.policy_groups))}
        )
    return EnvInterface(
        obs_space=obs_space,
        raw_obs_space=env.observation_space,
        action_space=env.action_space,
        slot_names=tuple(env.slot_names),
        mask_from_info=mask_from_info,
        slot_groups=slot_groups,
    )


def _slot_groups(names: tuple[str, ...], groups: dict[str, list[str]]) -> tuple[int, ...] | None:
    """Group index of every agent slot, checking that the groups cover each agent once."""
    if not groups:
        return None
    from oni_sys.config import ConfigError

    where: dict[str, int] = {}
    errors = []
    for g, (group, agents) in enumerate(groups.items()):
        for agent in agents:
            if agent not in names:
                errors.append(
                    f"model.policy_groups.{group}: {agent!r} is not an agent of this env; "
                    f"its agents are {', '.join(names)}"
                )
            elif agent in where:
                errors.append(f"model.policy_groups: {agent!r} is in more than one group")
            where[agent] = g
    missing = [n for n in names if n not in where]
    if missing:
        errors.append(
            f"model.policy_groups: every agent needs a group; none is given for {', '.join(missing)}"
        )
    if errors:
        raise ConfigError(errors)
    return tuple(where[n] for n in names)


def build_slot_env(cfg) -> SlotEnv:
    """One environment from ``env.id``/``env.kwargs``, as agent slots."""
    from oni_sys.envs.spec import make_env

    return make_slot_env(make_env(cfg.env.id, cfg.env.kwargs))


def probe_env(cfg) -> EnvInterface:
    """Build one env, reset it with the run's seed, and read its interface."""
    env = build_slot_env(cfg)
    try:
        return interface_of(env, env.reset(seed=cfg.seed), cfg.model)
    finally:
        env.close()


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-slot observation dicts into one dict of ``[B, ...]`` arrays."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@torch.no_grad()
def act(
    model,
    dist: ActionDist,
    obs: dict[str, np.ndarray],
    state: torch.Tensor,
    first: np.ndarray,
    generator: torch.Generator,
    deterministic: bool = False,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """One policy step for a batch ``[B]`` of decisions: ``(actions, logp, new_state)``."""
    obs_t = {k: torch.from_numpy(v).unsqueeze(0) for k, v in obs.items()}
    params, _, state = model(obs_t, state, torch.from_numpy(first).unsqueeze(0))
    mask = obs_t.get(MASK_KEY)
    mask = None if mask is None else mask[0]
    if deterministic:
        actions = dist.mode(params[0], mask)
        logp = dist.logp_entropy(params[0], actions, mask)[0]
    else:
        actions, logp = dist.sample(params[0], mask, generator)
    return actions.numpy(), logp.numpy(), state
