"""Cost of the intrinsic-reward path on NetHackScore, side by side in one run.

How to run:   .venv/bin/python benchmarks/reward_path.py [--steps N] [--runtime serial|ray]
Results:      a Markdown table: steady-state env steps per second for extrinsic-only training
              and for each reward model, each as a fraction of extrinsic-only, and the time the
              policy learner spends computing the shaped reward per batch (T x N = 512 steps).
              The annotator is the `rules` backend here, so the table measures the reward path
              (reward learner + reward lookup in the loss), not the LLM; the LLM's own cost is
              in benchmarks/annotator.py.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile

from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import read_metrics

RULES = '[{pattern: "(?i)kill|gold|level|stair|feel", label: 1}]'
KINDS = ["none", "hashing", "classification", "ranking", "ensemble"]


def measure(kind: str, steps: int, runtime: str, runs_dir: str) -> tuple[float, float]:
    """(steady-state steps/s, median reward time per batch in ms) of one run."""
    cfg = load_config(
        "configs/oni/small/score_hashing.yaml",
        [
            f"runs_dir={runs_dir}",
            f"name={kind}",
            f"reward.kind={kind}",
            f"runtime.kind={runtime}",
            f"train.total_env_steps={steps}",
            "train.progress=false",
            "train.tensorboard=false",
            "train.log_every_updates=5",
            "annotator.backend=rules",
            f"annotator.rules={RULES}",
            "reward.ensemble_size=3",
        ],
    )
    rt = make_runtime(cfg)
    rt.setup()
    rows = read_metrics(rt.run() / "metrics.jsonl")
    first, last = rows[1], rows[-1]  # the first row includes start-up
    sps = (last["env_steps"] - first["env_steps"]) / (last["wall_time"] - first["wall_time"])
    reward_ms = statistics.median(r.get("reward_time", 0.0) for r in rows[1:]) * 1000
    return sps, reward_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40_000)
    parser.add_argument("--runtime", default="serial", choices=["serial", "ray"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(
        f"NetHackScore, {args.runtime} runtime, {args.steps} env steps per row, rules annotator\n"
    )
    print("| reward | steps/s | fraction of extrinsic-only | reward time per batch (ms) |")
    print("|---|---:|---:|---:|")
    base = None
    with tempfile.TemporaryDirectory() as runs_dir:
        for kind in KINDS:
            sps, reward_ms = measure(kind, args.steps, args.runtime, runs_dir)
            base = base or sps
            print(f"| {kind} | {sps:,.0f} | {sps / base:.3f} | {reward_ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
