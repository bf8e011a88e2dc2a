"""The mechanism: on a sparse key-door-goal task, LLM-style labels of captions make the goal
reachable. Extrinsic-only training never reaches it in the budget; ONI-hashing, -classification
and -ranking with the rules annotator reach it for every seed."""

from __future__ import annotations

import pytest

BUDGET = 150_000


def _rows(train, kind: str, seed: int, *overrides: str):
    _, _, rows = train(
        "configs/keydoor.yaml",
        f"reward.kind={kind}",
        f"seed={seed}",
        f"train.total_env_steps={BUDGET}",
        "train.tensorboard=false",
        *overrides,
    )
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extrinsic_only_never_learns_to_reach_the_goal(train, seed):
    rows = _rows(train, "none", seed)
    assert rows[-1]["env_steps"] >= BUDGET
    # A random walk stumbles on the goal about once in hundreds of episodes (a window mean of
    # ~0.006); a policy that has learnt the chain scores ~0.77. It never gets close.
    assert max(r["episode_return_mean"] or 0.0 for r in rows) < 0.05, [
        r["episode_return_mean"] for r in rows
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oni_hashing_with_rules_reaches_the_goal(train, seed):
    rows = _rows(train, "hashing", seed)
    # The goal reward is 1 - 0.9 * steps / max_steps (0.704 for the 23-step optimum); a mean of
    # 0.5 over the last 100 episodes means nearly every episode walks the whole chain.
    assert rows[-1]["episode_return_mean"] >= 0.5, [r["episode_return_mean"] for r in rows]
    assert rows[-1]["intrinsic_return_mean"] > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["classification", "ranking"])
def test_oni_learned_reward_models_with_rules_reach_the_goal(train, kind, seed):
    # The learned models must generalise from the annotator's answers: classification from
    # per-caption labels, ranking from preferences between caption pairs (normalised and
    # thresholded). Measured: classification first reaches a mean of 0.5 at 72-82k steps,
    # ranking at 41-72k. A run stops once it is there, which keeps this test short.
    prompt = "ranking" if kind == "ranking" else "classification"
    rows = _rows(train, kind, seed, f"annotator.prompt={prompt}", "train.stop_at_return=0.5")
    assert rows[-1]["episode_return_mean"] >= 0.5, [r["episode_return_mean"] for r in rows]
    assert rows[-1]["intrinsic_return_mean"] > 0
