"""The annotation service: asks the LLM about each caption once, keeps it busy, never blocks.

:class:`AnnotationService` turns captions into questions, queues them
(:mod:`~oni_sys.annotators.label_queue`, :mod:`~oni_sys.annotators.pair_queue`), asks them on its
own asyncio loop in a background thread, writes the answers to the store in batches and publishes
caption labels. How it schedules, gates and rides out outages: docs/ANNOTATOR.md, "The service"
and "When the LLM fails: the policy".
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oni_sys.annotators.annotation_store import (
    LABELLED,
    UNLABELABLE,
    AnnotationStore,
    StoredLabel,
    StoredPreference,
)
from oni_sys.annotators.availability import Availability
from oni_sys.annotators.backend_factory import make_backend
from oni_sys.annotators.base import (
    Backend,
    BackendError,
    FatalBackendError,
    Question,
    UnparseableAnswer,
)
from oni_sys.annotators.label_queue import LabelQueue, Published
from oni_sys.annotators.pair_queue import PAIRS_PER_CAPTION, PairQueue
from oni_sys.annotators.preflight import (
    AnnotatorUnavailable,
    ProbeResult,
    describe_backend,
    probe_backend,
)
from oni_sys.annotators.prompts import build_classification, build_ranking, prompt_version
from oni_sys.annotators.questions import plan_questions, question_texts
from oni_sys.annotators.service_metrics import ServiceStats
from oni_sys.config import AnnotatorConfig
from oni_sys.contracts import LabelRecord, PreferenceRecord

if TYPE_CHECKING:
    from oni_sys.annotators.vllm_backend import VLLMServer

logger = logging.getLogger(__name__)

# make_backend, question_texts, PAIRS_PER_CAPTION and ServiceStats lived here before the split;
# they stay importable from here.
__all__ = [
    "HEALTH_INTERVAL_S",
    "LABEL_RULE_VERSION",
    "PAIRS_PER_CAPTION",
    "AnnotationService",
    "ServiceStats",
    "make_backend",
    "question_texts",
]

#: bumped when the way an answer's probability becomes a label changes (part of the annotator
#: version); the prompt's own format version is prompts.PROMPT_FORMAT_VERSION
LABEL_RULE_VERSION = "choice-logprob-v1"
#: seconds between availability checks while no question is in flight
HEALTH_INTERVAL_S = 5.0
#: seconds between batched writes to the store (and outage checks)
FLUSH_INTERVAL_S = 0.25


class AnnotationService:
    """Labels captions through an LLM backend into an :class:`AnnotationStore`.

    Every public method is thread-safe and returns at once, except :meth:`answer_all` and
    :meth:`wait_idle`, which wait. The object cannot be pickled (it holds a thread and a
    database): build it where it runs, e.g. inside a Ray actor.

    Args:
        cfg: the ``annotator`` config section.
        store_path: the SQLite store (``annotator.store`` or ``<run dir>/labels.sqlite``).
        backend: an already built backend (default: :func:`make_backend`).
        max_pending: questions queued in memory at most (default ``annotator.max_queue``); the
            least seen beyond it are dropped and counted, and asked again when seen again (their
            texts stay in the store).
        gated: ask nothing until :meth:`answer_all` (the serial runtime, for determinism);
            default: ask as soon as questions are submitted (the Ray runtime, the CLI).
        vllm_server: when the service builds a vllm backend, the running server it uses
            (see :func:`make_backend`).

    Example::

        service = AnnotationService(cfg.annotator, "runs/labels.sqlite")
        service.preflight()  # AnnotatorUnavailable when the LLM cannot answer
        service.submit({caption_id("You kill the newt!"): "You kill the newt!"}, {})
        service.wait_idle(60)
        labels = service.poll_labels()  # [(caption id, 1, 0.97)]
        service.close()
    """

    def __init__(
        self,
        cfg: AnnotatorConfig,
        store_path: str | Path,
        backend: Backend | None = None,
        max_pending: int | None = None,
        gated: bool = False,
        vllm_server: VLLMServer | None = None,
    ):
        self.cfg = cfg
        self.store = AnnotationStore(store_path)
        self.backend = backend if backend is not None else make_backend(cfg, vllm_server)
        self.max_pending = cfg.max_queue if max_pending is None else max_pending
        # What is asked (sentences, number templates) and how a probability becomes a label
        # (threshold) change stored labels too, so they are part of the version.
        asked = (
            f"split={int(cfg.split_sentences)},numbers={int(cfg.number_template)},"
            f"t={cfg.threshold:g}"
        )
        self.version = f"{self.backend.model_id}|{prompt_version(cfg)}|{LABEL_RULE_VERSION}|{asked}"
        self.ranking = cfg.prompt == "ranking"
        self.stats = ServiceStats()
        self._restarts_before = 0  # LLM process restarts of earlier sessions (resume)
        self._lock = threading.Lock()  # guards the queues and everything published or pending
        # Signalled (under _lock) whenever a question or a pair is answered: answer_all waits on it.
        self._answered = threading.Condition(self._lock)
        self._answers_total = 0  # questions and pairs answered (labelled or not)
        self._gated = gated
        self._gate_open = not gated  # a gated service asks only while answer_all holds it open
        # One seeded generator for the pairs drawn and the retry jitter: a gated ranking run
        # asks the same pairs every time, as long as no retry's jitter shifts the draws.
        self._rng = random.Random(0)
        self._labels = LabelQueue(self.max_pending, cfg.threshold, self.stats)
        self._pairs = PairQueue(self._rng)
        self._published: list[Published] = []
        self._published_prefs: list[PreferenceRecord] = []
        # Answers not yet committed to the store, by id: until the flush commits them they are
        # the only record that the question was answered, so submit() consults them too.
        self._pending_writes: dict[int, StoredLabel] = {}
        # Serialises submit() against the flush, so an answer is always visible in the store
        # or in _pending_writes to a concurrent submit, never in neither.
        self._submit_lock = threading.Lock()
        self._pending_prefs: list[StoredPreference] = []
        self._availability = Availability(cfg)
        self._loop = asyncio.new_event_loop()
        self._wakeup: asyncio.Event | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run_loop, name="annotator", daemon=True)
        self._thread.start()
        logger.info("annotator version %s, store %s", self.version, store_path)

    # -- public API (thread-safe, non-blocking) ------------------------------------------------
    def submit(self, texts: dict[int, str], counts: dict[int, int] | None = None) -> None:
        """Queue captions (id -> text) and record sightings (id -> times seen since last call).

        Ids already answered, queued or in flight cost nothing; counts of already queued
        questions raise their priority.
        """
        counts = counts or {}
        if counts and self._labels.dropped and not self.ranking:
            with self._lock:
                back = self._labels.take_dropped(counts, texts)
            if back:  # dropped from the queue earlier and seen again: ask about it now
                texts = {**self.store.texts(back), **texts}
        with self._submit_lock:
            if texts:
                self.store.add_captions({int(k): v for k, v in texts.items()})
            if counts:
                self.store.record_seen({int(k): int(v) for k, v in counts.items()})
            if self.ranking:
                with self._lock:
                    self._pairs.add(texts, counts)
            else:
                self._submit_labels(texts, counts)
        self._wake()

    def poll_labels(self, limit: int | None = None) -> list[tuple[int, int, float]]:
        """Caption labels published since the last poll: ``(caption id, label, probability)``."""
        with self._lock:
            if limit is None or limit >= len(self._published):
                out, self._published = self._published, []
            else:
                out, self._published = self._published[:limit], self._published[limit:]
        return out

    def poll_records(self) -> tuple[list[LabelRecord], list[PreferenceRecord]]:
        """Labels and preferences published since the last poll, with their texts (for the
        reward learner)."""
        labels = self.poll_labels()
        texts = self.store.texts([cid for cid, _, _ in labels]) if labels else {}
        with self._lock:
            prefs, self._published_prefs = self._published_prefs, []
        return [LabelRecord(cid, texts.get(cid, ""), label, p) for cid, label, p in labels], prefs

    def metrics(self) -> dict[str, float]:
        """Queue depth, in flight, labels/s, latency p50/p95, store hit rate, failures."""
        with self._lock:
            timings = self.stats.timings()
            queue = self._labels.queued + self._pairs.owed
            in_flight = len(self._labels.in_flight) + self._pairs.in_flight
        return self.stats.row(
            timings,
            queue=queue,
            in_flight=in_flight,
            up=self._availability.up,
            outage_s=self.outage_seconds(),
            restarts=self.restarts(),
        )

    def restarts(self) -> int:
        """Restarts of the LLM's process (the llama.cpp child), over the run; the Ray driver
        adds the annotator actor's own restarts."""
        return int(getattr(self.backend, "restarts", 0)) + self._restarts_before

    def state_dict(self) -> dict[str, Any]:
        """The cumulative counters, for the run's checkpoint (what is labelled is in the
        store)."""
        with self._lock:
            stats = self.stats.state_dict()
        return {"stats": stats, "restarts": self.restarts()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the counters of :meth:`state_dict` (a resumed run): they are added to
        this service's own; missing keys count as 0."""
        with self._lock:
            self.stats.load_state_dict(state.get("stats") or {})
            self._restarts_before += int(state.get("restarts", 0) or 0)

    def outage_seconds(self) -> float:
        """How long the annotator has been unable to answer (0 while it answers)."""
        return self._availability.outage_seconds()

    def failure(self) -> str | None:
        """Why the annotator can no longer serve the run (one sentence), or None."""
        return self._availability.failure

    def preflight(self, timeout_s: float | None = None) -> ProbeResult:
        """Ask one real question before anything depends on the answers.

        Raises:
            AnnotatorUnavailable: the backend cannot answer (one sentence: what failed, the
                backend, its URL or model, and where to look).
        """
        timeout = self.cfg.startup_timeout_s if timeout_s is None else timeout_s
        future = asyncio.run_coroutine_threadsafe(
            probe_backend(self.backend, self.cfg, timeout), self._loop
        )
        result = future.result()
        if not result.ok:
            raise AnnotatorUnavailable(result.sentence(self.cfg))
        info = getattr(self.backend, "system_info", None)
        if info:
            from oni_sys.annotators.llamacpp_build import judge

            verdict = judge(info)
            logger.log(
                logging.INFO if verdict.portable else logging.WARNING,
                "llama.cpp: %s (%s)",
                verdict.sentence(),
                info.strip(),
            )
        logger.info("%s", result.sentence(self.cfg))
        return result

    def idle(self) -> bool:
        """True when nothing is queued, in flight or waiting to be written."""
        with self._lock:
            return not (
                self._labels.texts
                or self._pending_writes
                or self._pending_prefs
                or self._pairs.in_flight
                or self._pairs.owed
            )

    def _owed(self) -> int:
        """Questions and comparisons queued or in flight. Lock held."""
        return len(self._labels.texts) + self._pairs.owed + self._pairs.in_flight

    def answer_all(self, stall_timeout_s: float | None = None) -> bool:
        """Ask every question submitted so far and wait until each is answered; then
        :meth:`poll_records` holds the answers to everything submitted before this call.

        This is the serial runtime's fixed point (after every policy update). It never hangs: it
        returns False at once while the annotator is down or has failed (the outage shows in
        :meth:`metrics` and :meth:`failure` as always), and after ``stall_timeout_s`` (default
        ``annotator.startup_timeout_s``) without a single answer. The questions still open are
        then asked in the background, as by an ungated service, until a later call sees all of
        them answered. Returns True when nothing is owed any more.
        """
        stall = self.cfg.startup_timeout_s if stall_timeout_s is None else stall_timeout_s
        with self._answered:
            self._gate_open = True
        self._wake()
        with self._answered:
            seen, since = self._answers_total, time.monotonic()
            while self._owed():
                if not self._availability.up:
                    return False
                now = time.monotonic()
                if self._answers_total != seen:
                    seen, since = self._answers_total, now
                elif now - since > stall:
                    logger.warning(
                        "annotator (%s): no answer for %.0f s while waiting for %d questions; "
                        "going on without waiting for them",
                        describe_backend(self.cfg),
                        now - since,
                        self._owed(),
                    )
                    return False
                self._answered.wait(timeout=0.05)
            # Everything is answered: a gated service asks nothing more until the next call.
            self._gate_open = not self._gated
            return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until :meth:`idle` (or the timeout); returns whether it is idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.idle():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stored_records(self) -> tuple[list[LabelRecord], list[PreferenceRecord]]:
        """Every stored label and preference of this version, in :meth:`poll_records`' shape
        (for a reward learner that restarted and lost what it had been sent)."""
        labels = [r for r in self.store.get_labels(self.version).values() if r.status == LABELLED]
        prefs = [r for r in self.store.get_preferences(self.version) if r.status == LABELLED]
        ids = {r.caption_id for r in labels}
        ids.update(i for r in prefs for i in (r.caption_a, r.caption_b))
        texts = self.store.texts(ids) if ids else {}
        return (
            [
                LabelRecord(r.caption_id, texts.get(r.caption_id, ""), r.label, r.probability)
                for r in labels
            ],
            [
                PreferenceRecord(
                    r.caption_a,
                    texts.get(r.caption_a, ""),
                    r.caption_b,
                    texts.get(r.caption_b, ""),
                    r.preference,
                )
                for r in prefs
            ],
        )

    def republish_stored(self) -> int:
        """Publish every stored label of this version again (a restarted service: what the old
        process answered but had not yet handed out); returns how many."""
        labels, prefs = self.stored_records()
        with self._lock:
            self._published.extend((cid, label, p) for cid, _, label, p in labels)
            self._published_prefs.extend(prefs)
        return len(labels) + len(prefs)

    def requeue_missing(self) -> int:
        """Queue every stored caption without an answer for this version (after a restart or
        a resume), most seen first; returns how many.

        For ranking, the stored captions form the pool again and the pairs already answered
        are not asked again; captions are not owed new comparisons.
        """
        if self.ranking:
            seen = self.store.unanswered(self.version)  # ranking stores no labels: every caption
            answered = [
                (r.caption_a, r.caption_b) for r in self.store.get_preferences(self.version)
            ]
            with self._lock:
                self._pairs.restore({cid: times for cid, (_, times) in seen.items()}, answered)
            return 0
        owed = self.store.unanswered(self.version, limit=self.max_pending)
        self.submit({cid: text for cid, (text, _) in owed.items()}, {})
        with self._lock:
            for cid, (_, seen) in owed.items():
                self._labels.bump_queued(cid, seen)
        return len(owed)

    def close(self) -> None:
        """Stop the loop, write what is answered, close the backend and the store."""
        if self._stopping:
            return
        self._stopping = True
        self._wake()
        self._thread.join(timeout=30)
        self.store.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("AnnotationService holds a thread and a database; run it inside an actor")

    # -- queueing ------------------------------------------------------------------------------
    def _submit_labels(self, texts: dict[int, str], counts: dict[int, int]) -> None:
        plans, questions = plan_questions(texts, self.cfg)
        if questions:
            self.store.add_captions(questions)
        known = self.store.get_labels(self.version, [*questions, *plans]) if plans else {}
        with self._lock:
            for key in [*questions, *plans]:
                if key in self._pending_writes:
                    known[key] = self._pending_writes[key]
            published, writes = self._labels.add(plans, questions, known, counts)
            self._pending_writes.update(writes)
            self._published.extend(published)

    # -- the loop ------------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._wakeup is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._wakeup = asyncio.Event()
        tasks: set[asyncio.Task] = set()
        health: asyncio.Task | None = None
        last_flush = last_health = time.monotonic()
        while not self._stopping:
            while len(tasks) < self.cfg.concurrency:
                job = self._next_job()
                if job is None:
                    break
                task = asyncio.create_task(job)
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                # A finished question frees a slot: start the next one now, not after the wait.
                task.add_done_callback(lambda _: self._wakeup.set())
            if time.monotonic() - last_flush > FLUSH_INTERVAL_S:
                self._flush()
                last_flush = time.monotonic()
                self._availability.check_outage()
            idle = not tasks and (health is None or health.done())
            if idle and time.monotonic() - last_health > HEALTH_INTERVAL_S:
                # Only while nothing is in flight, so an idle annotator's outage shows too.
                last_health = time.monotonic()
                health = asyncio.create_task(
                    self._availability.check_health(self.backend, HEALTH_INTERVAL_S * 2)
                )
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=0.05)
            except asyncio.TimeoutError:
                pass
        if health is not None:
            tasks.add(health)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._flush()
        try:
            await self.backend.close()
        except Exception:  # noqa: BLE001 (closing must not hide the real shutdown)
            logger.exception("closing the annotator backend failed")

    def _next_job(self) -> Coroutine[Any, Any, None] | None:
        """The next question or comparison to ask, now in flight; None when there is none."""
        if self._availability.failure is not None:
            return None  # the run is stopping; what is queued stays in the store
        if not self._gate_open:
            return None  # gated: asked at the next answer_all
        if self.ranking:
            with self._lock:
                pair = self._pairs.next_pair()
            return None if pair is None else self._ask_pair(*pair)
        with self._lock:
            item = self._labels.pop()
        return None if item is None else self._ask_label(*item)

    async def _score(self, question: Question) -> tuple[list[float] | None, int, str | None]:
        """Ask until the answer parses (bounded): (probabilities or None, attempts, error)."""
        attempts, error = 0, None
        while True:
            attempts += 1
            start = time.perf_counter()
            self.stats.requests_total += 1
            try:
                scores = await self.backend.score(question)
                self._availability.mark_up()
                probs = scores.probabilities()
                with self._lock:
                    self.stats.latencies.append(time.perf_counter() - start)
                return probs, attempts, None
            except FatalBackendError as exc:
                # No retry can fix it (a refused request, a model not served, a model that
                # keeps crashing): the run must stop rather than train without labels.
                self._availability.fail_fatal(exc)
                raise asyncio.CancelledError from None
            except UnparseableAnswer as exc:
                self.stats.parse_failures += 1
                error = str(exc)
                if attempts > self.cfg.max_parse_retries:
                    return None, attempts, error
            except BackendError as exc:
                # The LLM is down or misbehaving: the backend already retried; wait and ask
                # again rather than record a non-answer. Nothing is lost while it is away.
                self.stats.backend_errors += 1
                self._availability.mark_down(str(exc))
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(attempts, 6)) * self._rng.random())
                if self._stopping:
                    raise asyncio.CancelledError from None

    async def _ask_label(self, qid: int, text: str) -> None:
        try:
            probs, attempts, error = await self._score(build_classification(text, self.cfg))
        except asyncio.CancelledError:
            with self._lock:
                self._labels.cancel(qid)
            raise
        if probs is None:
            record = StoredLabel(qid, None, None, UNLABELABLE, attempts, error)
        else:
            p_yes = probs[0]
            record = StoredLabel(qid, int(p_yes >= self.cfg.threshold), p_yes, LABELLED, attempts)
        with self._lock:
            if record.status == LABELLED:
                self.stats.labels_total += 1
                self.stats.label_times.append(time.perf_counter())
            else:
                self.stats.unlabelable_total += 1
            published, writes = self._labels.answered(qid, record)
            self._pending_writes.update(writes)
            self._published.extend(published)
            self._answers_total += 1
            self._answered.notify_all()

    async def _ask_pair(self, a: int, b: int) -> None:
        texts = self.store.texts([a, b])
        question = build_ranking(texts[a], texts[b], self.cfg)
        try:
            probs, attempts, error = await self._score(question)
        except asyncio.CancelledError:
            with self._lock:
                self._pairs.finished()
            raise
        if probs is None:
            record = StoredPreference(a, b, None, UNLABELABLE, attempts, error)
        else:
            record = StoredPreference(a, b, probs[0], LABELLED, attempts)
        with self._lock:
            self._pairs.finished()
            self._pending_prefs.append(record)
            if record.status == LABELLED:
                self._published_prefs.append(
                    PreferenceRecord(a, texts[a], b, texts[b], record.preference)
                )
            self.stats.preferences_total += record.status == LABELLED
            self._answers_total += 1
            self._answered.notify_all()

    def _flush(self) -> None:
        """Write answered questions to the store in one transaction each kind."""
        with self._submit_lock:
            with self._lock:
                labels = dict(self._pending_writes)
                prefs, self._pending_prefs = self._pending_prefs, []
            try:
                self.store.put_labels(self.version, list(labels.values()))
                self.store.put_preferences(self.version, prefs)
            except Exception:
                logger.exception("writing %d labels to the store failed; will retry", len(labels))
                with self._lock:
                    self._pending_prefs[:0] = prefs
                return
            with self._lock:
                for key, record in labels.items():
                    if self._pending_writes.get(key) is record:
                        del self._pending_writes[key]
