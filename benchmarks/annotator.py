"""Annotator benchmark: labels per second against concurrency, llama.cpp in a child process
against in-process, and LLM questions per NetHack step.

How to run (about 6 minutes on a 2-core CPU; prints Markdown tables, progress on stderr):
    .venv/bin/python benchmarks/annotator.py [--captions 48] [--concurrency 1,2,4,8]
        [--n-threads 1] [--no-direct] [--child-rounds 5] [--child-in-flight 8]
        [--stream-steps 200000] [--stream-envs 4] [--seed 0]
        [--skip-throughput] [--skip-child] [--skip-stream]
    (docs/PERFORMANCE.md was made with ``--stream-steps 1000000``; its child-process table with
    ``--skip-throughput --skip-stream``.)

Results to expect (2-core CPU shared with other jobs, no GPU, llama-cpp-python 0.3.36, 1 thread,
Gemma 3 270M Q4_K_M, the shipped classification prompt of ~300 tokens):
    - llama.cpp server through OpenAIBackend: ~0.7-1.2 labels/s; concurrency barely helps (the
      server runs one completion at a time), latency grows in proportion to it (p50 ~1.2 s at 1,
      ~7 s at 8). Per request llama.cpp itself needs ~0.1 s; the rest is llama-cpp-python's
      ``logits_all`` logprobs path (full-vocabulary logits kept for every evaluated token, a
      log-softmax over all of them and a Python sort of the 262k-token vocabulary).
    - LlamaCppBackend (llama.cpp in its child process since issue 9; in-process before):
      ~17-20 labels/s at any concurrency (one question at a time, ~13 caption tokens evaluated
      after the cached ~290-token prefix, ~0.055 s each); through the service at concurrency 1
      only ~11-12 labels/s, because the service's loop notices a free slot only at its next
      50 ms tick; from concurrency 2 on the service adds ~nothing.
    - random play, 1M steps: ~5,000 distinct normalised captions, ~2,200 questions with sentence
      split (-56%), ~2,150 with number templates too (-57%); still growing (~1,600 new questions
      per million steps at the end with the default split).

Part 1 (throughput) starts a real ``python -m llama_cpp.server`` on 127.0.0.1 (the embedded
Gemma 3 270M Q4_K_M, ``--logits_all true`` as the completions ``logprobs`` need, ``--n_threads``
as given) and always stops it again, also on errors or Ctrl-C (and the kernel kills it if this
process dies: ``PR_SET_PDEATHSIG``). Both backends, (a) ``OpenAIBackend`` against that server and
(b) ``LlamaCppBackend`` (llama.cpp in its child process) with the same thread count, label the
same ``--captions`` distinct single-sentence NetHack-like captions at each concurrency, driven
through :class:`~oni_sys.annotators.service.AnnotationService` (which owns the concurrency: it
keeps ``annotator.concurrency`` questions in flight; the ``OpenAIBackend`` gets the same HTTP
concurrency). Every (backend, concurrency) cell uses a fresh store and a fresh backend, so every
caption is a real LLM question; the captions are the same in every cell so the cells compare
like with like. Neither backend can reuse work between captions beyond the shared prompt prefix
(the llamacpp backend keeps exactly the caption-independent prefix; the server keeps only its
previous prompt), so re-asking the same captions in a fresh store does not flatter later cells.
One warm-up question per cell (model load, prefix evaluation, HTTP session) is not timed. The
prompt is the shipped one: ``build_classification`` with ``AnnotatorConfig()`` defaults.
labels/s = captions / (time of the last label - time of submission); latency is the time a
question spends inside ``backend.score`` as the service measures it (queueing in the server or
behind the questions pipelined to the child included). The "direct" rows (skip with
``--no-direct``) call ``LlamaCppBackend.score`` under an asyncio semaphore without the service,
to show what the service costs. Cells run interleaved (server, llamacpp, direct at concurrency 1, then 2, ...)
so load from other processes hits the backends alike.

Part 1b (child process against in-process) labels the same ``--captions`` with the in-process
``LlamaCppModel`` (``score_sync`` in a loop) and with the child-process ``LlamaCppBackend`` (the
same thread count), once with one question in flight (``score_sync`` in a loop: every answer
crosses the pipe before the next question is asked) and once with ``--child-in-flight``
questions pipelined (what the service does). Runs alternate A B C A B C ... for
``--child-rounds`` rounds after one untimed warm-up question each, so other processes' load hits
all alike; the table gives each run's labels/s, the medians and their ratio to in-process, and
the largest difference between the two sides' log-probabilities.

Part 2 (questions per million steps) plays NetHackScore with uniformly random actions in
``--stream-envs`` envs stepped in turn (each episode seeded), records each step's in-game message
(``nethack_captioner``) and counts the distinct LLM questions the service would ask, using its own
``question_texts(text, cfg)`` with ``AnnotatorConfig`` flags: (a) exact dedup of the normalised
caption (``split_sentences=False``), (b) sentence split (``split_sentences=True``, the default),
(c) sentence split + number templates (``number_template=True``), at several step counts so the
saturation shows. Random play is not trained play: a trained agent reaches deeper levels, meets
more monsters and items and reads more varied messages (and picks up gold, where number
templates matter), so expect more distinct questions, and a different saving, there.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import logging
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from oni_sys.annotators.prompts import build_classification
from oni_sys.annotators.questions import question_texts
from oni_sys.annotators.service import AnnotationService
from oni_sys.config import AnnotatorConfig
from oni_sys.envs.captions import caption_id

logger = logging.getLogger("benchmarks.annotator")

# --------------------------------------------------------------------------------------------
# captions

_MONSTERS = [
    "newt", "jackal", "grid bug", "sewer rat", "kobold", "gnome", "fox", "coyote", "hobbit",
    "giant rat", "large kobold", "yellow mold", "gecko", "lichen", "floating eye", "acid blob",
    "little dog", "kitten", "hill orc", "goblin", "gnome lord", "dwarf", "homunculus",
    "giant bat", "iguana", "rothe", "werejackal", "hobgoblin", "cave spider", "centipede",
]  # fmt: skip
_ITEMS = [
    "a dagger", "an apple", "a food ration", "a scroll labeled FOOBIE BLETCH", "a potion",
    "a gray stone", "a small shield", "a leather armor", "2 arrows", "a wand", "a ring",
    "a pick-axe", "a tin", "a fortune cookie", "a lichen corpse", "a newt corpse", "a bow",
    "an elven mithril-coat", "a candle", "a blindfold", "a lamp", "a bag", "a spellbook",
    "an amulet", "a key", "a flint stone", "a crossbow", "a club", "a mace", "a long sword",
]  # fmt: skip
_SOUNDS = [
    "some noises in the distance", "the footsteps of a guard on patrol", "a door open",
    "bubbling water", "the chime of a cash register", "a crunching sound", "a distant squeak",
    "someone counting money", "the splashing of a naiad", "a loud click",
]  # fmt: skip
_FEATURES = ["fountain", "sink", "altar", "grave", "throne", "trap door", "staircase down", "tree"]
_TEMPLATES = [
    "You kill the {m}!",
    "The {m} bites!",
    "The {m} misses!",
    "You hit the {m}.",
    "You miss the {m}.",
    "The {m} hits!",
    "You see here {i}.",
    "You find {i}.",
    "The {m} picks up {i}.",
    "You hear {s}.",
    "There is a {f} here.",
    "You destroy the {m}!",
]
#: the untimed warm-up question of every cell (not among the generated captions)
WARMUP_CAPTION = "Hello stranger, welcome to the Gnomish Mines."


def make_captions(n: int, seed: int, cfg: AnnotatorConfig) -> list[str]:
    """``n`` distinct NetHack-like captions, each exactly one question under ``cfg``."""
    pool = sorted(
        {
            t.format(m=m, i=i, s=s, f=f)
            for t in _TEMPLATES
            for m in _MONSTERS
            for i in _ITEMS[:: 3 if "{m}" in t else 1]
            for s in (_SOUNDS if "{s}" in t else _SOUNDS[:1])
            for f in (_FEATURES if "{f}" in t else _FEATURES[:1])
        }
    )
    pool = [c for c in pool if len(question_texts(c, cfg)) == 1 and c != WARMUP_CAPTION]
    if n > len(pool):
        raise SystemExit(f"--captions {n}: at most {len(pool)} distinct captions are generated")
    return random.Random(seed).sample(pool, n)


# --------------------------------------------------------------------------------------------
# part 1: labels per second against concurrency


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(np.ceil(q * len(ordered))) - 1))]


def measure_cell(
    cfg: AnnotatorConfig, backend: Any, captions: list[str], store: Path, timeout_s: float
) -> dict[str, float]:
    """Label ``captions`` through a fresh AnnotationService (after one untimed warm-up)."""
    service = AnnotationService(cfg, store, backend=backend)
    try:
        service.submit({caption_id(WARMUP_CAPTION): WARMUP_CAPTION}, {})
        if not service.wait_idle(timeout_s):
            raise RuntimeError("the warm-up question was not answered in time")
        stats = service.stats
        done_before, lat_before = stats.labels_total, len(stats.latencies)
        backend_before = dict(backend.stats) if isinstance(backend.stats, dict) else {}
        t0 = time.perf_counter()
        service.submit({caption_id(c): c for c in captions}, {})
        if not service.wait_idle(timeout_s):
            raise RuntimeError(f"{len(captions)} captions were not labelled in {timeout_s} s")
        labelled = stats.labels_total - done_before
        wall = max(stats.label_times) - t0 if labelled else float("nan")
        latencies = list(stats.latencies)[lat_before:]
        metrics = service.metrics()
        backend_after = dict(backend.stats) if isinstance(backend.stats, dict) else {}
    finally:
        service.close()
    return {
        **{f"backend_{k}": v - backend_before[k] for k, v in backend_after.items()},
        "labels": labelled,
        "labels_per_s": labelled / wall,
        "p50": _percentile(latencies, 0.50),
        "p95": _percentile(latencies, 0.95),
        "errors": metrics["annotator_backend_errors"] + metrics["annotator_parse_failures"],
        "unlabelable": metrics["unlabelable_total"],
    }


def measure_direct(
    cfg: AnnotatorConfig, backend: Any, captions: list[str], concurrency: int
) -> dict[str, float]:
    """Label ``captions`` by calling ``backend.score`` directly, ``concurrency`` at a time.

    No service, no store: the backend's own ceiling, to show what the service adds.
    """

    async def run() -> dict[str, float]:
        try:
            await backend.start()
            await backend.score(build_classification(WARMUP_CAPTION, cfg))
            semaphore = asyncio.Semaphore(concurrency)
            latencies: list[float] = []

            async def one(caption: str) -> None:
                async with semaphore:
                    t = time.perf_counter()
                    (await backend.score(build_classification(caption, cfg))).probabilities()
                    latencies.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            await asyncio.gather(*(one(c) for c in captions))
            wall = time.perf_counter() - t0
        finally:
            await backend.close()
        return {
            "labels": len(latencies),
            "labels_per_s": len(latencies) / wall,
            "p50": _percentile(latencies, 0.50),
            "p95": _percentile(latencies, 0.95),
            "errors": 0,
            "unlabelable": 0,
        }

    return asyncio.run(run())


SERVER = "llama.cpp server (OpenAIBackend)"
LOCAL = "child process (LlamaCppBackend)"
DIRECT = "child process, direct (no service)"


def run_throughput(args: argparse.Namespace) -> dict[tuple[str, int], dict[str, float]]:
    """Both backends at every concurrency, interleaved; prints the table, returns the cells.

    The cells run in the order (server, llamacpp, direct) for concurrency 1, then for 2, ...:
    interleaved, so that load from other processes on a shared machine hits all backends alike.
    """
    from oni_sys.annotators.embedded_model import EMBEDDED_MODEL_ID, embedded_gguf_path
    from oni_sys.annotators.llamacpp_backend import LlamaCppBackend
    from oni_sys.annotators.llamacpp_server import LlamaCppServer
    from oni_sys.annotators.openai_backend import OpenAIBackend

    base = AnnotatorConfig()
    captions = make_captions(args.captions, args.seed, base)
    model_path = embedded_gguf_path()
    cells: dict[tuple[str, int], dict[str, float]] = {}

    def done(name: str, conc: int, r: dict[str, float]) -> None:
        cells[(name, conc)] = r
        print(
            f"  [{name}, concurrency {conc}: {r['labels_per_s']:.2f} labels/s, "
            f"load average {os.getloadavg()[0]:.2f}]",
            file=sys.stderr,
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="oni-annotator-bench-") as tmp:
        tmp_path = Path(tmp)
        server = LlamaCppServer(
            model_path, tmp_path / "server.log", EMBEDDED_MODEL_ID, n_threads=args.n_threads
        )
        with server:
            for conc in args.concurrency:
                cfg = dataclasses.replace(base, backend="openai", concurrency=conc)
                backend = OpenAIBackend.from_config(
                    cfg, base_url=server.base_url, model=EMBEDDED_MODEL_ID
                )
                store = tmp_path / f"server-c{conc}.sqlite"
                done(SERVER, conc, measure_cell(cfg, backend, captions, store, args.timeout))

                cfg = dataclasses.replace(base, concurrency=conc, n_threads=args.n_threads)
                backend = LlamaCppBackend(cfg.model, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads)
                store = tmp_path / f"local-c{conc}.sqlite"
                done(LOCAL, conc, measure_cell(cfg, backend, captions, store, args.timeout))

                if args.direct:
                    backend = LlamaCppBackend(cfg.model, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads)
                    done(DIRECT, conc, measure_direct(cfg, backend, captions, conc))
            hits = server.log_tail(10**8).count("prefix-match hit")

    print(
        f"\n### Labels per second against concurrency ({len(captions)} distinct captions, "
        f"{args.n_threads} llama.cpp thread(s), fresh store per cell)\n"
    )
    print("| backend | concurrency | labels | labels/s | p50 latency (s) | p95 latency (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in (SERVER, LOCAL, DIRECT):
        for conc in args.concurrency:
            r = cells.get((name, conc))
            if r is None:
                continue
            note = f" ({r['errors']:.0f} errors, {r['unlabelable']:.0f} unlabelable)"
            note = note if r["errors"] or r["unlabelable"] else ""
            print(
                f"| {name} | {conc} | {r['labels']:.0f}{note} | {r['labels_per_s']:.2f} | "
                f"{r['p50']:.3f} | {r['p95']:.3f} |"
            )
    local = [r for (name, _), r in cells.items() if name == LOCAL]
    questions = max(sum(r["backend_questions"] for r in local), 1)
    evaluated = sum(r["backend_tokens_evaluated"] for r in local) / questions
    reused = sum(r["backend_tokens_reused"] for r in local) / questions
    requests = len(args.concurrency) * (len(captions) + 1)
    print(
        f"\nPrompt tokens per question: llama.cpp backend {evaluated:.1f} evaluated + {reused:.1f} "
        f"reused from the cached prefix; the server reused its previous prompt's prefix on "
        f"{hits} of {requests} requests (its log's 'prefix-match hit').",
        flush=True,
    )
    return cells


# --------------------------------------------------------------------------------------------
# part 1b: llama.cpp in a child process against in-process

INPROCESS = "in-process LlamaCppModel"
CHILD_SEQUENTIAL = "child process LlamaCppBackend, 1 in flight"


def run_child_vs_inprocess(args: argparse.Namespace) -> dict[str, list[float]]:
    """labels/s of the in-process model and the child-process backend, interleaved rounds."""
    from oni_sys.annotators.embedded_model import embedded_gguf_path
    from oni_sys.annotators.llamacpp_backend import LlamaCppBackend
    from oni_sys.annotators.llamacpp_model import LlamaCppModel

    cfg = AnnotatorConfig(n_threads=args.n_threads)
    questions = [build_classification(c, cfg) for c in make_captions(args.captions, args.seed, cfg)]
    warmup = build_classification(WARMUP_CAPTION, cfg)
    pipelined = f"child process LlamaCppBackend, {args.child_in_flight} in flight"
    model = LlamaCppModel(embedded_gguf_path(), n_ctx=cfg.n_ctx, n_threads=args.n_threads)
    backend = LlamaCppBackend(None, n_ctx=cfg.n_ctx, n_threads=args.n_threads)
    loop = asyncio.new_event_loop()
    answers: dict[str, list[list[float]]] = {}

    def in_process() -> list[list[float]]:
        return [model.score_sync(q).logprobs for q in questions]

    def child_sequential() -> list[list[float]]:
        return [backend.score_sync(q).logprobs for q in questions]

    def child_pipelined() -> list[list[float]]:
        async def run() -> list[list[float]]:
            semaphore = asyncio.Semaphore(args.child_in_flight)

            async def one(q: Any) -> list[float]:
                async with semaphore:
                    return (await backend.score(q)).logprobs

            return await asyncio.gather(*(one(q) for q in questions))

        return loop.run_until_complete(run())

    variants = {
        INPROCESS: in_process,
        CHILD_SEQUENTIAL: child_sequential,
        pipelined: child_pipelined,
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    try:
        model.load()
        model.score_sync(warmup)
        loop.run_until_complete(backend.start())
        backend.score_sync(warmup)
        for round_ in range(args.child_rounds):
            for name, run in variants.items():
                t0 = time.perf_counter()
                answers[name] = run()
                rates[name].append(len(questions) / (time.perf_counter() - t0))
                print(
                    f"  [round {round_ + 1}, {name}: {rates[name][-1]:.2f} labels/s, "
                    f"load average {os.getloadavg()[0]:.2f}]",
                    file=sys.stderr,
                    flush=True,
                )
        restarts = backend.restarts
    finally:
        loop.run_until_complete(backend.close())
        loop.close()
        model.close()
    diff = max(
        abs(a - b)
        for name in (CHILD_SEQUENTIAL, pipelined)
        for got, want in zip(answers[name], answers[INPROCESS])
        for a, b in zip(got, want)
    )
    base = float(np.median(rates[INPROCESS]))
    print(
        f"\n### llama.cpp in a child process against in-process ({len(questions)} distinct "
        f"captions, {args.n_threads} llama.cpp thread(s), {args.child_rounds} interleaved rounds)\n"
    )
    print("| variant | labels/s in each round | median labels/s | ratio to in-process |")
    print("|---|---|---:|---:|")
    for name, values in rates.items():
        median = float(np.median(values))
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {runs} | {median:.2f} | {median / base:.3f} |")
    paired = [c / a for c, a in zip(rates[pipelined], rates[INPROCESS])]
    print(
        f"\nMedian of the per-round ratios ({pipelined} / in-process): "
        f"{float(np.median(paired)):.3f}; largest |log-probability difference| between the "
        f"child's and the in-process answers: {diff:.2e}; child restarts: {restarts}.",
        flush=True,
    )
    return rates


# --------------------------------------------------------------------------------------------
# part 2: LLM questions per million NetHack steps

MODES = {
    "exact dedup of the normalised caption": dict(split_sentences=False, number_template=False),
    "sentence split (default)": dict(split_sentences=True, number_template=False),
    "sentence split + number templates": dict(split_sentences=True, number_template=True),
}


def checkpoints_for(steps: int) -> list[int]:
    """Step counts at which distinct questions are reported (for the growth curve)."""
    marks = {steps}
    for m in (10_000, 25_000, 50_000, 100_000, 200_000, 500_000, 1_000_000, 2_000_000):
        if m < steps:
            marks.add(m)
    return sorted(marks)[-6:]


def run_stream(args: argparse.Namespace) -> None:
    """Random play on NetHackScore; distinct questions under each normalisation option."""
    from oni_sys.envs.nethack import make_nethack_env, nethack_captioner

    cfgs = {name: dataclasses.replace(AnnotatorConfig(), **flags) for name, flags in MODES.items()}
    questions: dict[str, set[str]] = {name: set() for name in MODES}
    seen: set[str] = set()
    marks = checkpoints_for(args.stream_steps)
    counts: dict[int, dict[str, int]] = {}
    envs = [
        make_nethack_env("Score", observation_keys=("message", "blstats"))
        for _ in range(args.stream_envs)
    ]
    rng = np.random.default_rng(args.seed)
    episode = 0
    for env in envs:
        env.reset(seed=args.seed * 100_000 + episode)
        episode += 1
    n_actions = [int(env.action_space.n) for env in envs]
    steps = with_message = 0
    t0 = time.perf_counter()
    try:
        while steps < args.stream_steps:
            for env, n in zip(envs, n_actions):
                obs, _, terminated, truncated, info = env.step(int(rng.integers(n)))
                steps += 1
                text = nethack_captioner(obs, info)
                if text is not None:
                    with_message += 1
                    if text not in seen:  # question_texts is a pure function of the text
                        seen.add(text)
                        for name, cfg in cfgs.items():
                            questions[name].update(question_texts(text, cfg))
                if terminated or truncated:
                    env.reset(seed=args.seed * 100_000 + episode)
                    episode += 1
                if steps in marks:
                    counts[steps] = {name: len(q) for name, q in questions.items()}
                    counts[steps]["_messages"] = with_message
                if steps >= args.stream_steps:
                    break
    finally:
        for env in envs:
            env.close()
    elapsed = time.perf_counter() - t0
    marks = sorted(counts)
    final = marks[-1]
    exact = list(MODES)[0]
    print(
        f"\n### LLM questions from random play on NetHackScore ({final:,} steps, "
        f"{args.stream_envs} envs, {episode} episodes, {elapsed:.0f} s)\n"
    )
    print("Distinct questions after N steps:\n")
    print("| steps | steps with a message | " + " | ".join(MODES) + " |")
    print("|---:|---:|" + "---:|" * len(MODES))
    for m in marks:
        cells = " | ".join(f"{counts[m][name]:,}" for name in MODES)
        print(f"| {m:,} | {counts[m]['_messages']:,} | {cells} |")
    half = max((m for m in marks if m <= final // 2), default=None)
    print(
        f"\nPer million steps ({final:,} steps; the tail rate counts only the questions that were "
        f"new after step {half or 0:,}):\n"
    )
    print(
        "| option | distinct questions | questions per 1M steps | tail: new questions per 1M "
        "steps | saving vs exact dedup |"
    )
    print("|---|---:|---:|---:|---:|")
    for name in MODES:
        n = counts[final][name]
        tail = (
            (n - counts[half][name]) / (final - half) * 1e6 if half else float("nan")
        )  # marginal rate
        saving = 1.0 - n / counts[final][exact] if counts[final][exact] else float("nan")
        print(f"| {name} | {n:,} | {n / final * 1e6:,.0f} | {tail:,.0f} | {saving:.1%} |")


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--captions", type=int, default=48, help="distinct captions per cell")
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2, 4, 8],
        help="comma-separated questions in flight (default 1,2,4,8)",
    )
    parser.add_argument(
        "--n-threads",
        type=int,
        default=AnnotatorConfig().n_threads,
        help="llama.cpp threads, for every llama.cpp alike (default: annotator.n_threads)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per cell")
    parser.add_argument(
        "--child-rounds", type=int, default=5, help="interleaved rounds of part 1b (default 5)"
    )
    parser.add_argument(
        "--child-in-flight",
        type=int,
        default=8,
        help="questions pipelined to the child process in part 1b (default 8)",
    )
    parser.add_argument("--stream-steps", type=int, default=200_000, help="NetHack steps played")
    parser.add_argument("--stream-envs", type=int, default=4, help="NetHack envs stepped in turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-direct",
        dest="direct",
        action="store_false",
        help="skip the llamacpp rows that call the backend directly, without the service",
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-child", action="store_true", help="skip part 1b")
    parser.add_argument("--skip-stream", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(
        f"annotator benchmark, {datetime.date.today().isoformat()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
        f"python {platform.python_version()}"
    )
    start = time.perf_counter()
    if not args.skip_throughput:
        run_throughput(args)
    if not args.skip_child:
        run_child_vs_inprocess(args)
    if not args.skip_stream:
        run_stream(args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
