"""Command line: ``oni-sys train CONFIG [key=value ...]`` and ``oni-sys eval RUN_DIR [key=value ...]``.

The CLI owns the console: logging format, the progress bar, and exit codes (2 for bad input, and
for a Ray cluster that cannot hold the run; 3 for an annotator that cannot answer; 1 for an
unexpected error, 130 for Ctrl-C).

An unexpected exception ends in one ``error:`` line on the console. Its traceback goes to the
run's ``train.log`` once the run has started (every log line of the driver goes there too), or to a
``oni-sys-error-*.log`` file in the temporary directory before that; the line names the file.
``--debug`` prints the traceback on the console as well.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from oni_sys.config import ConfigError

logger = logging.getLogger("oni_sys")

#: exit code when the annotator a run needs cannot answer (at start, or for too long)
EXIT_ANNOTATOR = 3
#: exit code of an unexpected error (a bug, or a failure no check foresaw)
EXIT_UNEXPECTED = 1
#: the driver's log in a run directory (all its log lines, and the traceback of a crash)
TRAIN_LOG = "train.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

USAGE = """oni-sys train CONFIG [key=value ...]     train (e.g. oni-sys train configs/cartpole.yaml algo.lr=3e-4)
oni-sys eval RUN_DIR [key=value ...]     evaluate the latest checkpoint (e.g. episodes=10)
oni-sys annotate FILE [key=value ...]    label captions (.txt: one a line, .jsonl: {"caption": ...})
oni-sys labels STORE [--reference FILE]  summarise a label store, agreement with a reference
oni-sys rewards RUN [--top N]            captions by intrinsic reward earned (reward hacking?)
oni-sys doctor [key=value ...]           check versions, llama.cpp build, annotator, Ray, NLE, GPU
oni-sys sweep submit|status|table ...    ONI's comparison as Ray jobs, and its table (docs/CLUSTER.md)
every command takes --debug: print the traceback of an unexpected error on the console too"""


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
    log_handler = None
    try:
        runtime.setup()
        # The run has started: from here on the driver's log also goes to the run directory.
        log_handler = logging.FileHandler(runtime.run_path / TRAIN_LOG)
        log_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(log_handler)
        args.crash_log = runtime.run_path / TRAIN_LOG
        bar.start(runtime.tracker.env_steps)
        logger.info("run directory: %s", runtime.run_path)
        try:
            run_dir = runtime.run()
        except AnnotatorUnavailable as exc:
            raise AnnotatorUnavailable(
                f"{exc}. The run stopped with a checkpoint; continue it with "
                f"resume={runtime.run_path}"
            ) from None
        except Exception:
            if (runtime.run_path / "checkpoints" / "latest.pt").is_file():
                args.resume_hint = f"resume={runtime.run_path}"
            raise
    finally:
        bar.close()
        if log_handler is not None:
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()
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


def cmd_sweep_submit(args: argparse.Namespace) -> int:
    """Submit (or continue) a sweep: one Ray job per (task, reward, seed)."""
    from datetime import datetime, timezone

    from oni_sys.runtime import sweep

    # `--tasks Score runs_dir=/r`: the key=value after a list option are overrides, not tasks.
    for option in ("tasks", "rewards"):
        values = getattr(args, option) or []
        args.overrides = [v for v in values if "=" in v] + args.overrides
        setattr(args, option, [v for v in values if "=" not in v])
    name = args.name or datetime.now(timezone.utc).strftime("oni-sweep-%Y%m%d-%H%M%S")
    working_dir = Path(args.working_dir).resolve()
    if not (working_dir / "configs" / "oni").is_dir():
        raise ConfigError(
            [f"--working-dir: {working_dir} has no configs/oni/; give the repository root"]
        )
    planned = sweep.plan(
        name=name,
        tasks=args.tasks or list(sweep.TASKS),
        rewards=args.rewards or list(sweep.REWARDS),
        seeds=sweep.parse_seeds(args.seeds),
        size=args.size,
        overrides=args.overrides,
        working_dir=working_dir,
        oni_sys=args.oni_sys,
        address=args.address,
        max_concurrent=args.max_concurrent,
    )
    manifest = Path(args.manifest or Path("runs") / name / "sweep.json")
    if manifest.exists():
        previous = sweep.read_manifest(manifest)
        if previous.plan_key() != planned.plan_key():
            raise ConfigError(
                [
                    f"{manifest} holds a different sweep (other runs, overrides or size); "
                    "choose another --name, or --manifest, or repeat the command that made it"
                ]
            )
        previous.max_concurrent, previous.address = planned.max_concurrent, planned.address
        planned = previous
        print(f"continuing the sweep of {manifest}")
    print(
        f"sweep {name}: {len(planned.runs)} runs, at most {planned.max_concurrent} at once; manifest {manifest}"
    )
    try:
        code = sweep.run_sweep(
            planned, manifest, working_dir, wait=not args.no_wait, poll_s=args.poll_s
        )
    except KeyboardInterrupt:
        sweep.write_manifest(manifest, planned)
        print(
            "stopped following the sweep; submitted jobs go on. Run the same command again to "
            "continue submitting, or `oni-sys sweep status " + str(manifest) + "`"
        )
        return 130
    print("\n".join(sweep.status_lines(planned, refresh=False)))
    return code


def cmd_sweep_status(args: argparse.Namespace) -> int:
    """Status of a sweep's jobs."""
    from oni_sys.runtime import sweep

    planned = sweep.read_manifest(Path(args.manifest))
    if args.address:
        planned.address = args.address
    print("\n".join(sweep.status_lines(planned)))
    return 0


def cmd_sweep_table(args: argparse.Namespace) -> int:
    """One table from a sweep's run directories."""
    from oni_sys.runtime.sweep_table import sweep_table

    text, files = sweep_table(Path(args.source), Path(args.out) if args.out else None)
    print(text, end="")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def report_unexpected(exc: BaseException, args: argparse.Namespace) -> int:
    """One ``error:`` line for an exception nothing expected; the traceback goes to the run's
    ``train.log`` (or a temporary file before a run exists) and, with ``--debug``, the console."""
    text = "".join(traceback.format_exception(exc))
    log_path = getattr(args, "crash_log", None)
    try:
        if log_path is not None:
            with open(log_path, "a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} unexpected error:\n{text}")
        else:
            fd, name = tempfile.mkstemp(prefix="oni-sys-error-", suffix=".log")
            with open(fd, "w") as fh:
                fh.write(f"oni-sys {' '.join(getattr(args, 'argv', []))}\n{text}")
            log_path = name
        where = f"the traceback is in {log_path}"
    except OSError as write_error:
        where = f"the traceback could not be written ({write_error}); --debug prints it"
    if getattr(args, "debug", False):
        print(text, end="", file=sys.stderr)
    message = (str(exc).strip().splitlines() or [""])[0][:300]
    hint = getattr(args, "resume_hint", None)
    print(
        f"error: unexpected {type(exc).__name__}"
        + (f": {message}" if message else "")
        + f" ({where}"
        + (f"; the run stopped with a checkpoint, continue it with {hint}" if hint else "")
        + ")",
        file=sys.stderr,
    )
    return EXIT_UNEXPECTED


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``oni-sys`` console script."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", help="print the traceback of an unexpected error"
    )
    parser = argparse.ArgumentParser(prog="oni-sys", usage=USAGE)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", parents=[debug], help="train a policy")
    p_train.add_argument("config", help="YAML experiment file, e.g. configs/cartpole.yaml")
    p_train.add_argument("overrides", nargs="*", help="key=value overrides")
    p_train.set_defaults(func=cmd_train)
    p_eval = sub.add_parser("eval", parents=[debug], help="evaluate a run's latest checkpoint")
    p_eval.add_argument("run_dir", help="a run directory, e.g. runs/cartpole")
    p_eval.add_argument("overrides", nargs="*", help="episodes=N, deterministic=true, seed=N")
    p_eval.set_defaults(func=cmd_eval)
    p_annotate = sub.add_parser(
        "annotate", parents=[debug], help="label a file of captions into a store"
    )
    p_annotate.add_argument("file", help='captions: .txt (one a line) or .jsonl ({"caption": ...})')
    p_annotate.add_argument(
        "overrides", nargs="*", help="annotator keys, e.g. backend=rules store=labels.sqlite"
    )
    p_annotate.set_defaults(func=cmd_annotate)
    p_labels = sub.add_parser("labels", parents=[debug], help="summarise a label store")
    p_labels.add_argument("store", help="a labels.sqlite file")
    p_labels.add_argument("--reference", help='JSONL of {"caption": ..., "label": 0|1}')
    p_labels.add_argument("--version", help="annotator version (default: every one stored)")
    p_labels.set_defaults(func=cmd_labels)
    p_rewards = sub.add_parser(
        "rewards", parents=[debug], help="captions of a run by intrinsic reward earned"
    )
    p_rewards.add_argument("run_dir", help="a run directory, e.g. runs/vault")
    p_rewards.add_argument("--top", default="20", help="how many captions (default 20)")
    p_rewards.set_defaults(func=cmd_rewards)
    p_doctor = sub.add_parser(
        "doctor", parents=[debug], help="check what a run needs on this machine"
    )
    p_doctor.add_argument(
        "overrides", nargs="*", help="annotator keys as for annotate, e.g. backend=openai model=x"
    )
    p_doctor.set_defaults(func=cmd_doctor)
    p_sweep = sub.add_parser("sweep", help="ONI's comparison as Ray jobs, and its table")
    sweep_sub = p_sweep.add_subparsers(dest="sweep_command", required=True)
    p_submit = sweep_sub.add_parser(
        "submit", parents=[debug], help="one Ray job per (task, reward, seed)"
    )
    p_submit.add_argument(
        "--address", help="Ray job API, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)"
    )
    p_submit.add_argument(
        "--tasks", nargs="+", help="default: Score Oracle StaircaseLvl3 StaircaseLvl4"
    )
    p_submit.add_argument(
        "--rewards", nargs="+", help="default: none hashing classification ranking"
    )
    p_submit.add_argument(
        "--seeds", default="3", help="N (seeds 0..N-1, default 3) or a list 0,1,2"
    )
    p_submit.add_argument(
        "--size",
        default="full",
        help="full (configs/oni/, GPU cluster) or small (configs/oni/small/)",
    )
    p_submit.add_argument(
        "--name", help="sweep name (default oni-sweep-<UTC time>): runs_dir/<name>/"
    )
    p_submit.add_argument(
        "--max-concurrent", type=int, default=1, help="jobs running at once (default 1)"
    )
    p_submit.add_argument(
        "--manifest", help="sweep manifest to write (default runs/<name>/sweep.json)"
    )
    p_submit.add_argument(
        "--working-dir", default=".", help="repository root uploaded with each job (default .)"
    )
    p_submit.add_argument(
        "--oni-sys",
        default="oni-sys",
        help="the command that runs oni-sys on the cluster (default oni-sys)",
    )
    p_submit.add_argument(
        "--no-wait", action="store_true", help="submit what may run now and return"
    )
    p_submit.add_argument("--poll-s", type=float, default=10.0, help=argparse.SUPPRESS)
    p_submit.add_argument(
        "overrides", nargs="*", help="key=value for every run; runs_dir=/abs/path is required"
    )
    p_submit.set_defaults(func=cmd_sweep_submit)
    p_status = sweep_sub.add_parser("status", parents=[debug], help="status of a sweep's jobs")
    p_status.add_argument("manifest", help="sweep.json written by sweep submit")
    p_status.add_argument("--address", help="Ray job API (default: the one in the manifest)")
    p_status.set_defaults(func=cmd_sweep_status)
    p_table = sweep_sub.add_parser(
        "table", parents=[debug], help="one table from a sweep's run directories"
    )
    p_table.add_argument("source", help="sweep.json, or the sweep directory (runs_dir/<name>)")
    p_table.add_argument(
        "--out", help="where the CSVs and curves go (default: the sweep directory)"
    )
    p_table.set_defaults(func=cmd_sweep_table)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(logging.INFO)  # also when a host program set up logging
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
            return report_unexpected(exc, args)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 (one readable line; the traceback goes to a file)
        return report_unexpected(exc, args)


if __name__ == "__main__":
    sys.exit(main())
