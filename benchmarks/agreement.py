"""Agreement of the embedded LLM's labels with the reference labels of NetHack messages.

How to run:   .venv/bin/python benchmarks/agreement.py [--variants all] [--threads 1]
Results:      for each prompt variant, balanced accuracy (at the configured threshold and at a
              threshold calibrated on our own held-out messages, never on the reference file),
              ROC AUC, and ms per label; then the ranking prompt's pairwise accuracy. The first
              row, ``shipped``, is the default configuration: classification, goal ``score``,
              few-shot examples on, sentences split and combined with max, threshold 0.5.

The reference file (``examples/data/nethack_captions_dev.jsonl``, 40 messages, a copy of the data shared with the project) is only
measured on: the prompt's worked examples and the calibration messages below are our own.

Results to expect (2-core CPU, Gemma 3 270M Q4_K_M, llama-cpp-python 0.3.36):

    variant                           BA@0.5  cal_th  BA@cal    AUC   ms/q (1 thread)
    shipped                            0.950   0.511   0.900  0.965   ~30-50
    zero-shot                          0.575   0.510   0.550  0.652
    no-sentence-split                  0.925   0.511   0.900  0.948
    number-template                    0.950   0.512   0.900  0.960
    free-text goal (no examples)       0.625   0.497   0.600  0.698
    ranking: pairwise accuracy 0.540, order-consistent 0.080 (position bias)

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
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

from oni_sys.annotators.llamacpp_backend import LlamaCppBackend
from oni_sys.annotators.normalise import caption_parts, combine_max
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


async def p_yes(
    backend: LlamaCppBackend, caption: str, cfg: AnnotatorConfig, timings: list
) -> float:
    """P(progress) of a caption as the service computes it: per part, combined with max."""
    probs = []
    for part in caption_parts(caption, split=cfg.split_sentences, template=cfg.number_template):
        t0 = time.perf_counter()
        scores = await backend.score(build_classification(part, cfg))
        timings.append(time.perf_counter() - t0)
        probs.append(scores.probabilities()[0])
    return combine_max(probs)


async def run_variant(backend: LlamaCppBackend, name: str, overrides: dict, dev: list) -> dict:
    cfg = dataclasses.replace(AnnotatorConfig(), **overrides)
    timings: list[float] = []
    cal = [await p_yes(backend, c, cfg, timings) for c, _ in CALIBRATION]
    cal_th = best_threshold([y for _, y in CALIBRATION], cal)
    timings.clear()
    scores = [await p_yes(backend, c, cfg, timings) for c, _ in dev]
    labels = [y for _, y in dev]
    return {
        "variant": name,
        "ba": balanced_accuracy(labels, [int(s >= cfg.threshold) for s in scores]),
        "cal_th": cal_th,
        "ba_cal": balanced_accuracy(labels, [int(s >= cal_th) for s in scores]),
        "auc": roc_auc(labels, scores),
        "ms": 1000 * statistics.median(timings),
        "questions": len(timings),
    }


async def ranking_accuracy(
    backend: LlamaCppBackend, dev: list, n_pairs: int
) -> tuple[float, float]:
    """Share of (progress, no progress) pairs where the better message wins, asked in both orders."""
    cfg = AnnotatorConfig(prompt="ranking")
    pos = [c for c, y in dev if y == 1]
    neg = [c for c, y in dev if y == 0]
    rng = random.Random(0)
    pairs = rng.sample([(p, n) for p in pos for n in neg], n_pairs)
    correct, consistent = 0, 0
    for p, n in pairs:
        first = (await backend.score(build_ranking(p, n, cfg))).probabilities()[0]  # P(A = p)
        second = (await backend.score(build_ranking(n, p, cfg))).probabilities()[1]  # P(B = p)
        correct += (first > 0.5) + (second > 0.5)
        consistent += (first > 0.5) == (second > 0.5)
    return correct / (2 * n_pairs), consistent / n_pairs


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="all", help="comma-separated names, or all")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    parser.add_argument("--pairs", type=int, default=100, help="ranking pairs (0: skip)")
    args = parser.parse_args()

    dev = [(r["caption"], int(r["label"])) for r in map(json.loads, DEV.read_text().splitlines())]
    dev_texts = {c for c, _ in dev}
    own = {c for c, _ in CALIBRATION} | {e.caption for e in EXAMPLES}
    assert not dev_texts & own, "our examples must not contain reference captions"

    backend = LlamaCppBackend(n_threads=args.threads)
    t0 = time.perf_counter()
    await backend.start()
    load_s = time.perf_counter() - t0
    cfg = AnnotatorConfig()
    t0 = time.perf_counter()
    await backend.score(build_classification("You kill the newt!", cfg))
    first_s = time.perf_counter() - t0
    print(f"model {backend.model_id}: load {load_s:.2f} s, first label {first_s * 1000:.0f} ms")

    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    print(f"{'variant':32s} {'BA@0.5':>7s} {'cal_th':>7s} {'BA@cal':>7s} {'AUC':>6s} {'ms/q':>6s}")
    results = {}
    for name in names:
        r = results[name] = await run_variant(backend, name, VARIANTS[name], dev)
        print(
            f"{r['variant']:32s} {r['ba']:7.3f} {r['cal_th']:7.3f} {r['ba_cal']:7.3f} "
            f"{r['auc']:6.3f} {r['ms']:6.1f}"
        )
    if args.pairs:
        acc, cons = await ranking_accuracy(backend, dev, args.pairs)
        print(
            f"ranking: pairwise accuracy {acc:.3f} over {args.pairs} pairs x 2 orders, "
            f"order-consistent {cons:.3f}"
        )
    if "shipped" in results:
        print(f"balanced_accuracy: {results['shipped']['ba']:.4f}")
    await backend.close()


if __name__ == "__main__":
    asyncio.run(main())
