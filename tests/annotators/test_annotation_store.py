"""The annotation store keeps labels per annotator version, durably and transactionally."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from oni_sys.annotators.annotation_store import (
    SCHEMA_VERSION,
    UNLABELABLE,
    AnnotationStore,
    StoredLabel,
    StoredPreference,
)

HIGH = 2**63  # ids at and above this are negative as SQLite integers
IDS = [1, 42, HIGH - 1, HIGH, HIGH + 12345, 2**64 - 1]


@pytest.fixture
def store(tmp_path):
    with AnnotationStore(tmp_path / "labels.sqlite") as s:
        s.add_captions({cid: f"caption {cid}" for cid in IDS})
        yield s


def test_caption_round_trip_with_uint64_ids(tmp_path):
    path = tmp_path / "labels.sqlite"
    with AnnotationStore(path) as s:
        assert s.add_captions({cid: f"caption {cid}" for cid in IDS}) == len(IDS)
        assert s.add_captions({HIGH: "another text", 7: "seven"}) == 1  # only 7 is new
        assert s.record_seen({HIGH: 3, 2**64 - 1: 2, 999: 5}) == 2  # 999 has no text
        s.record_seen({HIGH: 1})
    with AnnotationStore(path) as s:  # reopened: everything was committed
        assert s.caption_text(HIGH) == f"caption {HIGH}"  # the first text is kept
        assert s.caption_text(999) is None
        assert s.texts([*IDS, 999]) == {cid: f"caption {cid}" for cid in IDS}
        assert s.times_seen([HIGH, 2**64 - 1, 1]) == {HIGH: 4, 2**64 - 1: 2, 1: 0}
        assert s.counts()["captions"] == len(IDS) + 1


@pytest.mark.parametrize("bad", [0, -1, 2**64])
def test_out_of_range_ids_are_refused(store, bad):
    with pytest.raises(ValueError, match="caption id"):
        store.add_captions({bad: "x"})


def test_label_round_trip(store):
    rows = [
        StoredLabel(cid, i % 2, 0.1 + 0.8 * (i % 2), attempts=i + 1) for i, cid in enumerate(IDS)
    ]
    store.put_labels("gemma|v1", rows)
    got = store.get_labels("gemma|v1")
    assert set(got) == set(IDS)
    for rec in rows:
        back = got[rec.caption_id]
        assert (back.label, back.probability, back.status, back.attempts) == (
            rec.label,
            pytest.approx(rec.probability),
            "labelled",
            rec.attempts,
        )
        assert back.created is not None
    assert set(store.get_labels("gemma|v1", [HIGH, 2**64 - 1, 5])) == {HIGH, 2**64 - 1}


def test_versions_are_isolated(store):
    store.put_labels("A", [StoredLabel(HIGH, 1, 0.9)])
    store.put_labels("B", [StoredLabel(42, 0, 0.2)])
    assert set(store.get_labels("A")) == {HIGH}
    assert set(store.get_labels("B")) == {42}
    assert store.get_labels("C") == {}
    assert store.missing("B", [HIGH, 42]) == [HIGH]
    assert store.counts("A")["positive"] == 1 and store.counts("A")["negative"] == 0
    assert store.counts("B")["negative"] == 1
    assert store.versions() == ["A", "B"]


def test_missing_keeps_order_and_counts_unlabelable_as_stored(store):
    store.put_labels(
        "v", [StoredLabel(42, 1, 0.8), StoredLabel(HIGH, None, None, UNLABELABLE, 3, "no answer")]
    )
    assert store.missing("v", [2**64 - 1, 42, HIGH, 1, 2**64 - 1]) == [2**64 - 1, 1]
    assert store.missing("never-used", [HIGH, 1]) == [HIGH, 1]


def test_unlabelable_is_never_a_label(store):
    store.put_labels("v", [StoredLabel(HIGH, None, None, UNLABELABLE, 3, "timeout")])
    rec = store.get_labels("v")[HIGH]
    assert (rec.status, rec.label, rec.probability, rec.attempts, rec.error) == (
        "unlabelable",
        None,
        None,
        3,
        "timeout",
    )
    c = store.counts("v")
    assert (c["labelled"], c["positive"], c["negative"], c["unlabelable"]) == (0, 0, 0, 1)
    assert store.top_captions("v", 5) == [] and store.top_captions("v", 5, positive=False) == []
    # an unlabelable record carrying a label is refused rather than stored as one
    with pytest.raises(ValueError, match="unlabelable"):
        store.put_labels("v", [StoredLabel(42, 1, None, UNLABELABLE)])
    # a later success replaces the failure; a later failure never replaces a success
    store.put_labels("v", [StoredLabel(HIGH, 1, 0.7, attempts=4)])
    store.put_labels("v", [StoredLabel(HIGH, None, None, UNLABELABLE, 9, "server down")])
    rec = store.get_labels("v")[HIGH]
    assert (rec.status, rec.label, rec.attempts) == ("labelled", 1, 4)


def test_a_bad_row_stores_nothing_of_its_batch(store):
    good = [StoredLabel(cid, 1, 0.9) for cid in IDS[:3]]
    with pytest.raises(ValueError, match="probability"):
        store.put_labels("v", [*good, StoredLabel(HIGH, 1, 1.5)])
    with pytest.raises(ValueError, match="add_captions"):
        store.put_labels("v", [*good, StoredLabel(123456, 0, 0.1)])  # no text stored
    assert store.get_labels("v") == {}


def test_preferences_keep_ordered_pairs_and_reject_self_pairs(store):
    rows = [
        StoredPreference(HIGH, 42, 0.8),
        StoredPreference(42, HIGH, 0.3),
        StoredPreference(1, 2**64 - 1, None, UNLABELABLE, 2, "unparseable"),
    ]
    store.put_preferences("rank", rows)
    got = {(p.caption_a, p.caption_b): p for p in store.get_preferences("rank")}
    assert got[(HIGH, 42)].preference == pytest.approx(0.8)
    assert got[(42, HIGH)].preference == pytest.approx(0.3)
    assert got[(1, 2**64 - 1)].status == "unlabelable"
    assert got[(1, 2**64 - 1)].preference is None
    assert store.get_preferences("other") == []
    assert store.missing_preferences("rank", [(42, HIGH), (HIGH, 1), (1, 2**64 - 1)]) == [(HIGH, 1)]
    with pytest.raises(ValueError, match="itself"):
        store.put_preferences(
            "rank", [StoredPreference(1, 42, 0.5), StoredPreference(HIGH, HIGH, 0.5)]
        )
    assert len(store.get_preferences("rank")) == 3  # the batch with the bad pair left nothing
    c = store.counts("rank")
    assert (c["preferences"], c["preferences_unlabelable"]) == (2, 1)


def test_top_captions_by_probability(store):
    probs = dict(zip(IDS, [0.95, 0.1, 0.6, 0.99, 0.02, 0.4]))
    store.put_labels("v", [StoredLabel(cid, int(p > 0.5), p) for cid, p in probs.items()])
    top = store.top_captions("v", 2)
    assert [(t.caption_id, t.text) for t in top] == [(HIGH, f"caption {HIGH}"), (1, "caption 1")]
    bottom = store.top_captions("v", 2, positive=False)
    assert [t.caption_id for t in bottom] == [HIGH + 12345, 42]
    assert bottom[0].probability == pytest.approx(0.02)


def test_export_jsonl(store, tmp_path):
    store.put_labels("v1", [StoredLabel(2**64 - 1, 1, 0.75)])
    store.put_labels("v1", [StoredLabel(42, None, None, UNLABELABLE, 2, "empty answer")])
    store.put_preferences("v1", [StoredPreference(HIGH, 1, 0.5)])
    store.put_labels("v2", [StoredLabel(1, 0, 0.25)])
    out = tmp_path / "export" / "labels.jsonl"
    assert store.export_jsonl(out, version="v1") == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    labels = {r["caption_id"]: r for r in rows if r["kind"] == "label"}
    assert labels[2**64 - 1]["caption"] == f"caption {2**64 - 1}"
    assert (labels[2**64 - 1]["label"], labels[2**64 - 1]["probability"]) == (1, 0.75)
    assert labels[42]["status"] == "unlabelable" and labels[42]["label"] is None
    assert labels[42]["error"] == "empty answer"
    (pref,) = [r for r in rows if r["kind"] == "preference"]
    assert (pref["caption_a"], pref["caption_b"], pref["preference"]) == (HIGH, 1, 0.5)
    assert (pref["caption_a_text"], pref["caption_b_text"]) == (f"caption {HIGH}", "caption 1")
    assert {r["version"] for r in rows} == {"v1"}
    assert store.export_jsonl(out) == 4  # all versions, replacing the file
    assert [p.name for p in out.parent.iterdir()] == ["labels.jsonl"]  # no temporary left over


def test_newer_schema_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "labels.sqlite"
    AnnotationStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,)
        )
    with pytest.raises(ValueError, match=f"schema {SCHEMA_VERSION + 1}, newer"):
        AnnotationStore(path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ValueError, match="not an SQLite database"):
        AnnotationStore(junk)
    with pytest.raises(ValueError, match="no such file"):
        AnnotationStore(tmp_path / "absent.sqlite", create=False)


def test_a_store_cannot_be_pickled(store):
    with pytest.raises(TypeError, match="open it in the receiving process"):
        pickle.dumps(store)


_READER = """
import sys, time
from oni_sys.annotators.annotation_store import AnnotationStore
path, batch, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = AnnotationStore(path, create=False)
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    ids = sorted(store.get_labels("v"))
    whole = ids == list(range(1, len(ids) + 1)) and len(ids) % batch == 0
    print(len(ids), int(whole), flush=True)
    if len(ids) == total:
        break
"""


def test_reader_in_another_process_sees_only_whole_batches(tmp_path):
    path = tmp_path / "labels.sqlite"
    batch, batches = 3000, 8
    store = AnnotationStore(path)
    store.add_captions({i: f"caption {i}" for i in range(1, batch * batches + 1)})
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(path), str(batch), str(batch * batches)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "ready"
        observations = []
        for b in range(batches):
            ids = range(b * batch + 1, (b + 1) * batch + 1)
            store.put_labels("v", [StoredLabel(i, 1, 0.9) for i in ids])
            # wait until the reader has seen this commit: it keeps polling meanwhile, so its
            # reads overlap the next batch's write
            while True:
                line = reader.stdout.readline()
                assert line, "the reader died"
                n, whole = map(int, line.split())
                observations.append((n, whole))
                if n >= (b + 1) * batch:
                    break
        reader.wait(timeout=60)
    finally:
        reader.kill()
        store.close()
    assert all(whole for _, whole in observations), observations
    assert {n for n, _ in observations} >= {batch * (b + 1) for b in range(batches)}


_SECOND_WRITER = """
import sys
from oni_sys.annotators.annotation_store import AnnotationStore, StoredLabel
store = AnnotationStore(sys.argv[1], create=False)
for b in range(30):
    ids = range(b * 100 + 1, (b + 1) * 100 + 1)
    store.add_captions({i: f"caption {i}" for i in ids})
    store.put_labels("b", [StoredLabel(i, 0, 0.1) for i in ids])
"""


def test_two_processes_write_the_same_store(tmp_path):
    path = tmp_path / "labels.sqlite"
    with AnnotationStore(path) as store:
        other = subprocess.Popen([sys.executable, "-c", _SECOND_WRITER, str(path)])
        try:
            for b in range(30):
                ids = range(b * 100 + 51, (b + 1) * 100 + 51)  # overlaps the other's captions
                store.add_captions({i: f"caption {i}" for i in ids})
                store.put_labels("a", [StoredLabel(i, 1, 0.9) for i in ids])
            assert other.wait(timeout=60) == 0
        finally:
            other.kill()
        assert len(store.get_labels("a")) == len(store.get_labels("b")) == 3000
        assert store.counts()["captions"] == 3050


_WRITER = """
import sys
from oni_sys.annotators.annotation_store import AnnotationStore, StoredLabel
path, batch, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = AnnotationStore(path)
b = 0
while True:
    ids = range(base + b * batch, base + (b + 1) * batch)
    store.add_captions({i: f"caption {i}" for i in ids})
    store.put_labels("v", [StoredLabel(i, i % 2, 0.2 + 0.6 * (i % 2)) for i in ids])
    print(b, flush=True)  # only after put_labels returned, i.e. committed
    b += 1
"""


@pytest.mark.parametrize("attempt", range(3))  # each kill lands at a different point
def test_committed_batches_survive_sigkill(tmp_path, attempt):
    path = tmp_path / "labels.sqlite"
    batch, base = 2000, HIGH + 1000
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(batch), str(base)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first = [child.stdout.readline() for _ in range(4)]
        assert all(first), "the writer died before it was killed"
        time.sleep(random.uniform(0.0, 0.05))  # land somewhere inside a later batch
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL
    # every line the child finished printing before it died is a batch it saw committed
    lines = first + rest.splitlines(keepends=True)
    reported = [int(x) for x in lines if x.endswith("\n")]
    assert reported == list(range(len(reported)))

    with AnnotationStore(path) as store:
        labels = store.get_labels("v")
        assert store.versions() == ["v"]
    per_batch: dict[int, int] = {}
    for cid, rec in labels.items():
        assert rec.label == cid % 2
        per_batch[(cid - base) // batch] = per_batch.get((cid - base) // batch, 0) + 1
    assert set(reported) <= set(per_batch), "a batch reported as committed is missing"
    # at most one more batch: committed, but killed before it could say so
    assert set(per_batch) - set(reported) <= {len(reported)}
    assert all(n == batch for n in per_batch.values()), f"partial batch: {per_batch}"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_bulk_lookups_span_several_statements(tmp_path):
    # more ids than one IN list may hold (SQLite's variable limit), with both halves of uint64
    n = 40_000
    ids = [i if i % 2 else HIGH + i for i in range(1, n + 1)]
    with AnnotationStore(tmp_path / "labels.sqlite") as s:
        s.add_captions({cid: str(cid) for cid in ids})
        s.put_labels("v", [StoredLabel(cid, 1, 0.9) for cid in ids[::2]])
        assert len(s.get_labels("v", ids)) == n // 2
        assert s.missing("v", ids) == ids[1::2]
        assert len(s.texts(ids)) == n
