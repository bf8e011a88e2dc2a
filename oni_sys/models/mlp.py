"""Multi-layer perceptron actor-critic for vector observations, optionally recurrent."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from oni_sys.models.base import ActorCritic, unroll_gru

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


def _ortho(layer: nn.Linear, gain: float) -> nn.Linear:
    # Orthogonal init with small policy-head gain: the standard PPO recipe (Engstrom et al. 2020).
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class MLPNet(ActorCritic):
    """Separate policy and value MLPs over the flattened observation (optionally a shared GRU)."""

    def __init__(
        self,
        obs_space: gym.spaces.Dict,
        num_actions: int,
        hidden_size: int = 64,
        num_layers: int = 2,
        activation: str = "tanh",
        core: str = "none",
    ):
        super().__init__()
        self.keys = sorted(obs_space.spaces)
        in_dim = sum(int(np.prod(obs_space[k].shape)) for k in self.keys)
        act = _ACTIVATIONS[activation]
        self.core = nn.GRUCell(in_dim, hidden_size) if core == "gru" else None
        self.state_size = hidden_size if core == "gru" else 0
        body_in = hidden_size if self.core is not None else in_dim

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            width = body_in
            for _ in range(num_layers):
                layers += [_ortho(nn.Linear(width, hidden_size), np.sqrt(2)), act()]
                width = hidden_size
            return nn.Sequential(*layers)

        self.policy_body, self.value_body = tower(), tower()
        self.policy_head = _ortho(nn.Linear(hidden_size, num_actions), 0.01)
        self.value_head = _ortho(nn.Linear(hidden_size, 1), 1.0)

    def forward(self, obs, state, first):
        x = torch.cat([obs[k].float().flatten(2) for k in self.keys], dim=-1)
        if self.core is not None:
            x, state = unroll_gru(self.core, x, state, first)
        logits = self.policy_head(self.policy_body(x))
        values = self.value_head(self.value_body(x)).squeeze(-1)
        return logits, values, state
