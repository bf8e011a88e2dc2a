"""Which ranking comparisons the annotation service asks next: each new caption against captions
already seen, drawn by how often each was seen, never the same pair twice."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping

#: ranking: comparisons asked for each new caption, each of them against that caption
PAIRS_PER_CAPTION = 4


class PairQueue:
    """The comparisons owed and in flight (not thread-safe: the service's lock guards it).

    Args:
        rng: draws the rival and which caption is shown first (the service's seeded generator).

    Example::

        pairs = PairQueue(random.Random(0))
        pairs.add([17, 42, 99], {17: 5, 42: 1})
        a, b = pairs.next_pair()  # 42 (the oldest owed) and 17 or 99, in either order
        pairs.finished()
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._pool: dict[int, int] = {}  # caption id -> times seen
        # new captions still owed comparisons, oldest first, and how many each is owed
        self._anchors: deque[list[int]] = deque()
        self.owed = 0  # comparisons owed in total (the ranking queue)
        self._asked: set[tuple[int, int]] = set()  # unordered: (smaller id, larger id)
        self.in_flight = 0

    def add(self, captions: Iterable[int], counts: Mapping[int, int]) -> None:
        """New captions (each owed :data:`PAIRS_PER_CAPTION` comparisons) and sightings."""
        for cid in captions:
            cid = int(cid)
            if cid in self._pool:
                continue  # another runner sent it first: it already has its comparisons
            self._pool[cid] = 0
            # A new caption is compared against captions already in the pool when its turn
            # comes (so captions that arrived after it may be among them). The first caption
            # has nobody to meet yet; the captions after it will be compared with it.
            if len(self._pool) > 1:
                self._anchors.append([cid, PAIRS_PER_CAPTION])
                self.owed += PAIRS_PER_CAPTION
        for cid, n in counts.items():
            if int(cid) in self._pool:
                self._pool[int(cid)] += n

    def restore(self, seen: Mapping[int, int], answered: Iterable[tuple[int, int]]) -> None:
        """Rebuild the pool from stored captions (id -> times seen) and the pairs answered
        before (never asked again); the restored captions are owed no comparisons."""
        for cid, times in seen.items():
            self._pool.setdefault(cid, 0)
            self._pool[cid] += times
        for a, b in answered:
            self._asked.add((min(a, b), max(a, b)))

    def next_pair(self) -> tuple[int, int] | None:
        """The next comparison, counted in flight until :meth:`finished`; None when none is owed.

        The oldest new caption still owed one meets a pool caption it has not met yet, drawn in
        proportion to how often each was seen (what the policy meets). Pairing every comparison
        with the new caption matters: drawing both sides by frequency almost never picks a rare
        new caption (on KeyDoor the door and goal captions, the ones that carry the signal, were
        never compared in 3 runs of 150k steps).
        """
        while self._anchors:
            anchor = self._anchors[0]
            cid = anchor[0]
            rivals = [
                c for c in self._pool if c != cid and (min(c, cid), max(c, cid)) not in self._asked
            ]
            if not rivals:  # it has met every caption there is: nothing left to ask for it
                self.owed -= anchor[1]
                self._anchors.popleft()
                continue
            weights = [self._pool[c] + 1 for c in rivals]
            rival = self._rng.choices(rivals, weights, k=1)[0]
            self._asked.add((min(cid, rival), max(cid, rival)))
            anchor[1] -= 1
            self.owed -= 1
            if anchor[1] == 0:
                self._anchors.popleft()
            self.in_flight += 1
            # Which caption is shown first is random (an LLM has a position bias).
            return (cid, rival) if self._rng.random() < 0.5 else (rival, cid)
        return None

    def finished(self) -> None:
        """A comparison from :meth:`next_pair` was answered or given up."""
        self.in_flight -= 1
