"""Resume restores everything the curves need: the cumulative counters (episodes, updates,
labels, annotator requests, reward-learner data) continue from the checkpoint instead of
restarting at 0, and so do the windows of recent returns (``episode_return_mean``,
``intrinsic_return_mean``). In both runtimes: the annotator's counters live in its actor there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import load_checkpoint, read_metrics

# KeyDoor with the rules annotator and ONI-hashing: labels arrive within the first updates.
# One row per update, so a row's intrinsic_return_mean is the window's mean at that update;
# a window larger than the run, so no episode leaves it.
SMALL = [
    "train.progress=false",
    "train.tensorboard=false",
    "train.log_every_updates=1",
    "train.checkpoint_every_updates=10",
    "train.return_window=1000",
    "env.num_envs=4",
    "algo.num_minibatches=2",
]
COUNTERS = (
    "episodes",
    "updates",
    "labels_total",
    "annotator_requests_total",
    "reward_labels_seen",
)


def _runtime(kind: str, *overrides: str):
    cfg = load_config("configs/keydoor.yaml", [*SMALL, f"runtime.kind={kind}", *overrides])
    if kind == "ray":
        cfg.runtime.num_env_runners = 1
    runtime = make_runtime(cfg)
    runtime.setup()
    return runtime


def _last_with(rows: list[dict], key: str) -> dict:
    return [r for r in rows if r.get(key) is not None][-1]


@pytest.mark.parametrize("kind", ["serial", "ray"])
def test_resume_continues_counters_and_return_windows(tmp_path, kind):
    if kind == "ray":
        pytest.importorskip("ray")
    first = _runtime(kind, f"runs_dir={tmp_path}", "train.total_env_steps=4096")
    run_dir = first.run()
    before = read_metrics(run_dir / "metrics.jsonl")
    saved = load_checkpoint(run_dir)
    assert before[-1]["labels_total"] > 0 and before[-1]["annotator_requests_total"] > 0
    saved_returns = saved["learner"]["state"]["intrinsic"]["returns"]
    assert saved_returns and saved["annotator"]["stats"]["labels_total"] > 0

    second = _runtime(kind, f"resume={run_dir}", "train.total_env_steps=6144")
    # The windows come back as they were saved: their means are the last ones logged.
    restored = second._learner_state()["state"]["intrinsic"]["returns"]
    assert restored == saved_returns
    last_intrinsic = _last_with(before, "intrinsic_return_mean")["intrinsic_return_mean"]
    assert float(np.mean(restored)) == pytest.approx(last_intrinsic, rel=1e-12)
    assert second.tracker.return_mean() == pytest.approx(
        _last_with(before, "episode_return_mean")["episode_return_mean"], rel=1e-12
    )
    second.run()

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[: len(before)] == before
    after = rows[len(before) :]
    assert after and after[-1]["env_steps"] >= 6144
    for key in COUNTERS:
        assert after[0][key] >= before[-1][key], (key, after[0][key], before[-1][key])
    # The new episodes join the restored windows instead of replacing them.
    resumed = load_checkpoint(run_dir)
    window = resumed["learner"]["state"]["intrinsic"]["returns"]
    assert window[: len(saved_returns)] == saved_returns
    episodes = saved["tracker"]["returns"]
    assert resumed["tracker"]["returns"][: len(episodes)] == episodes


def test_an_older_checkpoint_without_the_counters_still_resumes(tmp_path):
    """A checkpoint from before the counters were saved: they start at 0, without an error."""
    first = _runtime("serial", f"runs_dir={tmp_path}", "train.total_env_steps=2048")
    run_dir = first.run()
    old = load_checkpoint(run_dir)
    del old["annotator"]
    del old["learner"]["state"]["intrinsic"]["returns"]
    for stale in (run_dir / "checkpoints").glob("*.pt"):
        stale.unlink()
    torch.save(old, run_dir / "checkpoints" / "latest.pt")

    second = _runtime("serial", f"resume={run_dir}", "train.total_env_steps=3072")
    assert not second.learner.intrinsic.intrinsic_returns
    assert second.annotator.metrics()["labels_total"] == 0
    assert second.tracker.env_steps == old["tracker"]["env_steps"]
    second.run()
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["env_steps"] >= 3072
