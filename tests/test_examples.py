"""The examples in examples/ run as their docs say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_custom_env_example_runs_as_documented(tmp_path):
    env = {**os.environ, "PYTHONPATH": "examples/custom_env"}
    result = subprocess.run(
        [str(BIN / "oni-sys"), "train", "examples/custom_env/corridor.yaml"]
        + [f"runs_dir={tmp_path}", "train.progress=false", "train.total_env_steps=30000"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "corridor" / "metrics.jsonl").open()]
    assert rows[-1]["episode_return_mean"] > 0.9
    assert rows[-1]["intrinsic_return_mean"] > 0
