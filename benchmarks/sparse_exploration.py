"""Exploration before the first reward: steps to the first success and the policy's entropy.

How to run:   .venv/bin/python benchmarks/sparse_exploration.py [--task keydoor|vault|vault11|zero]
                  [--kinds none,hashing] [--variants before,after] [--seeds 0,1,2] [--steps N]
Results:      a Markdown table, one row per (task, reward kind, variant, seed): the env
              steps at the first episode with a positive extrinsic return ("never" if none in
              the budget), the policy entropy (as a fraction of its maximum, log |A|) at three
              points of the run, and the final mean return.

``--variants`` name the advantage normalisations compared (docs/ALGORITHM.md §4): ``before``
normalises every batch (the classic way, and this project's before the change), ``after`` is the
default (advantages used as computed until the run's first reward signal), ``floor1`` adds
``algo.advantage_std_floor=1`` to the default. ``vault11`` is the Vault grid at size 11 (a random walk reaches the vault less
often than at 9). ``zero`` is the Vault grid with an episode too short to reach the vault
(16 steps, the shortest solution takes 18), so its reward is always 0. Every run is serial
and deterministic for its seed, so the "before" and "after" columns differ only by the floor.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile

from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import read_metrics

TASKS = {
    "keydoor": ("configs/keydoor.yaml", [], 8),
    "vault": ("configs/vault.yaml", [], 4),
    "vault11": ("configs/vault.yaml", ["env.kwargs={size: 11}"], 4),
    "zero": ("configs/vault.yaml", ["env.kwargs={max_steps: 16}"], 4),
}
VARIANTS = {
    "before": ["algo.normalize_after_signal=false"],
    "after": [],
    "floor1": ["algo.advantage_std_floor=1"],
}


def run(task: str, kind: str, variant: str, seed: int, steps: int, runs_dir: str) -> dict:
    """One serial run; returns steps to first success, entropy fractions and final return."""
    config, extra, actions = TASKS[task]
    cfg = load_config(
        config,
        [
            f"runs_dir={runs_dir}",
            f"name={task}_{kind}_{variant}_{seed}",
            f"reward.kind={kind}",
            f"seed={seed}",
            f"train.total_env_steps={steps}",
            "train.log_every_updates=2",
            "train.progress=false",
            "train.tensorboard=false",
            *extra,
            *VARIANTS[variant],
        ],
    )
    runtime = make_runtime(cfg)
    runtime.setup()
    rows = read_metrics(runtime.run() / "metrics.jsonl")
    first = next((r["env_steps"] for r in rows if (r["episode_return_mean"] or 0.0) > 0), None)
    max_entropy = math.log(actions)

    def entropy_at(fraction: float) -> float:
        target = fraction * steps
        row = min(rows, key=lambda r: abs(r["env_steps"] - target))
        return row["entropy"] / max_entropy

    return {
        "first": first,
        "entropy": [entropy_at(f) for f in (1 / 3, 2 / 3, 1.0)],
        "return": rows[-1]["episode_return_mean"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="keydoor")
    parser.add_argument("--kinds", default="none,hashing")
    parser.add_argument("--variants", default="before,after")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"{args.task}, {args.steps} env steps per run, serial runtime")
    print("| reward | variant | seed | first success at | entropy/max at 1/3, 2/3, end | return |")
    print("|---|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as runs_dir:
        for kind in args.kinds.split(","):
            for variant in args.variants.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    out = run(args.task, kind, variant, seed, args.steps, runs_dir)
                    first = "never" if out["first"] is None else f"{out['first']:,}"
                    ent = " / ".join(f"{e:.2f}" for e in out["entropy"])
                    print(
                        f"| {kind} | {variant} | {seed} | {first} | {ent} | {out['return']:.3f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
