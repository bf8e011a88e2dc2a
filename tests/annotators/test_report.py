"""``oni-sys labels`` reports counts, top captions and agreement with a reference."""

from __future__ import annotations

import json
import re

import pytest

from oni_sys.annotators.annotation_store import UNLABELABLE, AnnotationStore, StoredLabel
from oni_sys.annotators.report import balanced_accuracy, labels_report
from oni_sys.envs.captions import caption_id


def test_balanced_accuracy_hand_computed():
    # class 1: 2 of 3 right; class 0: 3 of 5 right -> (2/3 + 3/5) / 2 = 19/30
    y_true = [1, 1, 1, 0, 0, 0, 0, 0]
    y_pred = [1, 1, 0, 0, 0, 0, 1, 1]
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(19 / 30)
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0]) == pytest.approx(0.5)  # constant guess
    assert balanced_accuracy([0, 1, 1], [1, 0, 0]) == 0.0
    assert balanced_accuracy([0, 1, 1], [0, 1, 1]) == 1.0
    assert balanced_accuracy([1, 1], [1, 0]) == pytest.approx(0.5)  # one class present
    with pytest.raises(ValueError):
        balanced_accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        balanced_accuracy([], [])


REFERENCE = [
    ("You kill the newt!", 1),
    ("$ - a gold piece.", 1),
    ("There is a staircase down here.", 1),
    ("It's a wall.", 0),
    ("You hear some noises.", 0),
    ("Never mind.", 0),
]


def _build_store(path):
    stored = {  # caption -> (label, probability) under version v1
        "You kill the newt!": (1, 0.97),
        "$ - a gold piece.": (0, 0.30),
        "It's a wall.": (0, 0.05),
        "You hear some noises.": (1, 0.60),
        "Never mind.": (0, 0.10),
    }
    with AnnotationStore(path) as store:
        texts = [text for text, _ in REFERENCE]
        store.add_captions({caption_id(t): t for t in texts})
        store.put_labels(
            "v1", [StoredLabel(caption_id(t), lab, p) for t, (lab, p) in stored.items()]
        )
        store.put_labels(
            "v1",
            [StoredLabel(caption_id(texts[2]), None, None, UNLABELABLE, 3, "timeout")],
        )
        store.put_labels("v2", [StoredLabel(caption_id(t), 1, 0.9) for t in texts])


def _write_reference(path, rows):
    path.write_text("".join(json.dumps({"caption": c, "label": y}) + "\n" for c, y in rows))


def test_labels_report_prints_agreement_per_version(tmp_path):
    store_path, ref = tmp_path / "labels.sqlite", tmp_path / "ref.jsonl"
    _build_store(store_path)
    _write_reference(ref, REFERENCE)

    text = labels_report(store_path, "v1", ref)
    # v1 covers 5 of 6 rows (the staircase is unlabelable): class 1: newt right, gold wrong
    # -> 1/2; class 0: wall and never-mind right, noises wrong -> 2/3; mean 7/12
    (score,) = re.findall(r"^balanced_accuracy: (\S+)$", text, re.M)
    assert float(score) == pytest.approx(7 / 12, abs=1e-4)
    assert re.search(r"^coverage: 5/6$", text, re.M)
    assert re.search(r"reference 0\s+2\s+1$", text, re.M)
    assert re.search(r"reference 1\s+1\s+1$", text, re.M)
    assert "unlabelable: 1" in text
    lines = text.splitlines()
    top = lines.index("most positive:")
    assert lines[top + 1].split(maxsplit=1) == ["0.970", "You kill the newt!"]
    bottom = lines.index("most negative:")
    assert lines[bottom + 1].split(maxsplit=1) == ["0.050", "It's a wall."]

    both = labels_report(store_path, None, ref)  # no version given: every version
    scores = re.findall(r"^balanced_accuracy: (\S+)$", both, re.M)
    assert [float(s) for s in scores] == [pytest.approx(7 / 12, abs=1e-4), 0.5]
    assert "== annotator version: v1" in both and "== annotator version: v2" in both

    plain = labels_report(store_path)  # without a reference: counts and captions only
    assert "balanced_accuracy" not in plain
    assert "labelled: 5 (positive 2, negative 3), unlabelable: 1" in plain


def test_labels_report_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere.sqlite"
    with pytest.raises(ValueError, match="nowhere.sqlite"):
        labels_report(missing)
    assert not missing.exists()  # reporting never creates a store

    store_path, ref = tmp_path / "labels.sqlite", tmp_path / "ref.jsonl"
    _build_store(store_path)
    ref.write_text('{"caption": "You kill the newt!", "label": 1}\n{"caption": "x", "label": 2}\n')
    with pytest.raises(ValueError, match=r"ref\.jsonl, line 2"):
        labels_report(store_path, None, ref)
    ref.write_text('{"caption": "x", "label": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"ref\.jsonl, line 2"):
        labels_report(store_path, None, ref)
    with pytest.raises(ValueError, match="no labels of annotator version 'v9'"):
        labels_report(store_path, "v9")
