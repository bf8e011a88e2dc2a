"""oni-sys against sample-factory 2.1.1 on NetHackScore, side by side in one run.

How to run:   .venv/bin/python benchmarks/vs_sample_factory.py [--steps N] [--rounds R]
              [--default-network]   (or: make bench-sf)

Both systems get the same observation (benchmarks/nethack_chars.py: the chars map as a 1x21x79
image plus the bottom-line stats), the same batch geometry (2 env runners x 16 envs, rollout 32,
batch 1024, one epoch of one minibatch, CPU learner) and models of the same size and cost:
sample-factory's convnet_impala encoder + GRU 512 has 2,792,520 parameters and 2.92M
multiply-adds a step; benchmarks/vs_sample_factory.yaml, the same layers in oni-sys's ``mlp``
model, 2,792,578 and 2.92M. benchmarks/vs_sample_factory_towers.yaml has the same parameter
count in oni-sys's own shape (3x3 CNN, policy and value towers; 3.94M multiply-adds). Runs
alternate A B C A B C.

sample-factory needs gymnasium 0.29 and numpy<2, so it gets its own virtualenv (``.venv-sf``,
made on first use: the torch version of .venv, sample-factory 2.1.1, and NLE without its
gymnasium pin, which the NetHack task here does not need).

Results: a Markdown table of steady-state env steps per second (sample-factory: its
``Total num frames`` reports after the first non-zero one; oni-sys: metrics rows after the first)
and of the whole run (steps / wall time of the process), the mean of each system and the ratio.
``--default-network`` adds oni-sys's NetHack network (configs/nethack_score.yaml, its own
observation) with its narrow map input (``model.map_embedding_dim=8``) and with its map stack
on the whole glyph embedding (``model.map_embedding_dim=0``, the network before issue 13).
Paste the table into docs/PERFORMANCE.md with the date.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
SF_VENV = ROOT / ".venv-sf"
SF_VERSION = "2.1.1"
BIN = Path(sys.executable).parent

#: sample-factory's arguments for the geometry and model above
SF_ARGS = [
    "--num_workers=2",
    "--num_envs_per_worker=16",
    "--worker_num_splits=2",
    "--rollout=32",
    "--batch_size=1024",
    "--num_batches_per_epoch=1",
    "--num_epochs=1",
    "--rnn_size=512",
    "--rnn_type=gru",
    "--encoder_conv_architecture=convnet_impala",
    "--device=cpu",
    "--learning_rate=0.0002",
    "--gamma=0.999",
    "--exploration_loss_coeff=0.001",
    "--max_grad_norm=4.0",
    "--save_every_sec=1000000",
    "--decorrelate_envs_on_one_worker=False",
]
FRAMES = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\].*Total num frames: (\d+)")
#: the samples sample-factory's learner has trained on, in the same report
SAMPLES = re.compile(r"Total num frames: (\d+)\. Throughput: .*?\. Samples: (\d+)")
PARAMS = re.compile(r"^SF_PARAMS (\d+)$", re.M)


def ensure_sf_venv() -> Path:
    """``.venv-sf/bin/python``, made and filled if missing."""
    python = SF_VENV / "bin" / "python"
    stamp = SF_VENV / f".installed-sample-factory-{SF_VERSION}"
    if stamp.exists():
        return python
    import nle
    import torch

    base = getattr(sys, "_base_executable", sys.executable)
    print(f"setting up {SF_VENV} (sample-factory {SF_VERSION}; a few minutes)", file=sys.stderr)
    subprocess.run([base, "-m", "venv", str(SF_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(
        [*pip, f"sample-factory=={SF_VERSION}", "gymnasium==0.29.1", "numpy<2"], check=True
    )
    subprocess.run([*pip, "--no-deps", f"nle=={nle.__version__}"], check=True)
    subprocess.run(
        [str(python), "-c", "import nethack_chars; nethack_chars.make().reset(seed=0)"],
        check=True,
        cwd=HERE,
    )
    stamp.touch()
    return python


def run_sample_factory(python: Path, steps: int, train_dir: Path, name: str) -> dict:
    """One sample-factory run; steady-state and whole-run steps/s from its log."""
    start = time.perf_counter()
    proc = subprocess.run(
        [
            str(python),
            str(HERE / "sf_nethack.py"),
            f"--train_dir={train_dir}",
            f"--experiment={name}",
            f"--train_for_env_steps={steps}",
            *SF_ARGS,
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"sample-factory failed (exit {proc.returncode}):\n{log[-3000:]}")
    reports = [
        (datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(n))
        for t, n in FRAMES.findall(log)
    ]
    counted = [r for r in reports if r[1] > 0]
    if len(counted) < 2:
        raise RuntimeError(f"sample-factory logged too few frame counts:\n{log[-3000:]}")
    (t0, n0), (t1, n1) = counted[0], counted[-1]
    params = PARAMS.search(log)
    frames, samples = (int(x) for x in SAMPLES.findall(log)[-1])
    return {
        "steady": (n1 - n0) / (t1 - t0),
        "whole": n1 / wall,
        "steps": n1,
        "params": int(params.group(1)) if params else None,
        # Its learner keeps up (so the frame rate is not bought by skipping the training).
        "trained": samples / max(frames, 1),
    }


def run_oni(config: str, steps: int, runs_dir: Path, name: str, extra: list[str]) -> dict:
    """One oni-sys run (``oni-sys train``); steady-state and whole-run steps/s."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [
            str(BIN / "oni-sys"),
            "train",
            config,
            f"runs_dir={runs_dir}",
            f"name={name}",
            f"train.total_env_steps={steps}",
            "train.progress=false",
            "train.tensorboard=false",
            "train.log_every_updates=5",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"oni-sys failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    from oni_sys.runtime.run_dir import read_metrics, steady_steps_per_second

    rows = read_metrics(runs_dir / name / "metrics.jsonl")
    if len(rows) < 2:
        raise RuntimeError(f"{steps} steps gave {len(rows)} metrics row(s); raise --steps")
    last = rows[-1]
    dropped = last.get("fragments_dropped", 0.0) * fragment_steps(config, extra)
    return {
        "steady": steady_steps_per_second(rows),
        "whole": last["env_steps"] / wall,
        "steps": last["env_steps"],
        "trained": 1.0 - dropped / last["env_steps"],
    }


def fragment_steps(config: str, extra: list[str]) -> int:
    """Env steps in one fragment of ``config`` (a dropped fragment is that many steps untrained)."""
    sys.path.insert(0, str(HERE))
    from oni_sys.config import load_config

    cfg = load_config(config, extra)
    return cfg.env.num_envs * cfg.algo.rollout


def oni_parameters(config: str, extra: list[str] | None = None) -> int:
    """Parameter count of the policy ``config`` (with ``extra`` overrides) builds."""
    sys.path.insert(0, str(HERE))
    from oni_sys.actors.env_runner import probe_env
    from oni_sys.config import load_config
    from oni_sys.models import build_model
    from oni_sys.models.distributions import make_action_dist

    cfg = load_config(config, extra or [])
    interface = probe_env(cfg)
    model = build_model(
        cfg.model, cfg.env.id, interface.obs_space, make_action_dist(interface.action_space)
    )
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="env steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds (A B A B for 2)")
    parser.add_argument(
        "--default-network",
        action="store_true",
        help="also run oni-sys's NetHack network (configs/nethack_score.yaml) with "
        "model.map_embedding_dim=8 and with 0",
    )
    args = parser.parse_args()
    python = ensure_sf_venv()
    matched = str(HERE / "vs_sample_factory.yaml")
    towers = str(HERE / "vs_sample_factory_towers.yaml")
    systems = {
        "sample-factory 2.1.1 APPO, convnet_impala + GRU 512": lambda d, n: run_sample_factory(
            python, args.steps, d, n
        ),
        "oni-sys, benchmarks/vs_sample_factory.yaml (its shape)": lambda d, n: run_oni(
            matched, args.steps, d, n, []
        ),
        "oni-sys, benchmarks/vs_sample_factory_towers.yaml (3x3 CNN, towers)": lambda d, n: run_oni(
            towers, args.steps, d, n, []
        ),
    }
    params = {
        list(systems)[1]: oni_parameters(matched),
        list(systems)[2]: oni_parameters(towers),
    }
    if args.default_network:
        nethack = ["runtime.device=cpu", "algo.fragments_per_batch=2", "reward.kind=none"]
        variants = {
            # The narrow map input, and the map stack on the whole 32-wide glyph embedding as
            # before issue 13: what the narrower input saves, on its own.
            f"oni-sys, configs/nethack_score.yaml, model.map_embedding_dim={dim}": [
                f"model.map_embedding_dim={dim}"
            ]
            for dim in (8, 0)
        }
        for name, extra in variants.items():
            systems[name] = lambda d, n, extra=extra: run_oni(
                "configs/nethack_score.yaml", args.steps, d, n, nethack + extra
            )
            params[name] = oni_parameters("configs/nethack_score.yaml", extra)
    results: dict[str, list[dict]] = {name: [] for name in systems}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, run) in enumerate(systems.items()):
                result = run(Path(tmp), f"r{r}s{i}")
                results[name].append(result)
                params.setdefault(name, result.get("params"))
                print(
                    f"round {r + 1}: {name}: steady {result['steady']:,.0f} steps/s, "
                    f"whole run {result['steps']:,} steps at {result['whole']:,.0f} steps/s",
                    file=sys.stderr,
                    flush=True,
                )
    base = statistics.mean(r["steady"] for r in results[list(systems)[0]])
    print(f"\n{args.steps:,} env steps a run, {args.rounds} rounds, alternating\n")
    print(
        "| system | parameters | steady steps/s (runs) | mean | whole run steps/s | steps trained "
        "| ratio to sample-factory |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        steady = statistics.mean(r["steady"] for r in runs)
        whole = statistics.mean(r["whole"] for r in runs)
        each = " / ".join(f"{r['steady']:,.0f}" for r in runs)
        count = f"{params[name]:,}" if params.get(name) else "?"
        trained = min(r["trained"] for r in runs)
        print(
            f"| {name} | {count} | {each} | {steady:,.0f} | {whole:,.0f} | {trained:.0%} "
            f"| {steady / base:.2f} |"
        )


if __name__ == "__main__":
    main()
