"""CartPole-v1 is solved (mean return >= 450) within 300k env steps in both runtimes."""

from __future__ import annotations

import pytest

from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import read_metrics


def _train(tmp_path, *overrides: str):
    cfg = load_config(
        "configs/cartpole.yaml",
        [f"runs_dir={tmp_path}", "train.stop_at_return=450", "train.progress=false", *overrides],
    )
    runtime = make_runtime(cfg)
    runtime.setup()
    run_dir = runtime.run()
    return runtime.tracker, read_metrics(run_dir / "metrics.jsonl")


def test_serial_solves_cartpole(tmp_path):
    tracker, rows = _train(tmp_path, "runtime.kind=serial", "seed=1")
    assert tracker.return_mean() >= 450, rows[-1]
    assert tracker.env_steps <= 300_000
    assert rows[-1]["episode_return_mean"] >= 450
    assert all(r["policy_lag_mean"] == 0 for r in rows)  # serial: always the newest weights


@pytest.mark.slow
def test_ray_solves_cartpole_with_two_runners(tmp_path):
    tracker, rows = _train(tmp_path, "runtime.kind=ray", "runtime.num_env_runners=2", "seed=2")
    assert tracker.return_mean() >= 450, rows[-1]
    assert tracker.env_steps <= 300_000
    # Asynchronous: the runners act with slightly old weights, and the lag is measured.
    assert max(r["policy_lag_mean"] for r in rows) > 0
    assert max(r["policy_lag_max"] for r in rows) <= 20


#: keys measured with a clock: they differ between two identical runs
TIMING = ("sps", "learner_idle_fraction", "runner_busy_fraction")


def test_serial_is_deterministic(tmp_path):
    args = ["runtime.kind=serial", "train.total_env_steps=8192", "train.log_every_updates=4"]
    _, a = _train(tmp_path / "a", *args)
    _, b = _train(tmp_path / "b", *args)
    strip = lambda rows: [  # noqa: E731
        {k: v for k, v in r.items() if k not in TIMING and not k.endswith("_time")} for r in rows
    ]
    assert strip(a) == strip(b)
