"""A SIGKILLed env runner is replaced and the run finishes."""

from __future__ import annotations

import os
import signal

import pytest

from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import read_metrics


@pytest.mark.slow
def test_killed_env_runner_is_replaced(tmp_path):
    import ray

    cfg = load_config(
        "configs/cartpole.yaml",
        [
            f"runs_dir={tmp_path}",
            "runtime.kind=ray",
            "runtime.num_env_runners=2",
            "train.total_env_steps=40000",
            "train.log_every_updates=5",
            "train.progress=false",
        ],
    )
    killed: list[int] = []

    def kill_a_runner(row):
        if not killed:
            pid = ray.get(runtime.runners[0].pid.remote())
            os.kill(pid, signal.SIGKILL)  # a real crash: the process vanishes mid-work
            killed.append(pid)

    runtime = make_runtime(cfg, reporter=kill_a_runner)
    runtime.setup()
    run_dir = runtime.run()
    assert killed
    assert runtime.tracker.runner_restarts >= 1
    assert runtime.tracker.env_steps >= 40000
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["runner_restarts"] >= 1
    assert rows[-1]["env_steps"] >= 40000
