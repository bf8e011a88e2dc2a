"""The annotation service's failure policy: outages are visible and bounded, errors no retry can
fix stop it, its queue is bounded, and nothing it drops is lost for good.

The backends here inject faults a real LLM will not produce on demand; they say so in their
names. The store is a real SQLite file.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from oni_sys.annotators.annotation_store import LABELLED, AnnotationStore
from oni_sys.annotators.base import BackendError, ChoiceScores, FatalBackendError, Question
from oni_sys.annotators.preflight import AnnotatorUnavailable
from oni_sys.annotators.rules_backend import RulesBackend
from oni_sys.annotators.service import AnnotationService
from oni_sys.config import AnnotatorConfig
from oni_sys.envs.captions import caption_id

RULES = [{"pattern": "(?i)kill|gold|level", "label": 1}]


def _cfg(**kw) -> AnnotatorConfig:
    return AnnotatorConfig(**{"backend": "rules", "rules": RULES, "concurrency": 2, **kw})


def _texts(*captions: str) -> dict[int, str]:
    return {caption_id(c): c for c in captions}


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class SwitchableOutageBackend(RulesBackend):
    """FAULT INJECTION: the rules backend behind a switch; while ``down`` is set every question
    and health check fails with BackendError, as an LLM server that went away would."""

    def __init__(self, rules):
        super().__init__(rules)
        self.down = threading.Event()

    async def score(self, question: Question) -> ChoiceScores:
        if self.down.is_set():
            raise BackendError("injected: connection refused")
        return await super().score(question)

    async def health(self) -> None:
        if self.down.is_set():
            raise BackendError("injected: connection refused")


class RefusingBackend(RulesBackend):
    """FAULT INJECTION: answers ``answers`` questions, then refuses every request the way a
    server answering HTTP 401 does (no retry can fix it)."""

    def __init__(self, rules, answers: int = 0):
        super().__init__(rules)
        self.answers = answers

    async def score(self, question: Question) -> ChoiceScores:
        if self.answers <= 0:
            raise FatalBackendError("POST /v1/completions was refused: HTTP 401: invalid api key")
        self.answers -= 1
        return await super().score(question)


class StalledBackend(RulesBackend):
    """FAULT INJECTION: the rules backend that holds every answer until ``release`` is set."""

    def __init__(self, rules):
        super().__init__(rules)
        self.release = threading.Event()

    async def score(self, question: Question) -> ChoiceScores:
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        return await super().score(question)


def test_an_outage_is_visible_logged_once_each_way_and_loses_nothing(tmp_path, caplog):
    backend = SwitchableOutageBackend(RULES)
    service = AnnotationService(_cfg(), tmp_path / "l.sqlite", backend=backend)
    service.preflight(10)
    assert service.metrics()["annotator_up"] == 1.0
    caplog.set_level(logging.INFO, logger="oni_sys.annotators")
    caplog.clear()
    backend.down.set()
    texts = _texts(*(f"You kill the newt number {i}!" for i in range(6)))
    service.submit(texts, {})
    assert _wait(lambda: service.metrics()["annotator_up"] == 0.0)
    time.sleep(2.0)  # questions keep failing and being retried meanwhile
    m = service.metrics()
    assert m["annotator_up"] == 0.0 and m["annotator_outage_s"] >= 1.5
    assert m["labels_total"] == 0 and m["annotator_backend_errors"] >= 2
    backend.down.clear()
    assert service.wait_idle(60)
    m = service.metrics()
    assert m["annotator_up"] == 1.0 and m["annotator_outage_s"] == 0.0
    assert m["labels_total"] == len(texts)
    assert service.failure() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings  # one when it went down, one when it came back
    assert "annotator down" in warnings[0] and "up again" in warnings[1]
    version = service.version
    service.close()
    with AnnotationStore(tmp_path / "l.sqlite") as store:
        labels = store.get_labels(version, list(texts))
    assert {cid for cid, r in labels.items() if r.status == LABELLED} == set(texts)


def test_an_idle_annotator_whose_llm_is_down_shows_it(tmp_path, monkeypatch):
    import oni_sys.annotators.service as service_module

    monkeypatch.setattr(service_module, "HEALTH_INTERVAL_S", 0.2)
    backend = SwitchableOutageBackend(RULES)
    service = AnnotationService(_cfg(), tmp_path / "l.sqlite", backend=backend)
    backend.down.set()  # nothing to ask: only the health check can notice
    assert _wait(lambda: service.metrics()["annotator_up"] == 0.0, 10)
    backend.down.clear()
    assert _wait(lambda: service.metrics()["annotator_up"] == 1.0, 10)
    service.close()


def test_an_outage_longer_than_max_outage_s_fails_the_service(tmp_path):
    backend = SwitchableOutageBackend(RULES)
    service = AnnotationService(_cfg(max_outage_s=1.0), tmp_path / "l.sqlite", backend=backend)
    backend.down.set()
    service.submit(_texts("You kill the newt!"), {})
    assert _wait(lambda: service.failure() is not None, 20)
    failure = service.failure()
    assert "annotator.max_outage_s=1" in failure and "connection refused" in failure
    assert "docs/ANNOTATOR.md" in failure and "\n" not in failure
    service.close()


def test_an_error_no_retry_fixes_fails_the_service_at_once(tmp_path):
    backend = RefusingBackend(RULES, answers=1)
    service = AnnotationService(_cfg(), tmp_path / "l.sqlite", backend=backend)
    service.preflight(10)  # the first question is answered
    start = time.monotonic()
    service.submit(_texts("You kill the newt!", "It's a wall."), {})
    assert _wait(lambda: service.failure() is not None, 10)
    assert time.monotonic() - start < 5  # not after retries and backoff
    assert "HTTP 401: invalid api key" in service.failure()
    assert service.metrics()["labels_total"] == 0  # a refusal is never a label
    service.close()


def test_preflight_refused_is_one_sentence(tmp_path):
    service = AnnotationService(_cfg(), tmp_path / "l.sqlite", backend=RefusingBackend(RULES))
    with pytest.raises(AnnotatorUnavailable) as err:
        service.preflight(10)
    message = str(err.value)
    assert message.startswith("the annotator cannot answer a question (backend rules)")
    assert "HTTP 401" in message and "docs/ANNOTATOR.md" in message and "\n" not in message
    service.close()


def test_the_queue_is_bounded_and_dropped_captions_come_back_when_seen_again(tmp_path):
    backend = StalledBackend(RULES)
    cfg = _cfg(concurrency=1, max_queue=3)
    service = AnnotationService(cfg, tmp_path / "l.sqlite", backend=backend)
    captions = [f"You kill the newt number {i}!" for i in range(10)]
    texts = _texts(*captions)
    ids = list(texts)
    service.submit({ids[0]: captions[0]}, {ids[0]: 100})
    assert _wait(lambda: service.metrics()["annotator_in_flight"] == 1)
    # nine more, seen 1..9 times: the three seen most stay queued, six are dropped
    service.submit({i: texts[i] for i in ids[1:]}, {i: n for n, i in enumerate(ids[1:], 1)})
    m = service.metrics()
    assert m["annotator_queue"] == 3 and m["annotator_dropped"] == 6
    backend.release.set()
    assert service.wait_idle(30)
    labelled = {cid for cid, _, _ in service.poll_labels()}
    assert labelled == {ids[0], *ids[7:]}  # the in-flight one and the three seen most
    # the dropped ones are seen again (runners send only sightings once a text was sent)
    service.submit({}, {i: 1 for i in ids[1:7]})
    assert service.wait_idle(30)
    labelled |= {cid for cid, _, _ in service.poll_labels()}
    # the queue is still bounded: three of the six fit, three are dropped again...
    assert len(labelled) == 7 and service.metrics()["annotator_dropped"] == 9
    # ...and come back at their next sighting
    service.submit({}, {i: 1 for i in set(ids) - labelled})
    assert service.wait_idle(30)
    labelled |= {cid for cid, _, _ in service.poll_labels()}
    assert labelled == set(ids)
    service.close()


def test_a_restarted_service_asks_again_what_was_submitted_but_not_answered(tmp_path):
    store = tmp_path / "l.sqlite"
    backend = StalledBackend(RULES)
    first = AnnotationService(_cfg(), store, backend=backend)
    texts = _texts("You kill the newt!", "It's a wall.", "Welcome to experience level 2.")
    first.submit(texts, {})
    first.close()  # dies with every question unanswered (the stalled backend never answered)
    second = AnnotationService(_cfg(), store)
    assert second.requeue_missing() == len(texts)
    assert second.wait_idle(30)
    assert {cid for cid, _, _ in second.poll_labels()} == set(texts)
    labels, _ = second.stored_records()
    assert {cid for cid, _, _, _ in labels} == set(texts)
    second.close()
