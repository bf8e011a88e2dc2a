"""NetHackScore with the NetHack network runs 20k steps in both runtimes; eval reads the run."""

from __future__ import annotations

import pytest

from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import load_checkpoint, read_metrics


def _run_nethack(tmp_path, kind: str):
    cfg = load_config(
        "configs/nethack_score.yaml",
        [
            f"runs_dir={tmp_path}",
            f"runtime.kind={kind}",
            "train.total_env_steps=20000",
            "train.progress=false",
            "model.hidden_size=128",
        ],
    )
    runtime = make_runtime(cfg)
    runtime.setup()
    run_dir = runtime.run()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["env_steps"] >= 20000
    for key in ("env_steps", "sps", "episode_return_mean", "policy_lag_mean", "wall_time"):
        assert key in rows[-1]
    assert runtime.tracker.episodes > 0 and "score_mean" in rows[-1] and "depth_mean" in rows[-1]
    ckpt = load_checkpoint(run_dir)
    assert any("glyph" in key for key in ckpt["learner"]["state"]["model"])  # the NetHack net
    return run_dir


def test_nethack_serial_20k(tmp_path, cli):
    run_dir = _run_nethack(tmp_path, "serial")
    result = cli("eval", str(run_dir), "episodes=2", "max_steps=300")
    assert result.returncode == 0, result.stderr
    assert "episode_return_mean:" in result.stdout and "score_mean:" in result.stdout


@pytest.mark.slow
def test_nethack_ray_20k(tmp_path):
    _run_nethack(tmp_path, "ray")
