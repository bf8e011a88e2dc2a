"""Cost of the intrinsic-reward path on NetHackScore, side by side in one run.

How to run:   .venv/bin/python benchmarks/reward_path.py [--steps N] [--runtime serial|ray]
                  [--annotator rules|embedded] [--kinds none hashing ...] [--rounds R]
                  [--niceness N ...]
Results:      a Markdown table: steady-state env steps per second for extrinsic-only training
              and for each reward model, each as a fraction of extrinsic-only, and the time the
              policy learner spends computing the shaped reward per batch (T x N = 512 steps).
              With the `rules` annotator (the default) the table measures the reward path
              (reward learner + reward lookup in the loss), not the LLM; the LLM's own cost is
              in benchmarks/annotator.py. ``--annotator embedded`` keeps the config's own
              annotator (llama.cpp with the embedded Gemma 3 270M, as `make train`), so the
              table measures the whole reward loop, with the labels each run got and the
              questions still waiting at its end. ``--niceness 0 4`` runs each reward model
              once per `annotator.niceness` (the llama.cpp child's CPU priority below its
              parent's). Rounds alternate the variants (A B A B).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile

from oni_sys.config import load_config
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import read_metrics, steady_steps_per_second

RULES = '[{pattern: "(?i)kill|gold|level|stair|feel", label: 1}]'
KINDS = ["none", "hashing", "classification", "ranking", "ensemble"]


def measure(
    kind: str, steps: int, runtime: str, runs_dir: str, annotator: str, name: str, extra: list[str]
) -> tuple[float, float, float, float]:
    """(steady-state steps/s, median reward time per batch in ms, labels, questions waiting at
    the end) of one run."""
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
            *extra,
        ],
    )
    rt = make_runtime(cfg)
    rt.setup()
    rows = read_metrics(rt.run() / "metrics.jsonl")
    sps = steady_steps_per_second(rows, first=1)  # the first row includes start-up
    reward_ms = statistics.median(r.get("reward_time", 0.0) for r in rows[1:]) * 1000
    labels = max(r.get("labels_total", 0.0) for r in rows)
    return sps, reward_ms, labels, rows[-1].get("annotator_queue", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40_000)
    parser.add_argument("--runtime", default="serial", choices=["serial", "ray"])
    parser.add_argument("--annotator", default="rules", choices=["rules", "embedded"])
    parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    parser.add_argument("--rounds", type=int, default=1, help="rounds, alternating the kinds")
    parser.add_argument(
        "--niceness",
        type=int,
        nargs="+",
        default=None,
        help="annotator.niceness values; each reward model runs once per value",
    )
    args = parser.parse_args()
    if args.kinds[0] != "none":
        parser.error("--kinds must start with none (the rows are fractions of it)")
    logging.basicConfig(level=logging.WARNING)
    print(
        f"NetHackScore, {args.runtime} runtime, {args.steps} env steps per run, "
        f"{args.annotator} annotator, {args.rounds} round(s)\n"
    )
    variants: list[tuple[str, str, list[str]]] = []  # (label, reward kind, overrides)
    for kind in args.kinds:
        if kind == "none" or args.niceness is None:
            variants.append((kind, kind, []))
        else:
            variants += [
                (f"{kind}, nice {n}", kind, [f"annotator.niceness={n}"]) for n in args.niceness
            ]
    results: dict[str, list[tuple[float, float, float, float]]] = {v[0]: [] for v in variants}
    with tempfile.TemporaryDirectory() as runs_dir:
        for r in range(args.rounds):
            for i, (label, kind, extra) in enumerate(variants):
                result = measure(
                    kind, args.steps, args.runtime, runs_dir, args.annotator, f"v{i}_{r}", extra
                )
                results[label].append(result)
                print(
                    f"round {r + 1}: {label}: {result[0]:,.0f} steps/s, {result[2]:,.0f} labels, "
                    f"{result[3]:,.0f} questions waiting",
                    flush=True,
                )
    print(
        "\n| reward | steps/s (runs) | mean | fraction of extrinsic-only "
        "| reward time per batch (ms) | labels (runs) | questions waiting at the end |"
    )
    print("|---|---|---:|---:|---:|---|---|")
    base = statistics.mean(run[0] for run in results["none"])
    for label, runs in results.items():
        sps = statistics.mean(run[0] for run in runs)
        each = " / ".join(f"{run[0]:,.0f}" for run in runs)
        reward_ms = statistics.median(run[1] for run in runs)
        labels = " / ".join(f"{run[2]:,.0f}" for run in runs)
        waiting = " / ".join(f"{run[3]:,.0f}" for run in runs)
        print(
            f"| {label} | {each} | {sps:,.0f} | {sps / base:.3f} | {reward_ms:.2f} "
            f"| {labels} | {waiting} |"
        )


if __name__ == "__main__":
    main()
