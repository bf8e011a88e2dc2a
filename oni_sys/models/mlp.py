"""Multi-layer perceptron actor-critic, optionally recurrent, with CNN encoders for images.

Every observation entry except ``"action_mask"`` is an input: image entries through a CNN each
(:mod:`oni_sys.models.encoders`), all others flattened; the features feed the optional GRU core
and separate policy and value towers (docs/ENVIRONMENTS.md, "Observations and networks").
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from oni_sys.contracts import MASK_KEY
from oni_sys.models.base import ActorCritic, ortho_init, unroll_gru
from oni_sys.models.distributions import ActionDist, as_dist
from oni_sys.models.encoders import ImageEncoder, image_layout

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


class MLPNet(ActorCritic):
    """Separate policy and value MLPs over the observation features (optionally a shared GRU)."""

    def __init__(
        self,
        obs_space: gym.spaces.Dict,
        actions: ActionDist | int,
        hidden_size: int = 64,
        num_layers: int = 2,
        activation: str = "tanh",
        core: str = "none",
        image_features: int = 256,
        conv_layers: list[list[int]] | None = None,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation {activation!r} is not allowed; use one of {', '.join(_ACTIVATIONS)}"
            )
        if core not in ("none", "gru"):
            raise ValueError(f"core {core!r} is not allowed; use none or gru")
        keys = sorted(k for k in obs_space.spaces if k != MASK_KEY)
        if not keys:
            raise ValueError(
                f"observation space {obs_space} has no entry for the model besides "
                f"{MASK_KEY!r}; it needs at least one numeric entry"
            )
        self.image_keys = [k for k in keys if image_layout(obs_space[k]) is not None]
        self.keys = [k for k in keys if k not in self.image_keys]
        self._vector_ndims = [(k, len(obs_space[k].shape)) for k in self.keys]
        # One CNN per image entry, shared by the policy and value towers.
        self.encoders = nn.ModuleList(
            ImageEncoder(obs_space[k], image_features, conv_layers) for k in self.image_keys
        )
        in_dim = sum(int(np.prod(obs_space[k].shape)) for k in self.keys)
        in_dim += image_features * len(self.image_keys)
        act = _ACTIVATIONS[activation]
        self.core = nn.GRUCell(in_dim, hidden_size) if core == "gru" else None
        self.state_size = hidden_size if core == "gru" else 0
        body_in = hidden_size if self.core is not None else in_dim

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            width = body_in
            for _ in range(num_layers):
                layers += [ortho_init(nn.Linear(width, hidden_size), np.sqrt(2)), act()]
                width = hidden_size
            return nn.Sequential(*layers)

        self.policy_body, self.value_body = tower(), tower()  # identities for 0 layers
        head_in = hidden_size if num_layers else body_in
        self.policy_head = as_dist(actions).make_head(head_in)
        self.value_head = ortho_init(nn.Linear(head_in, 1), 1.0)

    def forward(self, obs, state, first):
        parts = [
            obs[k].float().flatten(2) if nd else obs[k].float().unsqueeze(-1)
            for k, nd in self._vector_ndims
        ]
        if self.image_keys:
            parts += [enc(obs[k]) for k, enc in zip(self.image_keys, self.encoders)]
        x = torch.cat(parts, dim=-1)
        if self.core is not None:
            x, state = unroll_gru(self.core, x, state, first)
        logits = self.policy_head(self.policy_body(x))
        values = self.value_head(self.value_body(x)).squeeze(-1)
        return logits, values, state
