"""The annotation service's queue of label questions: the most seen first, bounded in size, and
each caption's label combined (max) from the answers to its questions."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from oni_sys.annotators.annotation_store import LABELLED, UNLABELABLE, StoredLabel
from oni_sys.annotators.service_metrics import ServiceStats

logger = logging.getLogger(__name__)

#: a caption label ready for subscribers: (caption id, label, probability)
Published = tuple[int, int, float]


@dataclass
class _Waiting:
    """A caption whose label waits for some of its questions."""

    questions: list[int]
    remaining: set[int]


class LabelQueue:
    """Questions queued or in flight, and the captions waiting for them (not thread-safe: the
    service's lock guards it).

    What a caption's answers produce is returned, not kept: the labels to publish and the
    records to write to the store (a question's own answer, and a multi-sentence caption's
    combined label).

    Args:
        max_pending: queued questions kept at most; the least seen beyond it are dropped.
        threshold: the probability at which a combined label is 1.
        stats: counts questions seen, store hits and dropped questions.

    Example::

        queue = LabelQueue(max_pending=1000, threshold=0.5, stats=ServiceStats())
        cid = caption_id("You kill the newt!")
        plans, questions = plan_questions({cid: "You kill the newt!"}, AnnotatorConfig())
        queue.add(plans, questions, known={}, counts={cid: 3})  # ([], {}): nothing known yet
        qid, text = queue.pop()  # (cid, "You kill the newt!"): one sentence, its own question
        published, writes = queue.answered(qid, StoredLabel(qid, 1, 0.9))  # [(cid, 1, 0.9)]
    """

    def __init__(self, max_pending: int, threshold: float, stats: ServiceStats) -> None:
        self.max_pending = max_pending
        self.threshold = threshold
        self.stats = stats
        self.texts: dict[int, str] = {}  # question id -> text, while queued or in flight
        self._counts: dict[int, int] = {}  # question id -> times its captions were seen
        self._heap: list[tuple[int, int]] = []  # (-count, question id); stale entries skipped
        self.in_flight: set[int] = set()
        self._waiting: dict[int, _Waiting] = {}  # caption id -> its unanswered questions
        self._question_captions: dict[int, list[int]] = {}  # question id -> waiting captions
        self._answers: dict[int, StoredLabel] = {}  # answers of questions still needed
        self.dropped: set[int] = set()  # caption ids dropped from the queue, owed a question

    @property
    def queued(self) -> int:
        """Questions waiting to be asked."""
        return len(self.texts) - len(self.in_flight)

    def take_dropped(self, seen: Mapping[int, int], texts: Mapping[int, str]) -> list[int]:
        """Captions dropped earlier that are seen again (and not sent with their text): they
        are owed a question now, and no longer counted as dropped."""
        back = [int(c) for c in seen if int(c) in self.dropped and c not in texts]
        self.dropped.difference_update(back)
        return back

    def add(
        self,
        plans: Mapping[int, list[int]],
        questions: Mapping[int, str],
        known: Mapping[int, StoredLabel],
        counts: Mapping[int, int],
    ) -> tuple[list[Published], dict[int, StoredLabel]]:
        """Queue the questions of new captions and count sightings.

        Args:
            plans: caption id -> its question ids (from
                :func:`~oni_sys.annotators.questions.plan_questions`).
            questions: question id -> text.
            known: answers already stored (or about to be) for question and caption ids.
            counts: caption id -> times seen since the last call.

        Returns:
            the labels to publish and the records to store, of captions answered already.
        """
        published: list[Published] = []
        writes: dict[int, StoredLabel] = {}
        for cid, qids in plans.items():
            if cid in self._waiting:
                continue  # another runner sent it first; it is being answered
            if cid in known and known[cid].status == LABELLED and cid not in qids:
                self.stats.questions_seen += 1  # a combined label from an earlier run
                self.stats.store_hits += 1
                published.append((cid, known[cid].label, known[cid].probability))
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
                if qid not in self.texts:
                    self.texts[qid] = questions[qid]
                self._bump(qid, counts.get(cid, 1))
            self._waiting[cid] = waiting
            if not waiting.remaining:
                self._finish_caption(cid, published, writes)
        for cid, n in counts.items():
            waiting = self._waiting.get(int(cid))
            if int(cid) in plans or waiting is None:
                continue
            for qid in waiting.remaining:
                if qid in self.texts and qid not in self.in_flight:
                    self._bump(qid, n)
        self._evict()
        return published, writes

    def bump_queued(self, qid: int, count: int) -> None:
        """Raise the priority of a queued question by ``count`` sightings."""
        if qid in self.texts:
            self._bump(qid, count)

    def pop(self) -> tuple[int, str] | None:
        """The most seen queued question, now in flight; None when nothing is queued."""
        while self._heap:
            neg, qid = heapq.heappop(self._heap)
            if qid in self.in_flight or qid not in self.texts or -neg != self._counts.get(qid):
                continue  # already taken, or a stale priority entry
            self.in_flight.add(qid)
            return qid, self.texts[qid]
        return None

    def cancel(self, qid: int) -> None:
        """A question in flight was abandoned (the service stops); it stays unanswered."""
        self.in_flight.discard(qid)

    def answered(
        self, qid: int, record: StoredLabel
    ) -> tuple[list[Published], dict[int, StoredLabel]]:
        """A question in flight got its answer (or was given up as unlabelable); returns the
        labels to publish and the records to store (``record`` among them)."""
        self.in_flight.discard(qid)
        self.texts.pop(qid, None)
        self._counts.pop(qid, None)
        published: list[Published] = []
        writes: dict[int, StoredLabel] = {qid: record}
        self._answers[qid] = record
        for cid in list(self._question_captions.get(qid, [])):
            waiting = self._waiting.get(cid)
            if waiting is None:
                continue
            waiting.remaining.discard(qid)
            if not waiting.remaining:
                self._finish_caption(cid, published, writes)
        if qid not in self._question_captions:
            self._answers.pop(qid, None)
        return published, writes

    def _bump(self, qid: int, count: int) -> None:
        self._counts[qid] = self._counts.get(qid, 0) + count
        heapq.heappush(self._heap, (-self._counts[qid], qid))

    def _evict(self) -> None:
        """Keep at most ``max_pending`` queued questions: drop the least seen from memory."""
        excess = self.queued - self.max_pending
        if excess <= 0:
            return
        queued = sorted((self._counts[q], q) for q in self.texts if q not in self.in_flight)
        for _, qid in queued[:excess]:
            self.texts.pop(qid, None)
            self._counts.pop(qid, None)
            self.stats.dropped += 1
            for cid in self._question_captions.pop(qid, []):
                waiting = self._waiting.pop(cid, None)
                if waiting is None:
                    continue
                self.dropped.add(cid)
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

    def _finish_caption(
        self, cid: int, published: list[Published], writes: dict[int, StoredLabel]
    ) -> None:
        """All questions of ``cid`` are answered: combine (max), publish and store."""
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
                writes[cid] = StoredLabel(
                    cid, None, None, UNLABELABLE, 1, "no sentence could be labelled"
                )
            return
        prob = max(a.probability for a in labelled)
        label = int(prob >= self.threshold)
        if cid not in waiting.questions:  # a multi-sentence caption: store its combined label
            writes[cid] = StoredLabel(cid, label, prob, LABELLED, 1)
        published.append((cid, label, prob))
