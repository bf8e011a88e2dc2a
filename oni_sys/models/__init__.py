"""Policy networks and the factory that picks one for an environment."""

from __future__ import annotations

import gymnasium as gym

from oni_sys.models.base import ActorCritic
from oni_sys.models.distributions import ActionDist


def build_model(
    model_cfg, env_id: str, obs_space: gym.spaces.Dict, actions: ActionDist | int
) -> ActorCritic:
    """Build the network named by ``model.kind`` (``auto``: NetHack net for ``nle:``, else MLP).

    With a ``policy_group`` entry in the observation space (``model.policy_groups``), one such
    network per group, behind :class:`~oni_sys.models.grouped.GroupedPolicy`.

    Example::

        cfg = load_config("configs/vault.yaml")  # oni_sys.config.load_config
        env = make_env(cfg.env.id, cfg.env.kwargs)  # oni_sys.envs.spec.make_env
        space, actions = dict_space(env.observation_space), make_action_dist(env.action_space)
        model = build_model(cfg.model, cfg.env.id, space, actions)  # an MLPNet
        obs = {k: torch.as_tensor(v)[None, None] for k, v in space.sample().items()}  # T = B = 1
        logits, values, state = model(obs, model.initial_state(1), torch.ones(1, 1, dtype=bool))
    """
    from oni_sys.models.grouped import GROUP_KEY, GroupedPolicy

    if GROUP_KEY in obs_space.spaces:
        return GroupedPolicy(
            obs_space, lambda inner: build_model(model_cfg, env_id, inner, actions)
        )
    kind = model_cfg.kind
    if kind == "auto":
        kind = "nethack" if env_id.startswith("nle:") else "mlp"
    if kind == "nethack":
        from oni_sys.models.nethack import NetHackNet

        return NetHackNet(
            obs_space,
            actions,
            hidden_size=model_cfg.hidden_size,
            embedding_dim=model_cfg.embedding_dim,
            crop_size=model_cfg.crop_size,
            map_embedding_dim=model_cfg.map_embedding_dim,
        )
    from oni_sys.models.mlp import MLPNet

    return MLPNet(
        obs_space,
        actions,
        hidden_size=model_cfg.hidden_size,
        num_layers=model_cfg.num_layers,
        activation=model_cfg.activation,
        core=model_cfg.core,
        image_features=model_cfg.image_features,
        conv_layers=model_cfg.conv_layers,
    )
