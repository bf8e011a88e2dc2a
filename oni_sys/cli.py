"""Command line: ``oni-sys train CONFIG [key=value ...]`` and ``oni-sys eval RUN_DIR [key=value ...]``.

The CLI owns the console: logging format, the progress bar, and exit codes (2 for bad input, and
for a Ray cluster that cannot hold the run; 3 for an annotator that cannot answer).
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

#: exit code when the annotator a run needs cannot answer (at start, or for too long)
EXIT_ANNOTATOR = 3

USAGE = """oni-sys train CONFIG [key=value ...]     train (e.g. oni-sys train configs/cartpole.yaml algo.lr=3e-4)
oni-sys eval RUN_DIR [key=value ...]     evaluate the latest checkpoint (e.g. episodes=10)
oni-sys annotate FILE [key=value ...]    label captions (.txt: one a line, .jsonl: {"caption": ...})
oni-sys labels STORE [--reference FILE]  summarise a label store, agreement with a reference
oni-sys rewards RUN [--top N]            captions by intrinsic reward earned (reward hacking?)
oni-sys doctor [key=value ...]           check versions, llama.cpp build, annotator, Ray, NLE, GPU"""


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _share(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


class ProgressBar:
    """A live progress line: steps/total, steps per second, episodes, mean return, policy lag."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.bar: Any = None  # shown by start(), once the run has started

    def start(self, done: int) -> None:
        """Show the line, at ``done`` steps (a failed start shows none: only its error)."""
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=self.total,
            initial=done,
            unit="step",
            unit_scale=True,
            disable=not self.enabled,
            mininterval=0.5 if interactive else 30.0,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def __call__(self, row: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.n = min(int(row["env_steps"]), self.bar.total)
        self.bar.set_postfix_str(
            f"sps={_fmt(row['sps'], '.0f')} episodes={row['episodes']} "
            f"return={_fmt(row['episode_return_mean'])} lag={_fmt(row.get('policy_lag_mean'))}"
            + (
                f" labels={row['labels_total']} queue={row['annotator_queue']}"
                if "labels_total" in row
                else ""
            )
            + (
                f" annotator down {_fmt(row.get('annotator_outage_s'), '.0f')} s"
                if row.get("annotator_up") == 0
                else ""
            )
            + (
                f" REWARD HACKING? top caption {_share(row.get('intrinsic_top_caption_share'))}"
                if row.get("reward_hacking_suspected") == 1
                else ""
            )
            + (
                f" r_int={_fmt(row['intrinsic_reward_mean'], '.4f')}"
                f" int_return={_fmt(row.get('intrinsic_return_mean'), '.2f')}"
                if "intrinsic_reward_mean" in row
                else ""
            ),
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        """Leave the final line on the console."""
        if self.bar is not None:
            self.bar.close()


def cmd_train(args: argparse.Namespace) -> int:
    """Train from a config file plus overrides."""
    from oni_sys.annotators.preflight import AnnotatorUnavailable
    from oni_sys.config import load_config
    from oni_sys.runtime import make_runtime

    cfg = load_config(args.config, args.overrides)
    bar = ProgressBar(cfg.train.total_env_steps, cfg.train.progress)
    runtime = make_runtime(cfg, bar)
    try:
        runtime.setup()
        bar.start(runtime.tracker.env_steps)
        logger.info("run directory: %s", runtime.run_path)
        try:
            run_dir = runtime.run()
        except AnnotatorUnavailable as exc:
            raise AnnotatorUnavailable(
                f"{exc}. The run stopped with a checkpoint; continue it with "
                f"resume={runtime.run_path}"
            ) from None
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


def _annotator_overrides(overrides: list[str]) -> list[str]:
    """Accept ``backend=rules`` as short for ``annotator.backend=rules``."""
    import dataclasses

    from oni_sys.config import AnnotatorConfig

    fields = {f.name for f in dataclasses.fields(AnnotatorConfig)}
    return [
        f"annotator.{item}" if item.split("=", 1)[0].split(".")[0] in fields else item
        for item in overrides
    ]


def read_captions(path: Path) -> tuple[list[str], list[tuple[str, int]] | None]:
    """Captions of a ``.txt`` (one a line) or ``.jsonl`` file, and its labels when it has them."""
    import json

    from oni_sys.annotators.report import load_reference

    if not path.is_file():
        raise ConfigError([f"{path}: caption file not found"])
    if path.suffix == ".jsonl":
        try:
            rows = load_reference(path)
        except ValueError as exc:
            # Unlabelled JSONL is fine: only the caption is required.
            captions = []
            for lineno, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    captions.append(str(json.loads(line)["caption"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(
                        [f'{path}, line {lineno}: expected {{"caption": <text>}}']
                    ) from exc
            return captions, None
        return [c for c, _ in rows], rows
    if path.suffix != ".txt":
        raise ConfigError([f"{path}: caption files are .txt (one caption a line) or .jsonl"])
    return [line for line in path.read_text().splitlines() if line.strip()], None


def cmd_annotate(args: argparse.Namespace) -> int:
    """Label a file of captions into a store."""
    from collections import Counter

    from tqdm import tqdm

    from oni_sys.annotators.preflight import AnnotatorUnavailable, annotator_file_problems
    from oni_sys.annotators.report import labels_report
    from oni_sys.annotators.service import AnnotationService
    from oni_sys.config import load_config
    from oni_sys.envs.captions import caption_id

    cfg = load_config(None, _annotator_overrides(args.overrides))
    if problems := annotator_file_problems(cfg.annotator):
        raise ConfigError(problems)
    captions, reference = read_captions(Path(args.file))
    store = Path(cfg.annotator.store or Path(cfg.runs_dir) / "labels.sqlite")
    service = AnnotationService(cfg.annotator, store)
    try:
        service.preflight()
        ids = [caption_id(c) for c in captions]
        seen = Counter(ids)
        service.submit(dict(zip(ids, captions)), dict(seen))
        total = max(1, service.metrics()["annotator_queue"])
        with tqdm(
            total=total, unit="question", file=sys.stderr, disable=not sys.stderr.isatty()
        ) as bar:
            while not service.wait_idle(timeout=0.5):
                if service.failure():
                    raise AnnotatorUnavailable(service.failure())
                m = service.metrics()
                bar.n = max(0, total - m["annotator_queue"] - m["annotator_in_flight"])
                bar.set_postfix_str(f"labels/s={m['labels_per_s']:.1f}", refresh=True)
        m = service.metrics()
    finally:
        service.close()
    print(
        f"store: {store}\nannotator version: {service.version}\n"
        f"captions: {len(seen)} unique of {len(captions)}  questions asked: {m['labels_total'] + m['unlabelable_total']}  "
        f"requests: {m['annotator_requests_total']}  store hit rate: {_fmt(m['annotator_store_hit_rate'], '.2f')}  "
        f"unlabelable: {m['unlabelable_total']}  parse failures: {m['annotator_parse_failures']}  "
        f"backend errors: {m['annotator_backend_errors']}  latency p50: {_fmt(m['annotator_latency_p50'], '.3f')}s"
    )
    if reference is not None:
        print(labels_report(store, service.version, Path(args.file)))
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    """Summarise a label store."""
    from oni_sys.annotators.report import labels_report

    try:
        print(
            labels_report(
                Path(args.store), args.version, Path(args.reference) if args.reference else None
            )
        )
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    return 0


def cmd_rewards(args: argparse.Namespace) -> int:
    """Captions of a run by intrinsic reward earned."""
    from oni_sys.reward_report import rewards_report

    top = int(args.top) if args.top.isdigit() else 0
    if top < 1:
        raise ConfigError([f"--top: expected a positive integer, got {args.top!r}"])
    try:
        print(rewards_report(Path(args.run_dir), top), end="")
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check what a run needs on this machine; exit code 1 when a needed check fails."""
    from oni_sys.annotators.preflight import annotator_file_problems
    from oni_sys.config import load_config
    from oni_sys.doctor import run_doctor

    cfg = load_config(None, _annotator_overrides(args.overrides))
    if problems := annotator_file_problems(cfg.annotator):
        raise ConfigError(problems)  # a file named in the arguments: bad input, not a finding
    # The report is the output; INFO logs of Ray and the backends would bury it.
    logging.getLogger().setLevel(logging.WARNING)
    return run_doctor(cfg)


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
    p_annotate = sub.add_parser("annotate", help="label a file of captions into a store")
    p_annotate.add_argument("file", help='captions: .txt (one a line) or .jsonl ({"caption": ...})')
    p_annotate.add_argument(
        "overrides", nargs="*", help="annotator keys, e.g. backend=rules store=labels.sqlite"
    )
    p_annotate.set_defaults(func=cmd_annotate)
    p_labels = sub.add_parser("labels", help="summarise a label store")
    p_labels.add_argument("store", help="a labels.sqlite file")
    p_labels.add_argument("--reference", help='JSONL of {"caption": ..., "label": 0|1}')
    p_labels.add_argument("--version", help="annotator version (default: every one stored)")
    p_labels.set_defaults(func=cmd_labels)
    p_rewards = sub.add_parser("rewards", help="captions of a run by intrinsic reward earned")
    p_rewards.add_argument("run_dir", help="a run directory, e.g. runs/vault")
    p_rewards.add_argument("--top", default="20", help="how many captions (default 20)")
    p_rewards.set_defaults(func=cmd_rewards)
    p_doctor = sub.add_parser("doctor", help="check what a run needs on this machine")
    p_doctor.add_argument(
        "overrides", nargs="*", help="annotator keys as for annotate, e.g. backend=openai model=x"
    )
    p_doctor.set_defaults(func=cmd_doctor)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from oni_sys.annotators.preflight import AnnotatorUnavailable

    try:
        return args.func(args)
    except ConfigError as exc:
        for err in exc.errors:
            print(f"config error: {err}", file=sys.stderr)
        return 2
    except AnnotatorUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ANNOTATOR
    except RuntimeError as exc:
        # Imported only here: oni_sys.runtime (torch) is already loaded when a run raised it.
        from oni_sys.runtime.placement import ClusterTooSmall

        if not isinstance(exc, ClusterTooSmall):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
