"""Envs that fail on purpose (fault injection): a real env does not crash on demand.

``env.id=faulty_env:CartPoleFailingAfterSteps`` (tests/ is on sys.path, see conftest.py).
"""

from __future__ import annotations

from gymnasium.envs.classic_control.cartpole import CartPoleEnv

FAULT_MESSAGE = "injected fault: the env broke after its step budget"


class CartPoleFailingAfterSteps(CartPoleEnv):
    """CartPole whose ``step`` raises once this process has stepped any of them
    ``fail_after`` times (a bug in a user's env, met mid-run)."""

    steps_taken = 0

    def __init__(self, fail_after: int = 300, **kwargs):
        super().__init__(**kwargs)
        self.fail_after = fail_after

    def step(self, action):
        type(self).steps_taken += 1
        if type(self).steps_taken > self.fail_after:
            raise RuntimeError(FAULT_MESSAGE)
        return super().step(action)
