"""A damaged ``latest.pt`` falls back to the newest intact checkpoint, with one warning; with
none intact, resume and eval stop with one line naming the files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from oni_sys.config import ConfigError
from oni_sys.runtime.run_dir import load_checkpoint, read_metrics

BIN = Path(sys.executable).parent
RUN = ["train.progress=false", "train.tensorboard=false", "train.log_every_updates=2"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "oni-sys"), *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A short CartPole run with three checkpoints."""
    runs = tmp_path_factory.mktemp("runs")
    result = _cli(
        "train",
        "configs/cartpole.yaml",
        f"runs_dir={runs}",
        "train.total_env_steps=10240",
        "train.checkpoint_every_updates=4",
        *RUN,
    )
    assert result.returncode == 0, result.stderr
    (path,) = runs.iterdir()
    return path


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    # Written in place: latest.pt is a hard link to the newest ckpt_*.pt, which breaks too.
    with open(path, "r+b") as fh:
        if how == "truncated":
            fh.truncate(len(data) // 2)
        elif how == "empty":
            fh.truncate(0)
        else:
            fh.write(os.urandom(len(data)))


@pytest.mark.parametrize("how", ["truncated", "empty", "random"])
def test_a_damaged_latest_falls_back_to_the_newest_intact_checkpoint(
    run_dir, tmp_path, how, caplog
):
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)  # hard links kept
    ckpts = sorted((copy / "checkpoints").glob("ckpt_*.pt"))
    assert len(ckpts) == 3
    _damage(copy / "checkpoints" / "latest.pt", how)
    state = load_checkpoint(copy)
    assert state["tracker"]["env_steps"] == int(ckpts[1].stem.split("_")[1])
    warning = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warning) == 1 and "latest.pt" in warning[0] and ckpts[1].name in warning[0]


def test_resume_and_eval_use_the_intact_checkpoint_or_stop_with_one_line(run_dir, tmp_path):
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)
    ckpts = sorted((copy / "checkpoints").glob("ckpt_*.pt"))
    _damage(copy / "checkpoints" / "latest.pt", "truncated")
    fallback_steps = int(ckpts[1].stem.split("_")[1])

    result = _cli("eval", str(copy), "episodes=2")
    assert result.returncode == 0, result.stderr
    assert f"checkpoint_env_steps: {fallback_steps}" in result.stdout

    result = _cli(
        "train", "configs/cartpole.yaml", f"resume={copy}", *RUN, "train.total_env_steps=14336"
    )
    assert result.returncode == 0, result.stderr
    assert "using " + ckpts[1].name in result.stderr
    rows = read_metrics(copy / "metrics.jsonl")
    # The curve continues from the checkpoint used, without the rows of the lost one.
    steps = [r["env_steps"] for r in rows]
    assert steps == sorted(steps) and steps[-1] >= 14336

    for path in (copy / "checkpoints").glob("*.pt"):
        _damage(path, "empty")
    for args in (["eval", str(copy)], ["train", "configs/cartpole.yaml", f"resume={copy}", *RUN]):
        result = _cli(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no readable checkpoint" in lines[0], result.stderr
        assert "latest.pt" in lines[0] and "Traceback" not in result.stderr
    with pytest.raises(ConfigError, match="no readable checkpoint"):
        load_checkpoint(copy)
