"""sample-factory's side of benchmarks/vs_sample_factory.py: APPO on benchmarks/nethack_chars.py.

Runs in sample-factory's own virtualenv (made by vs_sample_factory.py), not in .venv:

    <sf venv>/bin/python benchmarks/sf_nethack.py --train_dir=DIR --experiment=NAME \
        --train_for_env_steps=N [any other sample-factory argument]

Prints ``SF_PARAMS <n>`` (the actor-critic's parameter count) before training; sample-factory
itself then logs ``Fps is ... Total num frames: <n>`` every few seconds, which the driver reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nethack_chars  # noqa: E402 (after the path above)
from sample_factory.algo.utils.context import global_model_factory  # noqa: E402
from sample_factory.cfg.arguments import parse_full_cfg, parse_sf_args  # noqa: E402
from sample_factory.envs.env_utils import register_env  # noqa: E402
from sample_factory.train import run_rl  # noqa: E402

ENV_NAME = "nethack_chars_score"


def make_env(full_env_name, cfg=None, env_config=None, render_mode=None):
    return nethack_chars.make()


def parameter_count(cfg) -> int:
    env = nethack_chars.make()
    model = global_model_factory().make_actor_critic_func(
        cfg, env.observation_space, env.action_space
    )
    env.close()
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    register_env(ENV_NAME, make_env)
    argv = [f"--env={ENV_NAME}", *sys.argv[1:]]
    parser, _ = parse_sf_args(argv=argv)
    cfg = parse_full_cfg(parser, argv)
    print(f"SF_PARAMS {parameter_count(cfg)}", flush=True)
    return run_rl(cfg)


if __name__ == "__main__":
    sys.exit(main())
