"""``runtime.address=null`` starts a private Ray instance, whatever the environment says."""

from __future__ import annotations


def test_a_local_run_does_not_join_the_cluster_named_by_ray_address(train, monkeypatch):
    # `ray start` users and Ray jobs have RAY_ADDRESS set; ray.init() without an address would
    # join that cluster (here: nothing listens, so it would fail) instead of starting its own.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    _, _, rows = train(
        "configs/cartpole.yaml",
        "runtime.kind=ray",
        "train.total_env_steps=4000",
        "train.tensorboard=false",
    )
    assert rows[-1]["env_steps"] >= 4000 and rows[-1]["updates"] > 0
