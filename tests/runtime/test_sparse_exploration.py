"""Exploration survives the reward-free phase (docs/ALGORITHM.md §4, advantage normalisation).

Before a run has seen any reward signal, every advantage is value-function noise; the policy
must stay close to uniform instead of drifting into a deterministic corner, so that it can find
the first reward at all. Measured figures: docs/PERFORMANCE.md, "Exploration before the first
reward".
"""

from __future__ import annotations

import math

import pytest

ZERO_REWARD = ["env.kwargs={max_steps: 16}"]  # the vault is 18 steps away: the reward is always 0


def _entropies(rows, actions: int) -> list[float]:
    return [r["entropy"] / math.log(actions) for r in rows if "entropy" in r]


def test_zero_reward_env_keeps_its_entropy(train):
    _, _, rows = train(
        "configs/vault.yaml", "reward.kind=none", "train.total_env_steps=100000", *ZERO_REWARD
    )
    assert rows[-1]["env_steps"] >= 100_000
    assert all(r["reward_signal_seen"] == 0 for r in rows)
    assert _entropies(rows, 4)[-1] >= 0.95, _entropies(rows, 4)


def test_normalising_reward_free_batches_collapses_the_policy(train):
    # The same run with every batch normalised (the classic way): the noise, scaled up to unit
    # size, walks the policy into a corner. This is what the test above guards against.
    _, _, rows = train(
        "configs/vault.yaml",
        "reward.kind=none",
        "algo.normalize_after_signal=false",
        "train.total_env_steps=40000",
        *ZERO_REWARD,
    )
    assert _entropies(rows, 4)[-1] < 0.8, _entropies(rows, 4)


def test_keydoor_extrinsic_only_explores_for_the_whole_budget(train):
    # A random walk almost never completes KeyDoor's key -> door -> goal chain; without a
    # reward the policy stays near uniform for the whole run instead of giving up early.
    _, _, rows = train("configs/keydoor.yaml", "reward.kind=none", "train.total_env_steps=100000")
    assert rows[-1]["env_steps"] >= 100_000
    assert all(r["reward_signal_seen"] == 0 for r in rows)
    assert min(_entropies(rows, 8)) >= 0.95, _entropies(rows, 8)


@pytest.mark.parametrize(
    ("config", "kind", "actions", "overrides", "min_entropy"),
    [
        ("configs/vault.yaml", "none", 4, ["env.kwargs={size: 11}"], 0.95),
        ("configs/vault.yaml", "hashing", 4, ["env.kwargs={size: 11}"], 0.5),
        ("configs/keydoor.yaml", "hashing", 8, [], 0.5),
    ],
    ids=["vault11-extrinsic", "vault11-hashing", "keydoor-hashing"],
)
def test_sparse_grids_explore_until_the_first_success(
    train, config, kind, actions, overrides, min_entropy
):
    # The run stops once a full window of episodes has a positive mean return, i.e. soon after
    # the first success; until then the policy must not have collapsed. Extrinsic-only has no
    # signal at all before its first success and stays near uniform (measured: 0.999 of the
    # maximum, against 0.876 when every batch is normalised). With ONI-hashing the first labelled
    # caption is a real signal, which the policy follows (0.83-0.87 measured), and it must still
    # find the goal.
    _, _, rows = train(
        config,
        f"reward.kind={kind}",
        "train.total_env_steps=150000",
        "train.stop_at_return=0.0001",
        "train.log_every_updates=4",
        *overrides,
    )
    first = next((i for i, r in enumerate(rows) if (r["episode_return_mean"] or 0.0) > 0), None)
    assert first is not None, "no success in 150k steps"
    before = _entropies(rows[: first + 1], actions)
    assert min(before) >= min_entropy, before
