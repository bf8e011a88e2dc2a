"""Fixtures for the runtime tests: one way to train a configured run and read what it wrote."""

from __future__ import annotations

import pytest

from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import read_metrics


@pytest.fixture
def train(tmp_path):
    """``train(config, *overrides, reporter=None) -> (runtime, run_dir, metrics rows)``.

    Runs go under the test's temporary directory, without a progress bar.
    """

    def run(config, *overrides, reporter=None):
        cfg = load_config(config, [f"runs_dir={tmp_path}", "train.progress=false", *overrides])
        runtime = make_runtime(cfg, reporter)
        runtime.setup()
        run_dir = runtime.run()
        return runtime, run_dir, read_metrics(run_dir / "metrics.jsonl")

    return run
