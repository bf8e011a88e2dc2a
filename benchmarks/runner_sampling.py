"""Env-runner sampling speed of two source trees, side by side in one run (no learning).

How to run:   .venv/bin/python benchmarks/runner_sampling.py OLD_TREE [NEW_TREE] [--rounds 3]
              (e.g. OLD_TREE from `git worktree add /tmp/old <commit>`; NEW_TREE defaults to
              this checkout). Each measurement is a fresh process with PYTHONPATH on one tree;
              the trees alternate, and the table gives the median of the rounds and the ratio.
Measures:     steps per second of ``EnvRunner.sample()`` on CartPole (tiny model: runner
              overhead dominates) and NetHackScore (env and NetHackNet dominate).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CASES = {
    "CartPole-v1": ("configs/cartpole.yaml", [], 40),
    "NetHackScore": ("configs/nethack_score.yaml", ["env.num_envs=8"], 6),
}

CHILD = """
import json, sys, time
from oni_sys.actors.env_runner import EnvRunner
from oni_sys.config import load_config
config, overrides, fragments = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
runner = EnvRunner(load_config(config, overrides))
runner.sample()  # warm-up
start, steps = time.perf_counter(), 0
for _ in range(fragments):
    steps += runner.sample().env_steps
print(json.dumps(steps / (time.perf_counter() - start)))
"""


def measure(tree: Path, case: str) -> float:
    config, overrides, fragments = CASES[case]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, config, json.dumps(overrides), str(fragments)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=Path(__file__).resolve().parents[1])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| env | old steps/s | new steps/s | new / old |")
    print("|---|---:|---:|---:|")
    for case in CASES:
        old, new = [], []
        for _ in range(args.rounds):
            old.append(measure(args.old, case))
            new.append(measure(args.new, case))
        o, n = statistics.median(old), statistics.median(new)
        print(f"| {case} | {o:,.0f} | {n:,.0f} | {n / o:.2f} |", flush=True)


if __name__ == "__main__":
    main()
