"""Throughput, side by side in one run: env-only stepping (the ceiling), serial and Ray runtimes.

How to run:   .venv/bin/python benchmarks/throughput.py [--steps-cartpole N] [--steps-nethack N]
Results:      a Markdown table of steady-state env steps per second (first metrics row excluded,
              so start-up is not counted) and each as a fraction of the env-only ceiling.
              Paste it into docs/PERFORMANCE.md with the date and machine.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

from oni_sys.config import load_config
from oni_sys.envs.spec import make_env
from oni_sys.runtime import make_runtime
from oni_sys.runtime.run_dir import read_metrics, steady_steps_per_second


def env_only_sps(env_id: str, num_envs: int, steps: int) -> float:
    """Random actions in ``num_envs`` envs stepped in turn, no policy: the ceiling."""
    envs = [make_env(env_id) for _ in range(num_envs)]
    for i, env in enumerate(envs):
        env.reset(seed=i)
        env.action_space.seed(i)
    start, done = time.perf_counter(), 0
    while done < steps:
        for env in envs:
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            if term or trunc:
                env.reset()
        done += num_envs
    return done / (time.perf_counter() - start)


def runtime_sps(config: str, kind: str, steps: int, runs_dir: str) -> float:
    """Steady-state steps per second of a training run (rows after the first)."""
    cfg = load_config(
        config,
        [
            f"runs_dir={runs_dir}",
            f"name={kind}",
            f"runtime.kind={kind}",
            f"train.total_env_steps={steps}",
            "train.progress=false",
            "train.log_every_updates=5",
            "train.tensorboard=false",
        ],
    )
    runtime = make_runtime(cfg)
    runtime.setup()
    run_dir = runtime.run()
    return steady_steps_per_second(read_metrics(run_dir / "metrics.jsonl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-cartpole", type=int, default=200_000)
    parser.add_argument("--steps-nethack", type=int, default=60_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cases = [
        ("CartPole-v1", "configs/cartpole.yaml", "gym:CartPole-v1", args.steps_cartpole),
        ("NetHackScore", "configs/nethack_score.yaml", "nle:Score", args.steps_nethack),
    ]
    print("| env | mode | steps/s | fraction of env-only |")
    print("|---|---|---:|---:|")
    for name, config, env_id, steps in cases:
        num_envs = load_config(config).env.num_envs
        ceiling = env_only_sps(env_id, num_envs, min(steps, 100_000))
        print(
            f"| {name} | env-only, {num_envs} envs, random actions | {ceiling:,.0f} | 1.00 |",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as runs_dir:
            for kind in ("serial", "ray"):
                sps = runtime_sps(config, kind, steps, runs_dir)
                label = "serial" if kind == "serial" else "ray, 2 env runners + learner"
                print(f"| {name} | {label} | {sps:,.0f} | {sps / ceiling:.3f} |", flush=True)


if __name__ == "__main__":
    main()
