"""The policy: one object owns the network, the action distribution and observation conversion.

The env runner and ``oni-sys eval`` call :meth:`Policy.act`; the policy learner calls
:meth:`Policy.evaluate_actions`. Every role that builds a policy takes the spaces from
:func:`interface_of` (through :func:`oni_sys.actors.env_runner.probe_env` where no env is at
hand), so they always agree.

Example::

    env = build_slot_env(cfg.env)
    decisions = env.reset(seed=0)
    policy = Policy(cfg.model, cfg.env.id, interface_of(env, decisions, cfg.model))
    obs = stack_obs([policy.model_obs(raw, info, slot) for slot, (raw, info) in decisions.items()])
    actions, logp, state = policy.act(obs, policy.initial_state(1), np.ones(1, bool), generator)
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from oni_sys.contracts import GROUP_KEY, MASK_KEY, EnvInterface
from oni_sys.models import build_model
from oni_sys.models.distributions import ActionDist, make_action_dist
from oni_sys.models.spaces import dict_space, obs_to_dict

Decisions = dict[int, tuple[Any, dict]]


def interface_of(env: Any, decisions: Decisions, model_cfg) -> EnvInterface:
    """The interface of a slot env (``observation_space``, ``action_space``, ``slot_names``),
    given the decisions of its first reset (masks in ``info`` show up there)."""
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
            "model.policy_groups: every agent needs a group; none is given for "
            + ", ".join(missing)
        )
    if errors:
        raise ConfigError(errors)
    return tuple(where[n] for n in names)


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


def stack_obs(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-slot observation dicts into one dict of ``[B, ...]`` arrays."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class Policy:
    """The network for ``model.*``, its action distribution, and the conversion of raw
    observations into its input.

    Args:
        model_cfg: the ``model`` section of the config.
        env_id: the env spec (``model.kind=auto`` picks the NetHack network for ``nle:``).
        interface: the env's spaces (:func:`interface_of`).
        device: where the network lives (the learner's device; runners act on the CPU).
    """

    def __init__(self, model_cfg, env_id: str, interface: EnvInterface, device: Any = "cpu"):
        self.interface = interface
        self.device = torch.device(device)
        self.dist: ActionDist = make_action_dist(
            interface.action_space, model_cfg.action_squash, model_cfg.log_std_init
        )
        self.net = build_model(model_cfg, env_id, interface.obs_space, self.dist).to(self.device)
        if self.device.type == "cpu":
            # Convolution weights channels-last, as their inputs are (models.base.cpu_conv_layout).
            self.net.to(memory_format=torch.channels_last)

    @property
    def state_size(self) -> int:
        """Size of the recurrent state (0 for a feed-forward network)."""
        return self.net.state_size

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """Zero recurrent state ``[B, H]``."""
        return self.net.initial_state(batch_size)

    def num_parameters(self) -> int:
        """Trainable parameters of the network."""
        return sum(p.numel() for p in self.net.parameters())

    # -- observations -------------------------------------------------------------------------
    def model_obs(self, raw: Any, info: dict, slot: int = 0) -> dict[str, np.ndarray]:
        """One raw observation (and its info) of agent slot ``slot`` as the network's input."""
        interface = self.interface
        obs = obs_to_dict(raw, interface.raw_obs_space)
        if interface.mask_from_info or interface.slot_groups is not None:
            obs = dict(obs)
        if interface.mask_from_info:
            size = interface.obs_space[MASK_KEY].shape[0]
            obs[MASK_KEY] = _mask_vector(info.get(MASK_KEY), size)
        if interface.slot_groups is not None:
            obs[GROUP_KEY] = np.int64(interface.slot_groups[slot])
        return obs

    # -- acting (env runner, evaluation) ------------------------------------------------------
    @torch.no_grad()
    def act(
        self,
        obs: dict[str, np.ndarray],
        state: torch.Tensor,
        first: np.ndarray,
        generator: torch.Generator,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """One step for a batch ``[B]`` of decisions: ``(actions, logp, new_state)``.

        ``deterministic`` takes the most likely action instead of sampling.
        """
        obs_t = {k: torch.from_numpy(v).unsqueeze(0) for k, v in obs.items()}
        params, _, state = self.net(obs_t, state, torch.from_numpy(first).unsqueeze(0))
        mask = obs_t.get(MASK_KEY)
        mask = None if mask is None else mask[0]
        if deterministic:
            actions = self.dist.mode(params[0], mask)
            logp = self.dist.logp_entropy(params[0], actions, mask)[0]
        else:
            actions, logp = self.dist.sample(params[0], mask, generator)
        return actions.numpy(), logp.numpy(), state

    @torch.no_grad()
    def value(self, obs: dict[str, np.ndarray], state: torch.Tensor) -> np.ndarray:
        """Value of a batch ``[B]`` of observations that continue their episodes (the final
        observation of a time-limit truncation)."""
        obs_t = {k: torch.from_numpy(v).unsqueeze(0) for k, v in obs.items()}
        first = torch.zeros(1, len(state), dtype=torch.bool)
        _, values, _ = self.net(obs_t, state, first)
        return values[0].numpy()

    def to_env(self, action: np.ndarray) -> Any:
        """One slot's action as the env takes it."""
        return self.dist.to_env(action)

    # -- learning (policy learner) -------------------------------------------------------------
    def evaluate_actions(
        self,
        obs: dict[str, torch.Tensor],
        state: torch.Tensor,
        first: torch.Tensor,
        actions: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities and entropies of ``actions [T, B, ...]`` under the current network,
        and the values of all ``T + 1`` observations (the last one is the bootstrap):
        ``(logp [T, B], entropy [T, B], values [T + 1, B])``, with gradients."""
        T = actions.shape[0]
        params, values, _ = self.net(obs, state, first)
        mask = obs.get(MASK_KEY)
        mask = None if mask is None else mask[:T]
        logp, entropy = self.dist.logp_entropy(params[:T], actions, mask)
        return logp, entropy, values

    # -- weights ------------------------------------------------------------------------------
    def get_weights(self) -> dict[str, torch.Tensor]:
        """CPU copy of the network's weights (what runners load)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load weights from :meth:`get_weights` (or a checkpoint's ``model``)."""
        self.net.load_state_dict(weights)
