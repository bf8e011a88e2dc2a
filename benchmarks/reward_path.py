"""Cost of the intrinsic-reward path on NetHackScore, side by side in one run.

How to run:   .venv/bin/python benchmarks/reward_path.py [--steps N] [--runtime serial|ray]
                  [--annotator rules|embedded] [--kinds none hashing ...] [--rounds R]
Results:      a Markdown table: steady-state env steps per second for extrinsic-only training
              and for each reward model, each as a fraction of extrinsic-only, and the time the
              policy learner spends computing the shaped reward per batch (T x N = 512 steps).
              With the `rules` annotator (the default) the table measures the reward path
              (reward learner + reward lookup in the loss), not the LLM; the LLM's own cost is
              in benchmarks/annotator.py. ``--annotator embedded`` keeps the config's own
              annotator (llama.cpp with the embedded Gemma 3 270M, as `make train`), so the
              table measures the whole reward loop. Rounds alternate the kinds (A B A B).
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


def measure(
    kind: str, steps: int, runtime: str, runs_dir: str, annotator: str, name: str
) -> tuple[float, float]:
    """(steady-state steps/s, median reward time per batch in ms) of one run."""
    rules = ["annotator.backend=rules", f"annotator.rules={RULES}"] if annotator == "rules" else []
    cfg = load_config(
        "configs/oni/small/score_hashing.yaml",
        [
            f"runs_dir={runs_dir}",
            f"name={name}",
            f"reward.kind={kind}",
            f"runtime.kind={runtime}",
            f"train.total_env_steps={steps}",
            "train.progress=false",
            "train.tensorboard=false",
            "train.log_every_updates=5",
            *rules,
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
    parser.add_argument("--annotator", default="rules", choices=["rules", "embedded"])
    parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    parser.add_argument("--rounds", type=int, default=1, help="rounds, alternating the kinds")
    args = parser.parse_args()
    if args.kinds[0] != "none":
        parser.error("--kinds must start with none (the rows are fractions of it)")
    logging.basicConfig(level=logging.WARNING)
    print(
        f"NetHackScore, {args.runtime} runtime, {args.steps} env steps per run, "
        f"{args.annotator} annotator, {args.rounds} round(s)\n"
    )
    results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in args.kinds}
    with tempfile.TemporaryDirectory() as runs_dir:
        for r in range(args.rounds):
            for kind in args.kinds:
                result = measure(
                    kind, args.steps, args.runtime, runs_dir, args.annotator, f"{kind}_{r}"
                )
                results[kind].append(result)
                print(f"round {r + 1}: {kind}: {result[0]:,.0f} steps/s", flush=True)
    print(
        "\n| reward | steps/s (runs) | mean | fraction of extrinsic-only | reward time per batch (ms) |"
    )
    print("|---|---|---:|---:|---:|")
    base = statistics.mean(sps for sps, _ in results["none"])
    for kind, runs in results.items():
        sps = statistics.mean(s for s, _ in runs)
        each = " / ".join(f"{s:,.0f}" for s, _ in runs)
        reward_ms = statistics.median(ms for _, ms in runs)
        print(f"| {kind} | {each} | {sps:,.0f} | {sps / base:.3f} | {reward_ms:.2f} |")


if __name__ == "__main__":
    main()
