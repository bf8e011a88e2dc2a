"""What ``oni-sys labels STORE [--reference FILE.jsonl]`` prints: label counts, the most positive
and most negative captions, and agreement with a hand-labelled reference.

A reference file has one JSON object per line, ``{"caption": "You kill the newt!", "label": 1}``;
its captions are matched to stored labels through the same caption id the env runners compute.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Hashable, Sequence
from pathlib import Path

from oni_sys.annotators.annotation_store import AnnotationStore

logger = logging.getLogger(__name__)

#: how many of the most positive and most negative captions a report lists
TOP_N = 10
_TEXT_WIDTH = 100


def balanced_accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """Mean over the classes present in ``y_true`` of the fraction of that class predicted right.

    Unlike plain accuracy it is 0.5 for a constant guess however skewed the classes are, which
    matters because most in-game messages are not progress.

    >>> balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0])
    0.5
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("balanced accuracy needs at least one example")
    recalls = []
    for cls in set(y_true):
        pairs = [p for t, p in zip(y_true, y_pred) if t == cls]
        recalls.append(sum(p == cls for p in pairs) / len(pairs))
    return sum(recalls) / len(recalls)


def load_reference(path: Path) -> list[tuple[str, int]]:
    """``(caption, label)`` rows of a reference JSONL file (blank lines are skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the reference file ({exc.strerror})") from None
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        ok = (
            isinstance(row, dict)
            and isinstance(row.get("caption"), str)
            and row.get("label") in (0, 1)
            and not isinstance(row.get("label"), bool)
        )
        if not ok:
            raise ValueError(
                f'{path}, line {lineno}: expected {{"caption": <text>, "label": 0 or 1}}, '
                f"got {line.strip()[:80]!r}"
            )
        rows.append((row["caption"], int(row["label"])))
    return rows


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _TEXT_WIDTH else text[: _TEXT_WIDTH - 3] + "..."


def _agreement(store: AnnotationStore, version: str, reference: list[tuple[str, int]]) -> list[str]:
    # env_runner imports torch; only a report with a reference needs the caption hash.
    from oni_sys.envs.captions import caption_id

    ids = [caption_id(text) for text, _ in reference]
    stored = store.get_labels(version, ids)
    y_true, y_pred = [], []
    unlabelable = 0
    for cid, (_, label) in zip(ids, reference):
        rec = stored.get(cid)
        if rec is None:
            continue
        if rec.label is None:
            unlabelable += 1
            continue
        y_true.append(label)
        y_pred.append(rec.label)
    score = balanced_accuracy(y_true, y_pred) if y_true else math.nan
    matrix = [[0, 0], [0, 0]]
    for t, p in zip(y_true, y_pred):
        matrix[t][p] += 1
    return [
        f"balanced_accuracy: {score:.4f}",
        f"coverage: {len(y_true)}/{len(reference)}",
        f"unlabelable: {unlabelable}, not yet labelled: {len(reference) - len(y_true) - unlabelable}",
        "confusion matrix (rows: reference label, columns: stored label):",
        "               stored 0  stored 1",
        f"  reference 0  {matrix[0][0]:8d}  {matrix[0][1]:8d}",
        f"  reference 1  {matrix[1][0]:8d}  {matrix[1][1]:8d}",
    ]


def labels_report(
    store_path: str | Path, version: str | None = None, reference: Path | None = None
) -> str:
    """The text of ``oni-sys labels``: per annotator version (``version``, or every stored one)
    its counts, top captions and, given ``reference``, ``balanced_accuracy: <float>``,
    ``coverage: <labelled>/<rows>`` and a confusion matrix."""
    rows = load_reference(reference) if reference is not None else None
    with AnnotationStore(store_path, create=False) as store:
        stored_versions = store.versions()
        if version is not None and version not in stored_versions:
            raise ValueError(
                f"{store_path} has no labels of annotator version {version!r} "
                f"(it has {stored_versions or 'none'})"
            )
        versions = [version] if version is not None else stored_versions
        out = [f"store: {store_path}", f"captions: {store.counts()['captions']}"]
        if not versions:
            out.append("no labels stored yet")
        for name in versions:
            c = store.counts(name)
            out += [
                "",
                f"== annotator version: {name}",
                f"labelled: {c['labelled']} (positive {c['positive']}, negative {c['negative']})"
                f", unlabelable: {c['unlabelable']}, preferences: {c['preferences']}"
                f" (unlabelable {c['preferences_unlabelable']})",
            ]
            for title, positive in (("most positive", True), ("most negative", False)):
                top = store.top_captions(name, TOP_N, positive=positive)
                out.append(f"{title}:" if top else f"{title}: -")
                out += [f"  {s.probability:.3f}  {_one_line(s.text)}" for s in top]
            if rows is not None:
                out.append(f"reference: {reference} ({len(rows)} rows)")
                out += _agreement(store, name, rows)
    return "\n".join(out) + "\n"
