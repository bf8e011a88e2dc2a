"""Continuous (Box) actions: a tanh-squashed Gaussian policy learns Pendulum-v1."""

from __future__ import annotations

from oni_sys.evaluate import evaluate


def test_pendulum_improves(train):
    _, run_dir, rows = train(
        "configs/pendulum.yaml", "train.total_env_steps=150000", "train.tensorboard=false"
    )
    returns = [r["episode_return_mean"] for r in rows]
    # A random policy scores about -1200 per 200-step episode; swinging up and balancing
    # scores about -150 to -200. Within 150k steps the policy gets well past half-way.
    assert returns[0] < -900, returns
    assert returns[-1] > -600, returns
    # The greedy policy (the Gaussian's mean, squashed into the bounds) does as well.
    stats = evaluate(run_dir, ["episodes=10", "deterministic=true"])
    assert stats["episode_return_mean"] > -600, stats
