"""Agreement of the annotator LLM's labels with the reference labels of NetHack messages.

How to run:   .venv/bin/python benchmarks/agreement.py [--variants all] [--threads 1]
Results:      for each prompt variant, balanced accuracy (at the configured threshold and at a
              threshold calibrated on our own held-out messages, never on the reference file),
              ROC AUC, and ms per label; then the ranking prompt's pairwise accuracy. The first
              row, ``shipped``, is the default configuration: classification, goal ``score``,
              few-shot examples on, sentences split and combined with max, threshold 0.5.

The reference file (``examples/data/nethack_captions_dev.jsonl``, 40 messages, a copy of the data
shared with the project) is only measured on: the prompt's worked examples and the calibration
messages below are our own.

Backends (``--backend``, comma-separated to measure several in one run, with a summary table):
``llamacpp`` (default: the embedded Gemma 3 270M in its child process, or ``--model GGUF``);
``openai``, an OpenAI-compatible server: by default the project's own ``python -m
llama_cpp.server`` with the same packaged GGUF (or ``--model GGUF``), started on 127.0.0.1 for the
measurement and stopped after, or any running server with ``--base-url URL --model NAME``.
``rules`` (no general rules exist) and ``vllm`` (needs a GPU: measure its server with
``--backend openai``) are reported as not measured. The per-backend table of docs/ANNOTATOR.md:

    .venv/bin/python benchmarks/agreement.py --backend llamacpp,openai,rules,vllm \\
        --variants shipped --no-calibration

Results to expect (2-core CPU shared with other jobs, Gemma 3 270M Q4_K_M, llama-cpp-python
0.3.36, llamacpp backend, measured 2026-12-01 with the default arguments, 1 min 53 s):

    variant                           BA@0.5  cal_th  BA@cal    AUC   ms/q (1 thread, busy CPU)
    shipped                            0.900   0.507   0.900  0.968  ~120 (~50 idle, PERFORMANCE.md)
    zero-shot                          0.550   0.388   0.600  0.682
    no-sentence-split                  0.900   0.507   0.900  0.950
    number-template                    0.825   0.468   0.875  0.953
    free-text goal (no examples)       0.625   0.530   0.600  0.770
    ranking: pairwise accuracy 0.515, order-consistent 0.030 (position bias)

On 2026-11-22 the record was shipped 0.950, zero-shot 0.575, number-template 0.950, free-text
goal 0.625, ranking 0.540 / 0.080 (the code of that day gives 0.900 for shipped here today too,
docs/ANNOTATOR.md): read the rows to +-0.05 or so, 2 messages of 40. The ``openai`` backend on
the same GGUF: shipped 0.900, ranking 0.520.

Prompt designs tried before the shipped one (same 16 examples; chosen on our own calibration
messages, BA@0.5 / AUC there, then dev BA@0.5 / AUC): " yes"/" no" with "Each game message
below is quoted. Answer yes ..." 0.901/0.976 -> 0.775/0.963; the same with the examples in
negative-first order 0.917/0.984 -> 0.850/0.960; " Yes"/" No" 0.972/0.984 -> 0.925/0.973;
wording "For each game message below, answer yes ..." 0.972/0.988 -> 0.875/0.975; that wording
with " Yes"/" No" (shipped) 0.972/0.988 -> 0.950/0.965; " Yes"/" No" negative-first
0.917/0.980 -> 0.900/0.922; 4+4 examples 0.687/0.893 -> 0.525/0.897; 6+6 examples
0.837/0.940 -> 0.825/0.890. Three designs tied on our own messages; the dev numbers of all of
them were seen before picking, so read 0.875-0.950 as the range, not 0.950 alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from oni_sys.annotators.base import Backend, Question, UnparseableAnswer
from oni_sys.annotators.embedded_model import EMBEDDED_MODEL_ID, embedded_gguf_path
from oni_sys.annotators.llamacpp_backend import LlamaCppBackend
from oni_sys.annotators.llamacpp_server import LlamaCppServer
from oni_sys.annotators.normalise import caption_parts, combine_max
from oni_sys.annotators.openai_backend import OpenAIBackend
from oni_sys.annotators.prompts import EXAMPLES, build_classification, build_ranking
from oni_sys.config import AnnotatorConfig

DEV = Path(__file__).resolve().parents[1] / "examples" / "data" / "nethack_captions_dev.jsonl"

# Our own labelled messages (goal: score), written from general NetHack knowledge, disjoint from
# the prompt's examples and from the reference file; used only to pick a calibrated threshold.
CALIBRATION: list[tuple[str, int]] = [
    *[
        (c, 1)
        for c in [
            "You kill the fox!",
            "You kill the giant bat!",
            "You kill the gnome!",
            "You kill it!",
            "You destroy the gnome zombie!",
            "$ - 7 gold pieces.",
            "$ - 150 gold pieces.",
            "Welcome to experience level 3.",
            "Welcome to experience level 8.",
            "You feel more experienced.",
            "You find a hidden door.",
            "You feel strong!",
            "You feel wise!",
            "You kill the hobbit!",
        ]
    ],
    *[
        (c, 0)
        for c in [
            "You hear some noises in the distance.",
            "This door is locked.",
            "You miss the fox.",
            "The gnome lord hits!",
            "You are beginning to feel hungry.",
            "In what direction?",
            "There is nothing here to pick up.",
            "You don't have anything to eat.",
            "Really attack the little dog?",
            "You displace your kitten.",
            "You stop.  Your kitten is in the way.",
            "You hear a door open.",
            "You see no door there.",
            "You hear the splashing of a naiad.",
            "Your movements are slowed slightly because of your load.",
            "You can't reach the floor.",
            "Be careful!  New moon tonight.",
            "You feel feverish.",
        ]
    ],
]

#: backends this benchmark cannot measure, and why
NOT_MEASURED: dict[str, str] = {
    "rules": "not an LLM: annotator.rules are regular expressions written for one environment, "
    "and there are no general rules to measure on NetHack messages",
    "vllm": "not measured, needs a GPU; on a GPU machine: vllm serve <model> --host 127.0.0.1, "
    "then --backend openai --base-url http://127.0.0.1:8000/v1 --model <model> "
    "(the vllm backend speaks openai to that same server)",
}

VARIANTS: dict[str, dict] = {
    "shipped": {},
    "zero-shot": {"few_shot": False},
    "no-sentence-split": {"split_sentences": False},
    "number-template": {"number_template": True},
    "free-text goal (no examples)": {
        "goal": "kill monsters, pick up gold, find the stairs down and gain experience levels"
    },
}


def balanced_accuracy(labels: list[int], predictions: list[int]) -> float:
    """Mean of the recall of each class (0.5 for a constant predictor)."""
    recalls = []
    for cls in (0, 1):
        idx = [i for i, y in enumerate(labels) if y == cls]
        if idx:
            recalls.append(sum(predictions[i] == cls for i in idx) / len(idx))
    return sum(recalls) / len(recalls)


def roc_auc(labels: list[int], scores: list[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def best_threshold(labels: list[int], scores: list[float]) -> float:
    """The threshold maximising balanced accuracy (midpoint between neighbouring scores)."""
    cuts = sorted(set(scores))
    candidates = [0.0] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:])] + [1.0]
    return max(
        candidates,
        key=lambda t: balanced_accuracy(labels, [int(s >= t) for s in scores]),
    )


async def probability(backend: Backend, question: Question, choice: int) -> float | None:
    """P(choice) renormalised over the allowed answers; None when no allowed answer had one."""
    try:
        return (await backend.score(question)).probabilities()[choice]
    except UnparseableAnswer:
        return None


async def p_yes(backend: Backend, caption: str, cfg: AnnotatorConfig, timings: list) -> float:
    """P(progress) of a caption as the service computes it: per part, combined with max.

    A part with no allowed answer counts as 0 (the service would store it as unlabelable)."""
    probs = []
    for part in caption_parts(caption, split=cfg.split_sentences, template=cfg.number_template):
        t0 = time.perf_counter()
        p = await probability(backend, build_classification(part, cfg), 0)
        timings.append(time.perf_counter() - t0)
        probs.append(0.0 if p is None else p)
    return combine_max(probs)


async def run_variant(
    backend: Backend, name: str, overrides: dict, dev: list, calibrate: bool = True
) -> dict:
    cfg = dataclasses.replace(AnnotatorConfig(), **overrides)
    timings: list[float] = []
    cal_th = float("nan")
    if calibrate:
        cal = [await p_yes(backend, c, cfg, timings) for c, _ in CALIBRATION]
        cal_th = best_threshold([y for _, y in CALIBRATION], cal)
        timings.clear()
    scores = [await p_yes(backend, c, cfg, timings) for c, _ in dev]
    labels = [y for _, y in dev]
    return {
        "variant": name,
        "ba": balanced_accuracy(labels, [int(s >= cfg.threshold) for s in scores]),
        "cal_th": cal_th,
        "ba_cal": balanced_accuracy(labels, [int(s >= cal_th) for s in scores])
        if calibrate
        else float("nan"),
        "auc": roc_auc(labels, scores),
        "ms": 1000 * statistics.median(timings),
        "questions": len(timings),
    }


async def ranking_accuracy(backend: Backend, dev: list, n_pairs: int) -> tuple[float, float]:
    """Share of (progress, no progress) pairs where the better message wins, asked in both orders
    (an answer with neither letter counts as wrong), and the share answered alike in both."""
    cfg = AnnotatorConfig(prompt="ranking")
    pos = [c for c, y in dev if y == 1]
    neg = [c for c, y in dev if y == 0]
    rng = random.Random(0)
    pairs = rng.sample([(p, n) for p in pos for n in neg], n_pairs)
    correct, consistent = 0, 0
    for p, n in pairs:
        first = await probability(backend, build_ranking(p, n, cfg), 0)  # P(A = p)
        second = await probability(backend, build_ranking(n, p, cfg), 1)  # P(B = p)
        first, second = first or 0.0, second or 0.0
        correct += (first > 0.5) + (second > 0.5)
        consistent += (first > 0.5) == (second > 0.5)
    return correct / (2 * n_pairs), consistent / n_pairs


@contextlib.asynccontextmanager
async def open_backend(args: argparse.Namespace, name: str, log_dir: Path):
    """The backend to measure, started; what it needed (its own server) is stopped after."""
    if name == "llamacpp":
        backend: Backend = LlamaCppBackend(args.model, n_threads=args.threads)
        try:
            await backend.start()
            yield backend
        finally:
            await backend.close()
        return
    server = None
    if args.base_url:
        if not args.model:
            raise SystemExit("--base-url needs --model: the name the server serves")
        base_url, model = args.base_url, args.model
    else:  # the project's own llama.cpp server with the packaged (or the given) GGUF
        gguf = Path(args.model) if args.model else embedded_gguf_path()
        model = EMBEDDED_MODEL_ID if args.model is None else gguf.stem
        server = LlamaCppServer(gguf, log_dir / "llama_cpp.server.log", model, args.threads)
        await asyncio.to_thread(server.start)
        base_url = server.base_url
    backend = OpenAIBackend(base_url, model, concurrency=1)
    try:
        await backend.start()
        yield backend
    finally:
        await backend.close()
        if server is not None:
            server.stop()


def describe(backend: Backend, name: str, args: argparse.Namespace) -> str:
    """The model column: the backend's model id, and where an OpenAI-compatible server was."""
    if name == "openai":
        where = args.base_url or "own llama_cpp.server"
        return f"{backend.model_id} ({where})"
    return backend.model_id


async def measure(args: argparse.Namespace, name: str, dev: list, log_dir: Path) -> dict:
    """Every asked variant and the ranking pairs on one backend; prints as it goes."""
    t_start = time.perf_counter()
    async with open_backend(args, name, log_dir) as backend:
        load_s = time.perf_counter() - t_start
        cfg = AnnotatorConfig()
        t0 = time.perf_counter()
        await backend.score(build_classification("You kill the newt!", cfg))
        first_s = time.perf_counter() - t0
        model = describe(backend, name, args)
        print(f"[{name}] model {model}: start {load_s:.2f} s, first label {first_s * 1000:.0f} ms")
        names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
        print(
            f"{'variant':32s} {'BA@0.5':>7s} {'cal_th':>7s} {'BA@cal':>7s} {'AUC':>6s} {'ms/q':>6s}"
        )
        results = {}
        for variant in names:
            r = results[variant] = await run_variant(
                backend, variant, VARIANTS[variant], dev, not args.no_calibration
            )
            print(
                f"{r['variant']:32s} {r['ba']:7.3f} {r['cal_th']:7.3f} {r['ba_cal']:7.3f} "
                f"{r['auc']:6.3f} {r['ms']:6.1f}",
                flush=True,
            )
        acc = cons = None
        if args.pairs:
            acc, cons = await ranking_accuracy(backend, dev, args.pairs)
            print(
                f"ranking: pairwise accuracy {acc:.3f} over {args.pairs} pairs x 2 orders, "
                f"order-consistent {cons:.3f}",
                flush=True,
            )
    return {
        "backend": name,
        "model": model,
        "shipped": results.get("shipped"),
        "pairwise": acc,
        "consistent": cons,
        "seconds": time.perf_counter() - t_start,
    }


def print_summary(rows: list[dict], skipped: list[str], pairs: int) -> None:
    """One line per backend: the shipped prompt's balanced accuracy and ranking accuracy."""
    print(f"\nper backend (shipped prompts, {pairs} ranking pairs x 2 orders):")
    print(
        f"{'backend':9s} {'model':52s} {'BA@0.5':>7s} {'pairwise':>8s} {'consist':>7s} "
        f"{'ms/q':>6s} {'s':>5s}"
    )
    for r in rows:
        shipped = r["shipped"]
        ba = f"{shipped['ba']:7.3f}" if shipped else f"{'-':>7s}"
        ms = f"{shipped['ms']:6.1f}" if shipped else f"{'-':>6s}"
        acc = f"{r['pairwise']:8.3f}" if r["pairwise"] is not None else f"{'-':>8s}"
        cons = f"{r['consistent']:7.3f}" if r["consistent"] is not None else f"{'-':>7s}"
        print(f"{r['backend']:9s} {r['model']:52s} {ba} {acc} {cons} {ms} {r['seconds']:5.0f}")
    for name in skipped:
        print(f"{name:9s} {NOT_MEASURED[name]}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        default="llamacpp",
        help="comma-separated: llamacpp (embedded, in process), openai (an OpenAI-compatible "
        "server; by default llama_cpp.server started here), rules and vllm (not measurable here: "
        "say why)",
    )
    parser.add_argument(
        "--model",
        help="llamacpp and openai's own server: a GGUF path (default: the packaged Gemma 3 "
        "270M); with --base-url: the model name the server serves",
    )
    parser.add_argument(
        "--base-url", help="openai: a running server's URL up to /v1 (default: start one here)"
    )
    parser.add_argument("--variants", default="all", help="comma-separated names, or all")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    parser.add_argument("--pairs", type=int, default=100, help="ranking pairs (0: skip)")
    parser.add_argument(
        "--no-calibration",
        action="store_true",
        help="skip the calibrated threshold (32 questions fewer per variant)",
    )
    args = parser.parse_args()

    backends = args.backend.split(",")
    unknown = [b for b in backends if b not in ("llamacpp", "openai", *NOT_MEASURED)]
    if unknown:
        raise SystemExit(f"--backend: unknown {unknown}; llamacpp, openai, rules or vllm")
    skipped = [b for b in backends if b in NOT_MEASURED]
    for name in skipped:
        print(f"{name}: {NOT_MEASURED[name]}")
    measured = [b for b in backends if b not in NOT_MEASURED]
    if not measured:
        raise SystemExit(2)

    dev = [(r["caption"], int(r["label"])) for r in map(json.loads, DEV.read_text().splitlines())]
    dev_texts = {c for c, _ in dev}
    own = {c for c, _ in CALIBRATION} | {e.caption for e in EXAMPLES}
    assert not dev_texts & own, "our examples must not contain reference captions"

    rows = []
    with tempfile.TemporaryDirectory(prefix="oni-agreement-") as log_dir:
        for name in measured:
            rows.append(await measure(args, name, dev, Path(log_dir)))
    if len(backends) > 1:
        print_summary(rows, skipped, args.pairs)
    elif rows[0]["shipped"]:
        print(f"balanced_accuracy: {rows[0]['shipped']['ba']:.4f}")


if __name__ == "__main__":
    asyncio.run(main())
