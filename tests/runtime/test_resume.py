"""Checkpoints and resume: counters, curves and weights continue; Ctrl-C leaves a checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from state_equality import assert_equal_state  # tests/state_equality.py

from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import load_checkpoint, read_metrics

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FAST = ["train.progress=false", "train.log_every_updates=2", "train.checkpoint_every_updates=5"]


def _runtime(*overrides: str):
    cfg = load_config("configs/cartpole.yaml", [*FAST, *overrides])
    runtime = make_runtime(cfg)
    runtime.setup()
    return runtime


def test_resume_restores_weights_and_continues_curves(tmp_path):
    first = _runtime(f"runs_dir={tmp_path}", "train.total_env_steps=10240")
    run_dir = first.run()
    before = read_metrics(run_dir / "metrics.jsonl")
    ckpt = load_checkpoint(run_dir)
    assert ckpt["tracker"]["env_steps"] == before[-1]["env_steps"] >= 10240
    assert len(list((run_dir / "checkpoints").glob("ckpt_*.pt"))) <= 3  # keep N

    second = _runtime(f"resume={run_dir}", "train.total_env_steps=20480")
    weights = second.learner.policy.net.state_dict()
    for key, value in ckpt["learner"]["state"]["model"].items():
        assert torch.equal(weights[key].cpu(), value), key
    opt = second.learner.optimizer.state_dict()["state"]
    for idx, saved in ckpt["learner"]["state"]["optimizer"]["state"].items():
        assert torch.equal(opt[idx]["exp_avg"].cpu(), saved["exp_avg"])
    assert second.tracker.env_steps == ckpt["tracker"]["env_steps"]
    assert second.learner.version == ckpt["learner"]["state"]["version"]
    assert second.run() == run_dir

    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["env_steps"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert steps[-1] >= 20480 and len(rows) > len(before)
    assert rows[len(before)]["updates"] > before[-1]["updates"]
    assert rows[-1]["wall_time"] > before[-1]["wall_time"]
    assert rows[-1]["episodes"] > before[-1]["episodes"]


def test_ctrl_c_checkpoints_then_resume(tmp_path):
    cmd = [
        str(BIN / "oni-sys"),
        "train",
        "configs/cartpole.yaml",
        f"runs_dir={tmp_path}",
        "name=interrupted",
        "train.total_env_steps=100000000",
        *FAST,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "interrupted" / "metrics.jsonl"
    deadline = time.time() + 120
    while len(read_metrics(metrics)) < 3 and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in out and "resume=" in out
    ckpt = load_checkpoint(tmp_path / "interrupted")
    stopped_at = ckpt["tracker"]["env_steps"]
    assert stopped_at == read_metrics(metrics)[-1]["env_steps"]

    resumed = subprocess.run(
        [
            *cmd[:3],
            f"resume={tmp_path / 'interrupted'}",
            f"train.total_env_steps={stopped_at + 4096}",
            *FAST,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    rows = read_metrics(metrics)
    assert rows[-1]["env_steps"] >= stopped_at + 4096
    assert [r["env_steps"] for r in rows] == sorted({r["env_steps"] for r in rows})


def restored_version(runtime) -> int:
    return runtime.reward_learner.state_dict()["model"]["version"]


def test_resume_continues_the_reward_model(tmp_path):
    """Ranking (the case ONI lost on restart): model, optimiser, preference dataset and
    normalisation statistics come back exactly, and training continues from them."""
    common = [
        "reward.kind=ranking",
        "annotator.prompt=ranking",
        "train.tensorboard=false",
        "train.log_every_updates=5",
        "train.checkpoint_every_updates=20",
    ]
    cfg = load_config("configs/keydoor.yaml", [f"runs_dir={tmp_path}", *FAST, *common])
    cfg.train.total_env_steps = 20480
    first = make_runtime(cfg)
    first.setup()
    run_dir = first.run()
    before = read_metrics(run_dir / "metrics.jsonl")
    saved = load_checkpoint(run_dir)["learner"]["reward"]
    assert before[-1]["reward_preferences_seen"] > 0 and before[-1]["reward_model_updates"] > 0

    cfg = load_config("configs/keydoor.yaml", [f"resume={run_dir}", *FAST, *common])
    cfg.train.total_env_steps = 30720
    second = make_runtime(cfg)
    second.setup()
    restored = second.reward_learner.state_dict()
    # Publishing the restored model makes one new snapshot version; everything else is as saved.
    assert restored["model"].pop("version") == saved["model"].pop("version") + 1
    assert_equal_state(saved, restored, "reward")
    # The policy learner starts from the restored snapshot, not from the all-zero version 0.
    assert second.learner.intrinsic.snapshot_version == restored_version(second) > 1
    second.run()
    after = read_metrics(run_dir / "metrics.jsonl")[len(before) :]
    for key in ("reward_model_updates", "reward_preferences_seen", "reward_labels_seen"):
        assert after[0][key] >= before[-1][key], key  # counters continue, never restart
    assert after[-1]["reward_model_updates"] > before[-1]["reward_model_updates"]
    assert after[-1]["reward_snapshot_version"] > before[-1]["reward_snapshot_version"]
