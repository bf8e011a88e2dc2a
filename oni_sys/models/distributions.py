"""Action distributions: how a policy head's output becomes actions, and back to log-probs.

:func:`make_action_dist` picks one per action space: a categorical for ``Discrete``, one per
dimension for ``MultiDiscrete`` and ``MultiBinary``, a diagonal Gaussian with a learnt,
state-independent log-std for a 1-D ``Box``. The env runner samples, the learner scores stored
actions and evaluation takes the most likely action; masked actions get logit ``-inf``.
Details: docs/ENVIRONMENTS.md ("Observations and networks").
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oni_sys.models.base import ortho_init

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def _apply_mask(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return logits
    mask = mask.bool()
    # A row without any legal action keeps its logits (no NaN from an all -inf softmax).
    mask = mask | ~mask.any(-1, keepdim=True)
    return logits.masked_fill(~mask, float("-inf"))


def categorical_logp_entropy(
    logits: torch.Tensor, actions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(a|x) and entropy of a categorical over the last axis of ``logits``.

    logits [..., A], actions [...] int64 -> (logp [...], entropy [...]).
    Logits of -inf (masked actions) are allowed.
    """
    log_probs = F.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    probs = log_probs.exp()
    # 0 * log 0 = 0 for masked actions; zero log_probs first so neither the value nor the
    # gradient of the product sees -inf (a where() on the product alone still yields NaN grads).
    safe_log_probs = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    return logp, -(probs * safe_log_probs).sum(-1)


def _sample_categorical(
    logits: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw from a masked categorical over the last axis: ``(actions, logp)``."""
    log_probs = F.log_softmax(_apply_mask(logits, mask), dim=-1)
    actions = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)
    return actions, log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


class ActionDist:
    """Base class. Shapes: ``params [..., param_size]``, ``actions [..., *action_shape]``."""

    #: shape and dtype of one stored action
    action_shape: tuple[int, ...] = ()
    action_dtype: np.dtype = np.dtype(np.int64)
    #: size of the policy head's output
    param_size: int = 0
    #: length of an action-mask vector (0: this space takes no mask)
    mask_size: int = 0

    def make_head(self, in_dim: int) -> nn.Module:
        """The policy head: features ``[..., in_dim]`` -> params ``[..., param_size]``."""
        return ortho_init(nn.Linear(in_dim, self.param_size), 0.01)

    def sample(
        self, params: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw actions for a batch ``params [B, P]``; returns ``(actions, logp [B])``."""
        raise NotImplementedError

    def mode(self, params: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The most likely actions ``[B, *action_shape]`` (deterministic evaluation)."""
        raise NotImplementedError

    def logp_entropy(
        self, params: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of ``actions`` and the entropy, each ``[...]``."""
        raise NotImplementedError

    def to_env(self, action: np.ndarray) -> Any:
        """One stored action as the env expects it."""
        raise NotImplementedError


class CategoricalDist(ActionDist):
    """``Discrete(n, start)``."""

    def __init__(self, space: gym.spaces.Discrete):
        self.n, self.start = int(space.n), int(space.start)
        self.param_size = self.mask_size = self.n

    def sample(self, params, mask, generator):
        return _sample_categorical(params, mask, generator)

    def mode(self, params, mask):
        return _apply_mask(params, mask).argmax(-1)

    def logp_entropy(self, params, actions, mask=None):
        return categorical_logp_entropy(_apply_mask(params, mask), actions)

    def to_env(self, action):
        return int(action) + self.start


class MultiCategoricalDist(ActionDist):
    """``MultiDiscrete(nvec, start)`` (1-D): one categorical per dimension."""

    def __init__(self, space: gym.spaces.MultiDiscrete):
        if len(space.nvec.shape) != 1:
            raise TypeError(
                f"action space {space} is not supported: MultiDiscrete actions must be 1-D"
            )
        self.nvec = [int(n) for n in space.nvec]
        self.start = np.asarray(space.start, dtype=np.int64)
        self.space_dtype = space.dtype
        self.action_shape = (len(self.nvec),)
        self.param_size = self.mask_size = sum(self.nvec)

    def _split(self, x: torch.Tensor | None) -> list[Any]:
        if x is None:
            return [None] * len(self.nvec)
        return list(torch.split(x, self.nvec, dim=-1))

    def sample(self, params, mask, generator):
        parts = zip(self._split(params), self._split(mask), strict=True)
        acts, logps = zip(*(_sample_categorical(p, m, generator) for p, m in parts), strict=True)
        return torch.stack(acts, -1), torch.stack(logps, -1).sum(-1)

    def mode(self, params, mask):
        parts = zip(self._split(params), self._split(mask), strict=True)
        return torch.stack([_apply_mask(p, m).argmax(-1) for p, m in parts], -1)

    def logp_entropy(self, params, actions, mask=None):
        logp, ent = 0.0, 0.0
        parts = zip(self._split(params), self._split(mask), strict=True)
        for i, (p, m) in enumerate(parts):
            lp, e = categorical_logp_entropy(_apply_mask(p, m), actions[..., i])
            logp, ent = logp + lp, ent + e
        return logp, ent

    def to_env(self, action):
        return (np.asarray(action, dtype=np.int64) + self.start).astype(self.space_dtype)


class _GaussianHead(nn.Module):
    """Mean from a linear layer, log-std a free parameter: params = ``[mean, log_std]``."""

    def __init__(self, in_dim: int, dim: int, log_std_init: float):
        super().__init__()
        self.mean = ortho_init(nn.Linear(in_dim, dim), 0.01)
        self.log_std = nn.Parameter(torch.full((dim,), float(log_std_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.mean(x)
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=-1)


class GaussianDist(ActionDist):
    """1-D ``Box`` actions: diagonal Gaussian, squashed by ``tanh`` or clipped to the bounds."""

    action_dtype = np.dtype(np.float32)

    def __init__(self, space: gym.spaces.Box, squash: str = "tanh", log_std_init: float = 0.0):
        if len(space.shape) != 1:
            raise TypeError(f"action space {space} is not supported: Box actions must be 1-D")
        if squash not in ("tanh", "clip"):
            raise ValueError(f"action squash {squash!r} is not allowed; use tanh or clip")
        self.low = space.low.astype(np.float64)
        self.high = space.high.astype(np.float64)
        self.bounded = bool(np.all(np.isfinite(self.low)) and np.all(np.isfinite(self.high)))
        if squash == "tanh" and not self.bounded:
            raise ValueError(
                f"action space {space} has infinite bounds, which tanh cannot map onto; "
                "use model.action_squash=clip"
            )
        self.squash = squash
        self.dim = int(space.shape[0])
        self.log_std_init = log_std_init
        self.action_shape = (self.dim,)
        self.param_size = 2 * self.dim
        self.space_dtype = space.dtype

    def make_head(self, in_dim):
        return _GaussianHead(in_dim, self.dim, self.log_std_init)

    def _mean_std(self, params):
        mean, log_std = params[..., : self.dim], params[..., self.dim :]
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()

    def sample(self, params, mask, generator):
        mean, std = self._mean_std(params)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        actions = mean + std * noise
        return actions, self.logp_entropy(params, actions)[0]

    def mode(self, params, mask):
        return self._mean_std(params)[0]

    def logp_entropy(self, params, actions, mask=None):
        mean, std = self._mean_std(params)
        log_std = std.log()
        z = (actions - mean) / std
        logp = (-0.5 * z**2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        entropy = (0.5 + 0.5 * np.log(2 * np.pi) + log_std).sum(-1)
        return logp, entropy

    def to_env(self, action):
        u = np.asarray(action, dtype=np.float64)
        if self.squash == "tanh":
            # A convex combination of the bounds: tanh = -1 / +1 give low / high exactly, and
            # the clip keeps float rounding from stepping outside them.
            t = 0.5 * (np.tanh(u) + 1.0)
            u = (1.0 - t) * self.low + t * self.high
        return np.clip(u, self.low, self.high).astype(self.space_dtype)


def make_action_dist(
    space: gym.Space, squash: str = "tanh", log_std_init: float = 0.0
) -> ActionDist:
    """The distribution for an action space (one clear error for a space we cannot act in).

    Example::

        dist = make_action_dist(gym.spaces.Discrete(4))
        head = dist.make_head(64)  # features [..., 64] -> logits [..., 4]
        actions, logp = dist.sample(head(torch.zeros(2, 64)), None, torch.Generator())
        env_action = dist.to_env(actions[0].numpy())  # an int in 0..3
    """
    if isinstance(space, gym.spaces.Discrete):
        return CategoricalDist(space)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return MultiCategoricalDist(space)
    if isinstance(space, gym.spaces.MultiBinary) and len(space.shape) == 1:
        return MultiCategoricalDist(
            gym.spaces.MultiDiscrete([2] * int(space.shape[0]), dtype=space.dtype)
        )
    if isinstance(space, gym.spaces.Box):
        return GaussianDist(space, squash, log_std_init)
    raise TypeError(
        f"action space {space} is not supported; use Discrete, MultiDiscrete, a 1-D "
        "MultiBinary or a 1-D Box"
    )


def as_dist(actions: ActionDist | int) -> ActionDist:
    """An :class:`ActionDist`, given one or a number of discrete actions."""
    if isinstance(actions, ActionDist):
        return actions
    return CategoricalDist(gym.spaces.Discrete(int(actions)))
