"""Learning curves of the NetHack network with and without its narrow map input, on NetHackScore.

How to run:   .venv/bin/python benchmarks/nethack_network_curves.py [--steps N] [--seeds 0 1 2]
                  [--dims 8 0] [--runs-dir DIR]
              (one `oni-sys train configs/nethack_score.yaml` run per seed and
              model.map_embedding_dim, one after another; 1M steps take 10-20 minutes a run on
              2 cores. With --runs-dir the runs are kept there, named map<dim>_seed<seed>, and a
              run already finished there is read instead of trained again.)
Results:      a Markdown table per variant: the mean episode return over the last tenth of the
              steps and over the whole run, per seed, their mean, and the steady steps/s; then
              the difference of the two variants' means. Paste it into docs/PERFORMANCE.md with
              the date.

The narrow map input (``model.map_embedding_dim=8``) replaces the 32-wide glyph embedding at
the map stack's input by a learned projection of it, which makes the network's learner about
twice as fast here (docs/PERFORMANCE.md, "A faster NetHack network"); this checks that it
learns as well.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from oni_sys.runtime.run_dir import read_metrics, steady_steps_per_second

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_or_read(runs_dir: Path, dim: int, seed: int, steps: int) -> list[dict]:
    """The metrics rows of the run for (dim, seed): trained unless finished in ``runs_dir``."""
    name = f"map{dim}_seed{seed}"
    metrics = runs_dir / name / "metrics.jsonl"
    rows = read_metrics(metrics)
    if not rows or rows[-1]["env_steps"] < steps:
        if rows:
            sys.exit(f"{runs_dir / name} holds an unfinished run; remove it or pick another dir")
        print(f"training {name} ({steps:,} steps)", file=sys.stderr, flush=True)
        subprocess.run(
            [
                str(BIN / "oni-sys"),
                "train",
                "configs/nethack_score.yaml",
                f"seed={seed}",
                f"model.map_embedding_dim={dim}",
                f"train.total_env_steps={steps}",
                f"runs_dir={runs_dir}",
                f"name={name}",
                "train.progress=false",
                "train.tensorboard=false",
            ],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        rows = read_metrics(metrics)
    return [r for r in rows if r["env_steps"] <= steps]


def summary(rows: list[dict], steps: int) -> dict[str, float]:
    """Mean return over the last tenth of the steps and over the run; steady steps/s."""
    returns = [(r["env_steps"], r["episode_return_mean"]) for r in rows]
    returns = [(s, x) for s, x in returns if x == x]  # rows before the first episode: NaN
    tail = [x for s, x in returns if s >= 0.9 * steps]
    return {
        "tail": statistics.mean(tail),
        "whole": statistics.mean(x for _, x in returns),
        "sps": steady_steps_per_second(rows, first=1),  # the first row includes start-up
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 0])
    parser.add_argument("--runs-dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = (args.runs_dir or Path(tmp)).resolve()
        results = {
            dim: {
                seed: summary(run_or_read(runs_dir, dim, seed, args.steps), args.steps)
                for seed in args.seeds
            }
            for dim in args.dims
        }
    print(f"\nNetHackScore, configs/nethack_score.yaml, {args.steps:,} steps, seeds {args.seeds}\n")
    print(
        "| model.map_embedding_dim | return, last 10% of steps (per seed) | mean "
        "| return, whole run (per seed) | mean | steady steps/s (mean) |"
    )
    print("|---:|---|---:|---|---:|---:|")
    means = {}
    for dim, per_seed in results.items():
        tails = [v["tail"] for v in per_seed.values()]
        wholes = [v["whole"] for v in per_seed.values()]
        means[dim] = statistics.mean(tails)
        print(
            f"| {dim} | {' / '.join(f'{x:.1f}' for x in tails)} | {means[dim]:.1f} "
            f"| {' / '.join(f'{x:.1f}' for x in wholes)} | {statistics.mean(wholes):.1f} "
            f"| {statistics.mean(v['sps'] for v in per_seed.values()):,.0f} |"
        )
    if len(means) == 2:
        (a, ma), (b, mb) = means.items()
        print(f"\nlast-10% return, map_embedding_dim={a} minus {b}: {ma - mb:+.1f}")


if __name__ == "__main__":
    main()
