"""Command line: ``oni-sys train CONFIG [key=value ...]`` and ``oni-sys eval RUN_DIR [key=value ...]``.

The CLI owns the console: logging format, the progress bar, and exit codes (2 for bad input).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

from oni_sys.config import ConfigError

logger = logging.getLogger("oni_sys")

USAGE = """oni-sys train CONFIG [key=value ...]     train (e.g. oni-sys train configs/cartpole.yaml algo.lr=3e-4)
oni-sys eval RUN_DIR [key=value ...]     evaluate the latest checkpoint (e.g. episodes=10)"""


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


class ProgressBar:
    """A live progress line: steps/total, steps per second, episodes, mean return, policy lag."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            unit="step",
            unit_scale=True,
            disable=not enabled,
            mininterval=0.5 if interactive else 30.0,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def __call__(self, row: dict[str, Any]) -> None:
        self.bar.n = min(int(row["env_steps"]), self.bar.total)
        self.bar.set_postfix_str(
            f"sps={_fmt(row['sps'], '.0f')} episodes={row['episodes']} "
            f"return={_fmt(row['episode_return_mean'])} lag={_fmt(row.get('policy_lag_mean'))}",
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        """Leave the final line on the console."""
        self.bar.close()


def cmd_train(args: argparse.Namespace) -> int:
    """Train from a config file plus overrides."""
    from oni_sys.config import load_config
    from oni_sys.runtime import make_runtime

    cfg = load_config(args.config, args.overrides)
    bar = ProgressBar(cfg.train.total_env_steps, cfg.train.progress)
    runtime = make_runtime(cfg, bar)
    try:
        runtime.setup()
        bar.bar.n = runtime.tracker.env_steps
        logger.info("run directory: %s", runtime.run_path)
        run_dir = runtime.run()
    finally:
        bar.close()
    t = runtime.tracker
    print(
        f"run directory: {run_dir}\n"
        f"env steps: {t.env_steps}  episodes: {t.episodes}  updates: {t.updates}  "
        f"episode_return_mean: {_fmt(t.return_mean(), '.2f')}  wall time: {t.wall_time():.0f}s"
        + (
            "  (interrupted; resume with resume=" + str(run_dir) + ")"
            if runtime.interrupted
            else ""
        )
    )
    return 130 if runtime.interrupted else 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a run's latest checkpoint."""
    from oni_sys.evaluate import evaluate

    stats = evaluate(Path(args.run_dir), args.overrides)
    for key, value in stats.items():
        print(f"{key}: {_fmt(value, '.3f') if isinstance(value, float) else value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``oni-sys`` console script."""
    parser = argparse.ArgumentParser(prog="oni-sys", usage=USAGE)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a policy")
    p_train.add_argument("config", help="YAML experiment file, e.g. configs/cartpole.yaml")
    p_train.add_argument("overrides", nargs="*", help="key=value overrides")
    p_train.set_defaults(func=cmd_train)
    p_eval = sub.add_parser("eval", help="evaluate a run's latest checkpoint")
    p_eval.add_argument("run_dir", help="a run directory, e.g. runs/cartpole")
    p_eval.add_argument("overrides", nargs="*", help="episodes=N, deterministic=true, seed=N")
    p_eval.set_defaults(func=cmd_eval)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except ConfigError as exc:
        for err in exc.errors:
            print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
