"""The annotation service: asks the LLM about each caption once, keeps it busy, never blocks.

Env runners (through the runtime) hand it caption texts and how often each was seen. It
normalises them into *questions* (a caption may split into sentences, numbers may collapse into
a template), skips every question the store already answers for this annotator version or that
is queued or in flight, and keeps ``annotator.concurrency`` questions in flight, the most
frequently seen first. Answers go to the SQLite store in batched transactions and to
subscribers as caption labels (a caption's label is the max over its sentences).

The service runs its own asyncio loop in a background thread, so the same object serves the
serial runtime (in process) and the Ray runtime (inside an actor). Every public method is
thread-safe and returns at once, except :meth:`answer_all` (and :meth:`wait_idle`), which wait.

A *gated* service (the serial runtime's) asks nothing until :meth:`answer_all` opens the gate;
that call then waits until everything submitted so far is answered. Questions are thus asked
at fixed points, all at once, so what is asked (the ranking pairs too) and what is published
do not depend on how fast the LLM answers.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oni_sys.annotators.annotation_store import (
    LABELLED,
    UNLABELABLE,
    AnnotationStore,
    StoredLabel,
    StoredPreference,
)
from oni_sys.annotators.base import (
    Backend,
    BackendError,
    FatalBackendError,
    Question,
    UnparseableAnswer,
)
from oni_sys.annotators.normalise import caption_parts
from oni_sys.annotators.preflight import (
    TROUBLESHOOTING,
    AnnotatorUnavailable,
    ProbeResult,
    describe_backend,
    probe_backend,
)
from oni_sys.annotators.prompts import build_classification, build_ranking, prompt_version
from oni_sys.config import AnnotatorConfig
from oni_sys.contracts import LabelRecord, PreferenceRecord
from oni_sys.envs.captions import caption_id, normalise_caption

if TYPE_CHECKING:
    from oni_sys.annotators.vllm_backend import VLLMServer

logger = logging.getLogger(__name__)

#: bumped when the way an answer's probability becomes a label changes (part of the annotator
#: version); the prompt's own format version is prompts.PROMPT_FORMAT_VERSION
LABEL_RULE_VERSION = "choice-logprob-v1"
#: ranking: comparisons asked for each new caption, each of them against that caption
PAIRS_PER_CAPTION = 4
#: seconds between availability checks while no question is in flight
HEALTH_INTERVAL_S = 5.0


def make_backend(cfg: AnnotatorConfig, vllm_server: VLLMServer | None = None) -> Backend:
    """The backend named by ``annotator.backend``.

    ``vllm_server``: for the vllm backend, a running server to use (and stop on close), such as
    the Ray runtime's GPU-placed one; default: the backend starts ``vllm serve`` here.
    """
    if vllm_server is not None and cfg.backend != "vllm":
        raise ValueError(f"a vllm server was given for annotator.backend={cfg.backend}")
    if cfg.backend == "llamacpp":
        from oni_sys.annotators.llamacpp_backend import LlamaCppBackend

        return LlamaCppBackend(
            cfg.model,
            n_ctx=cfg.n_ctx,
            n_threads=cfg.n_threads,
            max_restarts=cfg.max_restarts,
            restart_window_s=cfg.restart_window_s,
        )
    if cfg.backend == "rules":
        from oni_sys.annotators.rules_backend import RulesBackend

        return RulesBackend(cfg.rules)
    if cfg.backend == "openai":
        from oni_sys.annotators.openai_backend import OpenAIBackend

        return OpenAIBackend(
            cfg.base_url,
            cfg.model,
            api_key_env=cfg.api_key_env,
            concurrency=cfg.concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
        )
    from oni_sys.annotators.vllm_backend import VLLMBackend

    return VLLMBackend(
        cfg.model,
        server=vllm_server,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        concurrency=cfg.concurrency,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
    )


def question_texts(text: str, cfg: AnnotatorConfig) -> list[str]:
    """The questions a caption becomes: its sentences (or itself), number-templated if asked."""
    parts = caption_parts(text, split=cfg.split_sentences, template=cfg.number_template)
    return parts or [normalise_caption(text)]


@dataclass
class _Waiting:
    """A caption whose label waits for some of its questions."""

    questions: list[int]
    remaining: set[int]


@dataclass
class ServiceStats:
    """Counters behind :meth:`AnnotationService.metrics`."""

    questions_seen: int = 0
    store_hits: int = 0
    requests_total: int = 0
    labels_total: int = 0
    unlabelable_total: int = 0
    parse_failures: int = 0
    backend_errors: int = 0
    preferences_total: int = 0
    dropped: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=2000))
    label_times: deque = field(default_factory=lambda: deque(maxlen=2000))


class AnnotationService:
    """Labels captions through an LLM backend into an :class:`AnnotationStore`.

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

    Example:
        >>> service = AnnotationService(cfg.annotator, "labels.sqlite")  # doctest: +SKIP
        >>> service.submit({caption_id("You kill the newt!"): "You kill the newt!"})
        >>> service.wait_idle(60); service.poll_labels()
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
        asked = f"split={int(cfg.split_sentences)},numbers={int(cfg.number_template)},t={cfg.threshold:g}"
        self.version = f"{self.backend.model_id}|{prompt_version(cfg)}|{LABEL_RULE_VERSION}|{asked}"
        self.ranking = cfg.prompt == "ranking"
        self.stats = ServiceStats()
        self._lock = threading.Lock()
        # Signalled (under _lock) whenever a question or a pair is answered: answer_all waits on it.
        self._answered = threading.Condition(self._lock)
        self._answers_total = 0  # questions and pairs answered (labelled or not)
        self._gated = gated
        self._gate_open = not gated  # a gated service asks only while answer_all holds it open
        self._texts: dict[int, str] = {}  # question id -> text, while queued or in flight
        self._counts: dict[int, int] = {}  # question id -> times its captions were seen
        self._heap: list[tuple[int, int]] = []  # (-count, question id); stale entries skipped
        self._in_flight: set[int] = set()
        self._waiting: dict[int, _Waiting] = {}  # caption id -> its unanswered questions
        self._question_captions: dict[int, list[int]] = {}  # question id -> waiting captions
        self._answers: dict[int, StoredLabel] = {}  # answers of questions still needed
        self._published: list[tuple[int, int, float]] = []  # (caption id, label, probability)
        self._published_prefs: list[PreferenceRecord] = []
        self._pair_pool: dict[int, int] = {}  # ranking: caption id -> times seen
        # ranking: new captions still owed comparisons, oldest first, and how many each is owed
        self._pair_anchors: deque[list[int]] = deque()
        self._pair_budget = 0  # comparisons owed in total (the ranking queue)
        self._asked_pairs: set[tuple[int, int]] = set()  # unordered: (smaller id, larger id)
        self._pairs_in_flight = 0
        # Answers not yet committed to the store, by id: until the flush commits them they are
        # the only record that the question was answered, so submit() consults them too.
        self._pending_writes: dict[int, StoredLabel] = {}
        # Serialises submit() against the flush, so an answer is always visible in the store
        # or in _pending_writes to a concurrent submit, never in neither.
        self._submit_lock = threading.Lock()
        self._pending_prefs: list[StoredPreference] = []
        self._dropped: set[int] = set()  # caption ids dropped from the queue, owed a question
        self._rng = random.Random(0)
        # Availability: down from a question that failed after the backend's own retries until
        # the next answer; a fatal error (or an outage beyond max_outage_s) is final.
        self._down_since: float | None = None
        self._last_error = ""
        self._failure: str | None = None
        self._health_failures = 0
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
        if counts and self._dropped and not self.ranking:
            with self._lock:
                back = [int(c) for c in counts if int(c) in self._dropped and c not in texts]
                self._dropped.difference_update(back)
            if back:  # dropped from the queue earlier and seen again: ask about it now
                texts = {**self.store.texts(back), **texts}
        with self._submit_lock:
            if texts:
                self.store.add_captions({int(k): v for k, v in texts.items()})
            if counts:
                self.store.record_seen({int(k): int(v) for k, v in counts.items()})
            if self.ranking:
                self._submit_pairs(texts, counts)
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
        s = self.stats
        with self._lock:
            lat = sorted(s.latencies)
            now = time.perf_counter()
            recent = [t for t in s.label_times if now - t < 60.0]
            queue = len(self._texts) - len(self._in_flight) + self._pair_budget
            in_flight = len(self._in_flight) + self._pairs_in_flight
        window = min(60.0, max(now - recent[0], 1e-9)) if recent else 60.0
        return {
            "annotator_queue": queue,
            "annotator_in_flight": in_flight,
            "annotator_requests_total": s.requests_total,
            "labels_total": s.labels_total,
            "preferences_total": s.preferences_total,
            "unlabelable_total": s.unlabelable_total,
            "labels_per_s": len(recent) / window if recent else 0.0,
            "annotator_latency_p50": lat[len(lat) // 2] if lat else float("nan"),
            "annotator_latency_p95": lat[int(len(lat) * 0.95)] if lat else float("nan"),
            "annotator_store_hit_rate": s.store_hits / s.questions_seen
            if s.questions_seen
            else float("nan"),
            "annotator_parse_failures": s.parse_failures,
            "annotator_backend_errors": s.backend_errors,
            "annotator_dropped": s.dropped,
            "annotator_up": 0.0 if self._down_since is not None or self._failure else 1.0,
            "annotator_outage_s": self.outage_seconds(),
            "annotator_restarts": self.restarts(),
        }

    def restarts(self) -> int:
        """Restarts of the LLM's process (the llama.cpp child); the Ray driver adds the
        annotator actor's own restarts."""
        return int(getattr(self.backend, "restarts", 0))

    def outage_seconds(self) -> float:
        """How long the annotator has been unable to answer (0 while it answers)."""
        since = self._down_since
        return 0.0 if since is None else time.monotonic() - since

    def failure(self) -> str | None:
        """Why the annotator can no longer serve the run (one sentence), or None."""
        return self._failure

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

    def _mark_down(self, error: str) -> None:
        self._last_error = error
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning(
                "annotator down (%s): %s; questions wait and are asked again",
                describe_backend(self.cfg),
                error,
            )

    def _mark_up(self) -> None:
        since = self._down_since
        if since is not None:
            self._down_since = None
            logger.warning("annotator up again after %.0f s down", time.monotonic() - since)

    def _fail(self, message: str) -> None:
        if self._failure is None:
            self._failure = message
            logger.error("%s", message)

    def _check_outage(self) -> None:
        outage = self.outage_seconds()
        if outage > self.cfg.max_outage_s and self._failure is None:
            self._fail(
                f"the annotator has not answered for {outage:.0f} s, more than "
                f"annotator.max_outage_s={self.cfg.max_outage_s:g} ({describe_backend(self.cfg)}); "
                f"last error: {self._last_error}; see {TROUBLESHOOTING}"
            )

    def idle(self) -> bool:
        """True when nothing is queued, in flight or waiting to be written."""
        with self._lock:
            return not (
                self._texts
                or self._pending_writes
                or self._pending_prefs
                or self._pairs_in_flight
                or self._pair_budget
            )

    def _owed(self) -> bool:
        """Questions or comparisons queued or in flight. Lock held."""
        return bool(self._texts or self._pair_budget or self._pairs_in_flight)

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
                if self._failure is not None or self._down_since is not None:
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
                        len(self._texts) + self._pair_budget + self._pairs_in_flight,
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
            with self._lock:
                for cid, (_, times) in seen.items():
                    self._pair_pool.setdefault(cid, 0)
                    self._pair_pool[cid] += times
                for r in self.store.get_preferences(self.version):
                    a, b = r.caption_a, r.caption_b
                    self._asked_pairs.add((min(a, b), max(a, b)))
            return 0
        owed = self.store.unanswered(self.version, limit=self.max_pending)
        self.submit({cid: text for cid, (text, _) in owed.items()}, {})
        with self._lock:
            for cid, (_, seen) in owed.items():
                if cid in self._texts:
                    self._bump(cid, seen)
        return len(owed)

    def close(self) -> None:
        """Stop the loop, write what is answered, close the backend and the store."""
        if self._stopping:
            return
        self._stopping = True
        self._wake()
        self._thread.join(timeout=30)
        self.store.close()

    # -- queueing ------------------------------------------------------------------------------
    def _bump(self, qid: int, count: int) -> None:
        self._counts[qid] = self._counts.get(qid, 0) + count
        heapq.heappush(self._heap, (-self._counts[qid], qid))

    def _submit_labels(self, texts: dict[int, str], counts: dict[int, int]) -> None:
        plans: dict[int, list[int]] = {}
        questions: dict[int, str] = {}
        for cid, text in texts.items():
            qtexts = question_texts(text, self.cfg)
            qids = [caption_id(q) for q in qtexts]
            plans[int(cid)] = qids
            questions.update(zip(qids, qtexts))
        if questions:
            self.store.add_captions(questions)
        known = self.store.get_labels(self.version, [*questions, *plans]) if plans else {}
        with self._lock:
            for key in [*questions, *plans]:
                if key in self._pending_writes:
                    known[key] = self._pending_writes[key]
            for cid, qids in plans.items():
                if cid in self._waiting:
                    continue  # another runner sent it first; it is being answered
                if cid in known and known[cid].status == LABELLED and cid not in qids:
                    self.stats.questions_seen += 1  # a combined label from an earlier run
                    self.stats.store_hits += 1
                    self._published.append((cid, known[cid].label, known[cid].probability))
                    continue
                waiting = _Waiting(qids, set())
                for qid in qids:
                    self.stats.questions_seen += 1
                    self._question_captions.setdefault(qid, []).append(cid)
                    if qid in known:
                        self.stats.store_hits += 1
                        self._answers[qid] = known[qid]
                        continue
                    waiting.remaining.add(qid)
                    if qid not in self._texts:
                        self._texts[qid] = questions[qid]
                    self._bump(qid, counts.get(cid, 1))
                self._waiting[cid] = waiting
                if not waiting.remaining:
                    self._finish_caption(cid)
            for cid, n in counts.items():
                waiting = self._waiting.get(int(cid))
                if int(cid) in plans or waiting is None:
                    continue
                for qid in waiting.remaining:
                    if qid in self._texts and qid not in self._in_flight:
                        self._bump(qid, n)
            self._evict()

    def _evict(self) -> None:
        """Keep at most ``max_pending`` queued questions: drop the least seen from memory."""
        excess = len(self._texts) - len(self._in_flight) - self.max_pending
        if excess <= 0:
            return
        queued = sorted((self._counts[q], q) for q in self._texts if q not in self._in_flight)
        for _, qid in queued[:excess]:
            self._texts.pop(qid, None)
            self._counts.pop(qid, None)
            self.stats.dropped += 1
            for cid in self._question_captions.pop(qid, []):
                waiting = self._waiting.pop(cid, None)
                if waiting is None:
                    continue
                self._dropped.add(cid)
                for other in waiting.questions:  # its other sentences wait for nobody now
                    users = self._question_captions.get(other, [])
                    if cid in users:
                        users.remove(cid)
        if self.stats.dropped == excess:  # the first overflow of this run: say it once
            logger.warning(
                "annotator queue over annotator.max_queue=%d: dropping the least seen questions "
                "(counted in annotator_dropped; asked again when seen again)",
                self.max_pending,
            )

    def _finish_caption(self, cid: int) -> None:
        """All questions of ``cid`` are answered: combine (max) and publish. Lock held."""
        waiting = self._waiting.pop(cid)
        answers = [self._answers.get(q) for q in waiting.questions]
        for q in waiting.questions:
            users = self._question_captions.get(q, [])
            if cid in users:
                users.remove(cid)
            if not users:
                self._question_captions.pop(q, None)
                self._answers.pop(q, None)
        labelled = [a for a in answers if a is not None and a.status == LABELLED]
        if not labelled:
            if cid not in waiting.questions:
                self._pending_writes[cid] = StoredLabel(
                    cid, None, None, UNLABELABLE, 1, "no sentence could be labelled"
                )
            return
        prob = max(a.probability for a in labelled)
        label = int(prob >= self.cfg.threshold)
        if cid not in waiting.questions:  # a multi-sentence caption: store its combined label
            self._pending_writes[cid] = StoredLabel(cid, label, prob, LABELLED, 1)
        self._published.append((cid, label, prob))

    # -- ranking -------------------------------------------------------------------------------
    def _submit_pairs(self, texts: dict[int, str], counts: dict[int, int]) -> None:
        with self._lock:
            for cid in texts:
                cid = int(cid)
                if cid in self._pair_pool:
                    continue  # another runner sent it first: it already has its comparisons
                self._pair_pool[cid] = 0
                # A new caption is compared against captions already in the pool when its turn
                # comes (so captions that arrived after it may be among them). The first caption
                # has nobody to meet yet; the captions after it will be compared with it.
                if len(self._pair_pool) > 1:
                    self._pair_anchors.append([cid, PAIRS_PER_CAPTION])
                    self._pair_budget += PAIRS_PER_CAPTION
            for cid, n in counts.items():
                if int(cid) in self._pair_pool:
                    self._pair_pool[int(cid)] += n

    def _next_pair(self) -> tuple[int, int] | None:
        """The next comparison: the oldest new caption still owed one, against a pool caption it
        has not met yet, drawn in proportion to how often each was seen (what the policy meets).

        Pairing every comparison with the new caption matters: drawing both sides by frequency
        almost never picks a rare new caption (on KeyDoor the door and goal captions, the ones
        that carry the signal, were never compared in 3 runs of 150k steps). Lock held.
        """
        while self._pair_anchors:
            anchor = self._pair_anchors[0]
            cid = anchor[0]
            rivals = [
                c
                for c in self._pair_pool
                if c != cid and (min(c, cid), max(c, cid)) not in self._asked_pairs
            ]
            if not rivals:  # it has met every caption there is: nothing left to ask for it
                self._pair_budget -= anchor[1]
                self._pair_anchors.popleft()
                continue
            weights = [self._pair_pool[c] + 1 for c in rivals]
            rival = self._rng.choices(rivals, weights, k=1)[0]
            self._asked_pairs.add((min(cid, rival), max(cid, rival)))
            anchor[1] -= 1
            self._pair_budget -= 1
            if anchor[1] == 0:
                self._pair_anchors.popleft()
            # Which caption is shown first is random (an LLM has a position bias).
            return (cid, rival) if self._rng.random() < 0.5 else (rival, cid)
        return None

    # -- the loop ------------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._wakeup is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    def _pop_question(self) -> tuple[int, str] | None:
        with self._lock:
            while self._heap:
                neg, qid = heapq.heappop(self._heap)
                if (
                    qid in self._in_flight
                    or qid not in self._texts
                    or -neg != self._counts.get(qid)
                ):
                    continue  # already taken, or a stale priority entry
                self._in_flight.add(qid)
                return qid, self._texts[qid]
        return None

    async def _health(self) -> None:
        """Ask the backend whether it can answer (used only while no question is in flight, so
        an idle annotator's outage shows too)."""
        check = getattr(self.backend, "health", None)
        if check is None:
            return
        try:
            await asyncio.wait_for(check(), timeout=HEALTH_INTERVAL_S * 2)
        except FatalBackendError as exc:
            self._fail(
                f"the annotator stopped ({describe_backend(self.cfg)}): {exc}; "
                f"see {TROUBLESHOOTING}"
            )
        except (BackendError, OSError, TimeoutError, asyncio.TimeoutError) as exc:
            # Two failed checks in a row (a slow answer under load is not an outage).
            self._health_failures += 1
            if self._health_failures >= 2:
                self._mark_down(str(exc) or f"health check: {type(exc).__name__}")
        else:
            self._health_failures = 0
            self._mark_up()

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
            if time.monotonic() - last_flush > 0.25:
                self._flush()
                last_flush = time.monotonic()
                self._check_outage()
            idle = not tasks and (health is None or health.done())
            if idle and time.monotonic() - last_health > HEALTH_INTERVAL_S:
                last_health = time.monotonic()
                health = asyncio.create_task(self._health())
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

    def _next_job(self):
        if self._failure is not None:
            return None  # the run is stopping; what is queued stays in the store
        if not self._gate_open:
            return None  # gated: asked at the next answer_all
        if self.ranking:
            with self._lock:
                pair = self._next_pair()
                if pair is None:
                    return None
                self._pairs_in_flight += 1
            return self._ask_pair(*pair)
        item = self._pop_question()
        return None if item is None else self._ask_label(*item)

    async def _score(self, question: Question) -> tuple[list[float] | None, int, str | None]:
        """Ask until the answer parses (bounded); returns (probabilities or None, attempts, error)."""
        attempts, error = 0, None
        while True:
            attempts += 1
            start = time.perf_counter()
            self.stats.requests_total += 1
            try:
                scores = await self.backend.score(question)
                self._mark_up()
                probs = scores.probabilities()
                with self._lock:
                    self.stats.latencies.append(time.perf_counter() - start)
                return probs, attempts, None
            except FatalBackendError as exc:
                # No retry can fix it (a refused request, a model not served, a model that
                # keeps crashing): the run must stop rather than train without labels.
                self._fail(
                    f"the annotator stopped ({describe_backend(self.cfg)}): {exc}; "
                    f"see {TROUBLESHOOTING}"
                )
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
                self._mark_down(str(exc))
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(attempts, 6)) * self._rng.random())
                if self._stopping:
                    raise asyncio.CancelledError from None

    async def _ask_label(self, qid: int, text: str) -> None:
        try:
            probs, attempts, error = await self._score(build_classification(text, self.cfg))
        except asyncio.CancelledError:
            with self._lock:
                self._in_flight.discard(qid)
            raise
        if probs is None:
            record = StoredLabel(qid, None, None, UNLABELABLE, attempts, error)
        else:
            p_yes = probs[0]
            record = StoredLabel(qid, int(p_yes >= self.cfg.threshold), p_yes, LABELLED, attempts)
        with self._lock:
            self._in_flight.discard(qid)
            self._texts.pop(qid, None)
            self._counts.pop(qid, None)
            self._pending_writes[qid] = record
            self._answers[qid] = record
            if record.status == LABELLED:
                self.stats.labels_total += 1
                self.stats.label_times.append(time.perf_counter())
            else:
                self.stats.unlabelable_total += 1
            for cid in list(self._question_captions.get(qid, [])):
                waiting = self._waiting.get(cid)
                if waiting is None:
                    continue
                waiting.remaining.discard(qid)
                if not waiting.remaining:
                    self._finish_caption(cid)
            if qid not in self._question_captions:
                self._answers.pop(qid, None)
            self._answers_total += 1
            self._answered.notify_all()

    async def _ask_pair(self, a: int, b: int) -> None:
        texts = self.store.texts([a, b])
        question = build_ranking(texts[a], texts[b], self.cfg)
        try:
            probs, attempts, error = await self._score(question)
        except asyncio.CancelledError:
            with self._lock:
                self._pairs_in_flight -= 1
            raise
        if probs is None:
            record = StoredPreference(a, b, None, UNLABELABLE, attempts, error)
        else:
            record = StoredPreference(a, b, probs[0], LABELLED, attempts)
        with self._lock:
            self._pairs_in_flight -= 1
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

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("AnnotationService holds a thread and a database; run it inside an actor")
