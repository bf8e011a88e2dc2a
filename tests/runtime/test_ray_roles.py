"""Env runners run at a lower CPU priority than the learner (``runtime.env_runner_niceness``):
on a node they share, the learner is the bottleneck (docs/PERFORMANCE.md, "A faster learner").
Every metrics row says how busy both roles were, and no row is only the learner finishing the
batches queued when the budget ran out."""

from __future__ import annotations

import os

import pytest
from procfs import niceness  # tests/procfs.py

from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import read_metrics

ray = pytest.importorskip("ray")


@pytest.mark.parametrize("added", [4, 0])
def test_env_runners_run_below_the_learner(tmp_path, added):
    seen: dict[str, list[int]] = {}
    cfg = load_config(
        "configs/cartpole.yaml",
        [
            f"runs_dir={tmp_path}",
            "train.progress=false",
            "train.tensorboard=false",
            "runtime.kind=ray",
            f"runtime.env_runner_niceness={added}",
            "train.total_env_steps=4000",
            "train.log_every_updates=1",
        ],
    )

    def read_priorities(row):
        if seen:
            return
        runner_pids = [ray.get(runtime.runners[i].pid.remote()) for i in range(2)]
        learner_pid = ray.get(runtime.learner.pid.remote())
        seen["runners"] = [niceness(pid) for pid in runner_pids]
        seen["learner"] = [niceness(learner_pid)]

    runtime = make_runtime(cfg, read_priorities)
    runtime.setup()
    rows = read_metrics(runtime.run() / "metrics.jsonl")
    assert seen, "no metrics row was written"
    learner = seen["learner"][0]
    assert learner >= os.nice(0)  # Ray starts its workers at its own niceness (15 by default)
    assert seen["runners"] == [min(learner + added, 19)] * 2, seen
    for row in rows:
        assert 0.0 < row["runner_busy_fraction"] <= 1.0, row
        assert 0.0 <= row["learner_idle_fraction"] <= 1.0, row
    # Up to 4 batches are still queued at the learner when the budget is spent; their updates
    # go into the last row, whose steps/s counts the collection only.
    steps = [row["env_steps"] for row in rows]
    assert steps == sorted(set(steps)), steps
    assert rows[-1]["updates"] == rows[-1]["env_steps"] // 512, rows[-1]
