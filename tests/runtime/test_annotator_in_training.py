"""The annotator runs beside training in both runtimes: labels arrive, training never waits."""

from __future__ import annotations

import pytest

from oni_sys.annotators.annotation_store import AnnotationStore

RULES = 'annotator.rules=[{pattern: "(?i)kill|gold|level|stair", label: 1}]'


NETHACK = ("configs/nethack_score.yaml", "model.hidden_size=64", "train.log_every_updates=5")


def test_serial_rules_annotator_labels_every_caption(train):
    _, run_dir, rows = train(
        *NETHACK,
        "annotator.enabled=true",
        "runtime.kind=serial",
        "train.total_env_steps=8000",
        "annotator.backend=rules",
        RULES,
    )
    last = rows[-1]
    for key in ("labels_total", "annotator_queue", "annotator_requests_total"):
        assert key in last
    assert last["labels_total"] > 0
    with AnnotationStore(run_dir / "labels.sqlite") as store:
        counts = store.counts()
        (version,) = store.versions()
        labels = store.get_labels(version)
    assert counts["captions"] > 0 and len(labels) > 0
    # every stored label follows the rules: 1 exactly where a rule matches
    with AnnotationStore(run_dir / "labels.sqlite") as store:
        texts = store.texts(labels)
    import re

    for cid, record in labels.items():
        expected = int(bool(re.search("(?i)kill|gold|level|stair", texts[cid])))
        assert record.label == expected, texts[cid]


@pytest.mark.slow
def test_ray_embedded_llm_annotator(train):
    _, run_dir, rows = train(
        *NETHACK, "annotator.enabled=true", "runtime.kind=ray", "train.total_env_steps=20000"
    )
    assert rows[-1]["env_steps"] >= 20000
    assert rows[-1]["labels_total"] > 0
    assert rows[-1]["annotator_requests_total"] >= rows[-1]["labels_total"]
    with AnnotationStore(run_dir / "labels.sqlite") as store:
        assert store.counts()["labelled"] >= rows[-1]["labels_total"]
