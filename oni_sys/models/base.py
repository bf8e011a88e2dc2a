"""The interface every policy network implements (:class:`ActorCritic`).

Every tensor passed to a model is ``[T, B, ...]`` (time, batch). A recurrent state ``[B, H]`` is
reset to zeros before every step whose ``first`` flag is set (the first observation of an
episode), so the env runner and the learner unroll the core identically.
"""

from __future__ import annotations

import torch
from torch import nn


def ortho_init(layer: nn.Linear, gain: float) -> nn.Linear:
    """Orthogonal weights, zero bias: the standard PPO init (Engstrom et al. 2020); policy heads
    use a small gain."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """Base class: a policy head (action logits) and a value head over a shared body."""

    #: Size of the recurrent state, or 0 for a feed-forward model.
    state_size: int = 0

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """Zero recurrent state ``[B, H]`` (``H`` is 0 for feed-forward models)."""
        return torch.zeros(batch_size, self.state_size)

    def forward(
        self,
        obs: dict[str, torch.Tensor],
        state: torch.Tensor,
        first: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the model over ``T`` steps.

        Args:
            obs: observation tensors, each ``[T, B, ...]``.
            state: recurrent state before step 0, ``[B, H]``.
            first: ``[T, B]`` bool, True where the observation starts an episode.

        Returns:
            ``(logits [T, B, A], values [T, B], final_state [B, H])``.
        """
        raise NotImplementedError


def unroll_gru(
    cell: nn.GRUCell, x: torch.Tensor, state: torch.Tensor, first: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unroll a GRU cell over ``x [T, B, D]``, zeroing the state where ``first [T, B]`` is set."""
    outputs = []
    keep = (~first).to(x.dtype).unsqueeze(-1)
    for t in range(x.shape[0]):
        state = cell(x[t], state * keep[t])
        outputs.append(state)
    return torch.stack(outputs), state
