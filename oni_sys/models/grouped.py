"""One policy per agent group (``model.policy_groups``) behind the single-model interface.

:class:`GroupedPolicy` runs each batch column (one agent slot, whose group index is in
``obs["policy_group"]``) through its group's own network and puts the outputs back in order.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import torch
from torch import nn

from oni_sys.contracts import GROUP_KEY
from oni_sys.models.base import ActorCritic


class GroupedPolicy(ActorCritic):
    """``num_groups`` independent networks, chosen per column by ``obs["policy_group"]``."""

    def __init__(self, obs_space: gym.spaces.Dict, build: Callable[[gym.spaces.Dict], ActorCritic]):
        super().__init__()
        num_groups = int(obs_space[GROUP_KEY].n)
        inner = gym.spaces.Dict({k: v for k, v in obs_space.spaces.items() if k != GROUP_KEY})
        self.members = nn.ModuleList(build(inner) for _ in range(num_groups))
        self.state_size = self.members[0].state_size

    def forward(self, obs, state, first):
        groups = obs[GROUP_KEY][0].long()  # [B]: a column's group is the same at every step
        inner = {k: v for k, v in obs.items() if k != GROUP_KEY}
        params = values = new_state = None
        for g, member in enumerate(self.members):
            cols = torch.nonzero(groups == g).squeeze(-1)
            if cols.numel() == 0:
                continue
            p, v, s = member({k: x[:, cols] for k, x in inner.items()}, state[cols], first[:, cols])
            if params is None:
                T, B = first.shape
                params = p.new_zeros(T, B, p.shape[-1])
                values = v.new_zeros(T, B)
                new_state = s.new_zeros(B, s.shape[-1])
            params[:, cols], values[:, cols], new_state[cols] = p, v, s
        return params, values, new_state
