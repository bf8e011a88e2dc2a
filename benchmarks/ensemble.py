"""Does an ensemble of classifiers help on KeyDoor? One classifier against K members, side by side.

How to run:   .venv/bin/python benchmarks/ensemble.py [--seeds 0 1 2] [--steps 150000] [--k 3]
                  [--pessimism 1.0] [--runs-dir /tmp/oni_ensemble_bench]
              Every (seed, variant) is a fresh ``python -m oni_sys.cli train configs/keydoor.yaml``
              process (serial runtime, rules annotator); variants alternate within each seed so
              a busy machine slows them alike.
Variants:     ``classification`` (one model); ``ensemble-mean`` (K classification members,
              reward = mean P(1) thresholded); ``ensemble-pessimistic`` (reward = mean - k * std of
              the members' P(1), then thresholded: ``reward.ensemble_pessimism=k``).
Measures:     steps to goal (first ``env_steps`` whose ``episode_return_mean`` >= 0.5, the optimum
              being 0.704), the final ``episode_return_mean``, and the wall time of the process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from oni_sys.runtime.run_dir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
GOAL_RETURN = 0.5


def variants(k: int, pessimism: float) -> dict[str, list[str]]:
    ensemble = ["reward.kind=ensemble", "reward.member=classification", f"reward.ensemble_size={k}"]
    return {
        "classification": ["reward.kind=classification"],
        "ensemble-mean": [*ensemble, "reward.ensemble_pessimism=0.0"],
        "ensemble-pessimistic": [*ensemble, f"reward.ensemble_pessimism={pessimism}"],
    }


def run(name: str, overrides: list[str], seed: int, steps: int, runs_dir: Path) -> dict:
    """Train one run in a fresh process; its steps to goal, final return and wall time."""
    run_name = f"{name}-s{seed}"
    cmd = [
        sys.executable,
        "-m",
        "oni_sys.cli",
        "train",
        "configs/keydoor.yaml",
        *overrides,
        f"seed={seed}",
        f"train.total_env_steps={steps}",
        "train.progress=false",
        "train.tensorboard=false",
        f"runs_dir={runs_dir}",
        f"name={run_name}",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rows = read_metrics(runs_dir / run_name / "metrics.jsonl")
    reached = [r["env_steps"] for r in rows if (r.get("episode_return_mean") or 0.0) >= GOAL_RETURN]
    return {
        "variant": name,
        "seed": seed,
        "steps_to_goal": reached[0] if reached else None,
        "final_return": rows[-1].get("episode_return_mean") or 0.0,
        "wall_s": wall,
    }


def _k(steps: int | None) -> str:
    return "never" if steps is None else f"{steps / 1000:.0f}k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150_000)
    parser.add_argument("--k", type=int, default=3, help="ensemble members")
    parser.add_argument("--pessimism", type=float, default=1.0, help="k in mean - k * std")
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/oni_ensemble_bench"))
    args = parser.parse_args()
    cases = variants(args.k, args.pessimism)
    results = []
    for seed in args.seeds:
        for name, overrides in cases.items():
            r = run(name, overrides, seed, args.steps, args.runs_dir)
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
    print(f"KeyDoor, {args.steps} steps, seeds {' '.join(map(str, args.seeds))}; ensembles of ")
    print(f"K={args.k} classification members, pessimistic k={args.pessimism}.\n")
    print(
        "| variant | reached >= 0.5 | steps to goal (per seed) | final return (per seed) "
        "| mean final return | wall time mean (s) |"
    )
    print("|---|---|---|---|---|---|")
    for name in cases:
        rs = [r for r in results if r["variant"] == name]
        hit = sum(r["steps_to_goal"] is not None for r in rs)
        finals = ", ".join(f"{r['final_return']:.3f}" for r in rs)
        print(
            f"| {name} | {hit}/{len(rs)} | {', '.join(_k(r['steps_to_goal']) for r in rs)} "
            f"| {finals} "
            f"| {statistics.mean(r['final_return'] for r in rs):.3f} "
            f"| {statistics.mean(r['wall_s'] for r in rs):.0f} |"
        )


if __name__ == "__main__":
    main()
