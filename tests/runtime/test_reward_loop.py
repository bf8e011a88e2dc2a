"""The full ONI loop: labels become intrinsic rewards while training; nothing waits for labels."""

from __future__ import annotations

import socket

import pytest

FAST = ["model.hidden_size=64", "train.log_every_updates=5"]


@pytest.mark.slow
def test_full_loop_nethack_ray_embedded_gemma(train):
    """ONI-hashing on NetHackScore, Ray runtime, embedded Gemma: labels arrive, rewards flow."""
    _, run_dir, rows = train(
        "configs/oni/small/score_hashing.yaml", *FAST, "train.total_env_steps=30000"
    )
    last = rows[-1]
    assert last["env_steps"] >= 30000
    assert last["labels_total"] > 0
    assert max(r.get("reward_snapshot_version") or 0 for r in rows) > 0
    assert max(r.get("intrinsic_reward_nonzero") or 0 for r in rows) > 0
    assert max(r.get("intrinsic_return_mean") or 0 for r in rows) > 0
    assert (run_dir / "labels.sqlite").exists() and (run_dir / "curves.png").exists()


@pytest.mark.parametrize("kind", ["serial", pytest.param("ray", marks=pytest.mark.slow)])
def test_no_labels_means_zero_intrinsic_reward_and_no_waiting(train, kind):
    """The LLM is unreachable: training runs its whole budget and every intrinsic reward is 0."""
    with socket.socket() as s:  # a port nothing listens on: every request is refused
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    _, run_dir, rows = train(
        "configs/oni/small/score_hashing.yaml",
        *FAST,
        f"runtime.kind={kind}",
        "train.total_env_steps=10000",
        "annotator.backend=openai",
        f"annotator.base_url=http://127.0.0.1:{dead}/v1",
        "annotator.model=unreachable",
        "annotator.timeout_s=1",
        "annotator.max_retries=1",
    )
    assert rows[-1]["env_steps"] >= 10000
    assert all(r.get("labels_total") in (0, None) for r in rows)
    assert all(r["intrinsic_reward_mean"] == 0.0 for r in rows if "intrinsic_reward_mean" in r)
    assert all(
        r["intrinsic_reward_nonzero"] == 0.0 for r in rows if "intrinsic_reward_nonzero" in r
    )
    assert all((r.get("reward_snapshot_version") or 0) == 0 for r in rows)
