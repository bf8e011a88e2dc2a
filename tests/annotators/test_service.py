"""The annotation service: each question asked once, frequent first, failures retried, never lost."""

from __future__ import annotations

import threading
import time

import pytest

from oni_sys.annotators.annotation_store import LABELLED, UNLABELABLE, AnnotationStore
from oni_sys.annotators.base import BackendError, ChoiceScores, Question
from oni_sys.annotators.rules_backend import RulesBackend
from oni_sys.annotators.service import AnnotationService
from oni_sys.config import AnnotatorConfig
from oni_sys.envs.captions import caption_id

RULES = [{"pattern": "(?i)kill|gold|level", "label": 1}]


def _cfg(**kw) -> AnnotatorConfig:
    base = {"backend": "rules", "rules": RULES, "concurrency": 4}
    return AnnotatorConfig(**{**base, **kw})


def _texts(*captions: str) -> dict[int, str]:
    return {caption_id(c): c for c in captions}


class CountingRulesBackend(RulesBackend):
    """The rules backend, recording which captions it was asked about and in what order."""

    def __init__(self, rules, delay: float = 0.0):
        super().__init__(rules)
        self.asked: list[str] = []
        self.delay = delay

    async def score(self, question: Question) -> ChoiceScores:
        import asyncio

        self.asked.append(question.captions[0])
        await asyncio.sleep(self.delay)
        return await super().score(question)


class FaultInjectingBackend(RulesBackend):
    """Fails the first ``failures`` calls with BackendError (an LLM that is down), then answers;
    or, with ``garbage=True``, never gives a usable answer."""

    def __init__(self, rules, failures: int = 0, garbage: bool = False):
        super().__init__(rules)
        self.failures, self.garbage, self.calls = failures, garbage, 0

    async def score(self, question: Question) -> ChoiceScores:
        self.calls += 1
        if self.calls <= self.failures:
            raise BackendError("injected: server unavailable")
        if self.garbage:
            return ChoiceScores([float("-inf")] * len(question.choices))
        return await super().score(question)


def test_labels_published_and_stored(tmp_path):
    store = tmp_path / "labels.sqlite"
    service = AnnotationService(_cfg(), store)
    texts = _texts("You kill the newt!", "It's a wall.", "$ - 3 gold pieces.")
    service.submit(texts, {})
    assert service.wait_idle(30)
    published = {cid: label for cid, label, _ in service.poll_labels()}
    assert published == {
        caption_id("You kill the newt!"): 1,
        caption_id("It's a wall."): 0,
        caption_id("$ - 3 gold pieces."): 1,
    }
    version = service.version
    service.close()
    with AnnotationStore(store) as s:
        labels = s.get_labels(version)
    assert {cid: r.label for cid, r in labels.items()} == published


def test_each_question_asked_once_across_runners_and_runs(tmp_path):
    store = tmp_path / "labels.sqlite"
    backend = CountingRulesBackend(RULES, delay=0.01)
    service = AnnotationService(_cfg(), store, backend=backend)
    captions = [f"You kill the monster number {i}!" for i in range(40)]
    texts = _texts(*captions)

    def runner():  # several env runners send the same new captions at once
        for cid, text in texts.items():
            service.submit({cid: text}, {cid: 1})

    threads = [threading.Thread(target=runner) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    service.submit(texts, {})  # and again later
    assert service.wait_idle(60)
    assert sorted(backend.asked) == sorted(captions)
    assert service.metrics()["annotator_requests_total"] == 40
    service.close()

    again = CountingRulesBackend(RULES)
    second = AnnotationService(_cfg(), store, backend=again)  # a new run sharing the store
    second.submit(texts, {})
    assert second.wait_idle(30)
    assert again.asked == []
    assert len(second.poll_labels()) == 40  # known labels are still published to subscribers
    assert second.metrics()["annotator_store_hit_rate"] == 1.0
    second.close()


def test_frequent_captions_first(tmp_path):
    backend = CountingRulesBackend(RULES)
    service = AnnotationService(_cfg(concurrency=1), tmp_path / "l.sqlite", backend=backend)
    # The warm-up question holds the only slot until everything else is queued, so the order
    # of the rest is decided by their counts alone.
    rare = _texts(*[f"rare message {i}" for i in range(5)])
    common = _texts("common message")
    hold = threading.Event()
    in_flight = threading.Event()
    original = backend.score

    async def gated(question):
        import asyncio

        in_flight.set()
        while not hold.is_set():
            await asyncio.sleep(0.01)
        return await original(question)

    backend.score = gated
    service.submit(_texts("warm-up message"), {})
    assert in_flight.wait(30)  # the warm-up question holds the slot, the loop waits on it
    service.submit(rare, dict.fromkeys(rare, 1))
    service.submit(common, dict.fromkeys(common, 50))
    hold.set()
    assert service.wait_idle(30)
    assert backend.asked[0] == "warm-up message"
    assert backend.asked[1] == "common message"
    service.close()


def test_sentences_labelled_separately_and_combined_with_max(tmp_path):
    backend = CountingRulesBackend(RULES)
    service = AnnotationService(_cfg(), tmp_path / "l.sqlite", backend=backend)
    two = "You see here a dagger.  You kill the newt!"
    service.submit(_texts(two, "You kill the newt!"), {})
    assert service.wait_idle(30)
    assert sorted(backend.asked) == ["You kill the newt!", "You see here a dagger."]
    labels = {cid: (label, p) for cid, label, p in service.poll_labels()}
    assert labels[caption_id(two)] == (1, 1.0)
    service.close()


def test_backend_down_then_up_loses_nothing(tmp_path):
    backend = FaultInjectingBackend(RULES, failures=6)
    service = AnnotationService(_cfg(concurrency=2), tmp_path / "l.sqlite", backend=backend)
    texts = _texts("You kill the newt!", "It's a wall.", "Welcome to experience level 2.")
    service.submit(texts, {})
    assert service.wait_idle(60)
    m = service.metrics()
    assert m["annotator_backend_errors"] == 6 and m["labels_total"] == 3
    assert {cid for cid, _, _ in service.poll_labels()} == set(texts)
    service.close()


def test_unparseable_answers_become_unlabelable_never_labels(tmp_path):
    store = tmp_path / "l.sqlite"
    backend = FaultInjectingBackend(RULES, garbage=True)
    service = AnnotationService(_cfg(max_parse_retries=2), store, backend=backend)
    service.submit(_texts("You kill the newt!"), {})
    assert service.wait_idle(30)
    assert backend.calls == 3  # first try + 2 retries
    assert service.poll_labels() == []
    m = service.metrics()
    assert (
        m["annotator_parse_failures"] == 3
        and m["unlabelable_total"] == 1
        and m["labels_total"] == 0
    )
    version = service.version
    service.close()
    with AnnotationStore(store) as s:
        (record,) = s.get_labels(version).values()
    assert record.status == UNLABELABLE and record.label is None and record.attempts == 3


def test_ranking_asks_distinct_pairs(tmp_path):
    store = tmp_path / "l.sqlite"
    service = AnnotationService(_cfg(prompt="ranking"), store)
    texts = _texts(
        "You kill the newt!", "It's a wall.", "You hear a door open.", "$ - 5 gold pieces."
    )
    service.submit(texts, dict.fromkeys(texts, 3))
    assert service.wait_idle(30)
    version = service.version
    service.close()
    with AnnotationStore(store) as s:
        prefs = s.get_preferences(version)
    assert prefs and all(p.caption_a != p.caption_b for p in prefs)
    assert len({(p.caption_a, p.caption_b) for p in prefs}) == len(prefs)
    kill, wall = caption_id("You kill the newt!"), caption_id("It's a wall.")
    for p in prefs:
        assert p.status == LABELLED
        if (p.caption_a, p.caption_b) == (kill, wall):
            assert p.preference == 1.0


def test_version_changes_with_what_is_asked(tmp_path):
    a = AnnotationService(_cfg(), tmp_path / "a.sqlite")
    b = AnnotationService(_cfg(split_sentences=False), tmp_path / "b.sqlite")
    c = AnnotationService(_cfg(goal="gold"), tmp_path / "c.sqlite")
    assert len({a.version, b.version, c.version}) == 3
    for s in (a, b, c):
        s.close()


@pytest.mark.slow
def test_openai_backend_against_llamacpp_server(tmp_path, llamacpp_server):
    from oni_sys.annotators.embedded_model import EMBEDDED_MODEL_ID

    cfg = _cfg(backend="openai", base_url=llamacpp_server.base_url, model=EMBEDDED_MODEL_ID)
    store = tmp_path / "l.sqlite"
    service = AnnotationService(cfg, store)
    captions = [
        "You kill the newt!",
        "It's a wall.",
        "You find a hidden passage.",
        "The door opens.",
    ]
    texts = _texts(*captions)
    service.submit(texts, {})
    peak = 0
    while not service.wait_idle(0.05):
        peak = max(peak, service.metrics()["annotator_in_flight"])
    assert peak > 1, "several requests should be in flight at once"
    m = service.metrics()
    assert m["labels_total"] == 4 and m["annotator_requests_total"] == 4
    service.submit(texts, dict.fromkeys(texts, 2))  # submitted again: no new requests
    assert service.wait_idle(10)
    assert service.metrics()["annotator_requests_total"] == 4
    service.close()


@pytest.mark.slow
def test_llm_server_killed_and_restarted(tmp_path, llamacpp_server):
    from oni_sys.annotators.embedded_model import EMBEDDED_MODEL_ID

    cfg = _cfg(
        backend="openai", base_url=llamacpp_server.base_url, model=EMBEDDED_MODEL_ID, timeout_s=20
    )
    store = tmp_path / "l.sqlite"
    service = AnnotationService(cfg, store)
    captions = [f"You see here {n} arrows." for n in range(2, 10)]
    texts = _texts(*captions)
    service.submit(texts, {})
    deadline = time.monotonic() + 60
    while service.metrics()["labels_total"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    labelled_before = service.metrics()["labels_total"]
    assert labelled_before >= 2
    llamacpp_server.kill()
    time.sleep(3)
    with AnnotationStore(store) as s:
        stored_before = s.get_labels(service.version)
    llamacpp_server.start()
    assert service.wait_idle(180)
    m = service.metrics()
    assert m["labels_total"] == len(captions)
    # The outage was real and was absorbed by retries (in the client or the service).
    assert service.backend.stats()["failures_total"] + m["annotator_backend_errors"] >= 1
    version = service.version
    service.close()
    with AnnotationStore(store) as s:
        after = s.get_labels(version)
    assert set(after) >= set(stored_before) and set(after) >= set(texts)
    assert all(after[cid].status == LABELLED for cid in texts)


def test_ranking_compares_each_new_caption_even_when_it_is_rare(tmp_path):
    """The rare caption that carries the signal (a kill among walls and sounds) must be compared:
    each new caption's comparisons are against it, not two captions drawn by frequency."""
    from oni_sys.annotators.pair_queue import PAIRS_PER_CAPTION

    store = tmp_path / "l.sqlite"
    service = AnnotationService(_cfg(prompt="ranking"), store)
    common = _texts(*(f"You hear noise number {i}." for i in range(12)), "It's a wall.")
    service.submit(common, dict.fromkeys(common, 1000))
    assert service.wait_idle(30)
    kill = caption_id("You kill the newt!")
    service.submit({kill: "You kill the newt!"}, {kill: 1})
    assert service.wait_idle(30)
    version = service.version
    service.close()
    with AnnotationStore(store) as s:
        prefs = s.get_preferences(version)
    unordered = [frozenset((p.caption_a, p.caption_b)) for p in prefs]
    assert len(set(unordered)) == len(prefs)  # no pair asked twice, in either order
    with_kill = [p for p in prefs if kill in (p.caption_a, p.caption_b)]
    assert len(with_kill) == PAIRS_PER_CAPTION
    for p in with_kill:  # the rules prefer the kill to every common caption
        assert p.preference == (1.0 if p.caption_a == kill else 0.0)
