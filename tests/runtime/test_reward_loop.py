"""The full ONI loop: labels become intrinsic rewards while training; nothing waits for labels."""

from __future__ import annotations

import pytest

from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import read_metrics

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
def test_no_labels_means_zero_intrinsic_reward_and_no_waiting(
    tmp_path, llm_server, llm_overrides, kind
):
    """The LLM answers the start-up question, then goes away for good: training runs its whole
    budget without waiting, every intrinsic reward is 0, and the metrics say the annotator is
    down (the outage is shorter than annotator.max_outage_s)."""
    cfg = load_config(
        "configs/oni/small/score_hashing.yaml",
        [
            f"runs_dir={tmp_path}",
            "train.progress=false",
            *FAST,
            f"runtime.kind={kind}",
            "train.total_env_steps=10000",
            *llm_overrides,
            "annotator.max_retries=1",  # a failed question tells at once that it is down
        ],
    )
    runtime = make_runtime(cfg)
    runtime.setup()  # the annotator answered one real question
    llm_server.kill()  # and now nothing answers
    run_dir = runtime.run()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["env_steps"] >= 10000
    assert all(r.get("labels_total") in (0, None) for r in rows)
    assert all(r["intrinsic_reward_mean"] == 0.0 for r in rows if "intrinsic_reward_mean" in r)
    assert all(
        r["intrinsic_reward_nonzero"] == 0.0 for r in rows if "intrinsic_reward_nonzero" in r
    )
    assert all((r.get("reward_snapshot_version") or 0) == 0 for r in rows)
    assert any(r.get("annotator_up") == 0 for r in rows)
