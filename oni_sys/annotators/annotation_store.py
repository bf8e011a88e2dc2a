"""The annotation store: caption texts and the LLM's labels and preferences, in one SQLite file.

Labels and preferences are keyed by annotator version; the file is in WAL mode and may be shared
by the processes of one host (docs/ANNOTATOR.md, "The store"). Caption ids are unsigned 64-bit
and SQLite's integers signed: :func:`_to_sql` and :func:`_from_sql` map one onto the other, and
nothing else touches raw ids.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: bumped when the tables change; a store written by a newer oni-sys is refused, not misread
SCHEMA_VERSION = 1

LABELLED = "labelled"
UNLABELABLE = "unlabelable"
STATUSES = (LABELLED, UNLABELABLE)

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS captions (
    id         INTEGER PRIMARY KEY,          -- uint64 caption id as two's-complement int64
    text       TEXT NOT NULL,
    times_seen INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL                 -- unix time the text was first stored
);
CREATE TABLE IF NOT EXISTS versions (
    id      INTEGER PRIMARY KEY,             -- a long version string is stored once, not per row
    name    TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    version_id  INTEGER NOT NULL REFERENCES versions(id),
    caption_id  INTEGER NOT NULL REFERENCES captions(id),
    label       INTEGER CHECK (label IN (0, 1)),
    probability REAL CHECK (probability BETWEEN 0.0 AND 1.0),
    status      TEXT NOT NULL CHECK (status IN ('labelled', 'unlabelable')),
    attempts    INTEGER NOT NULL,
    error       TEXT,
    created     REAL NOT NULL,
    CHECK ((status = 'labelled' AND label IS NOT NULL AND probability IS NOT NULL)
        OR (status = 'unlabelable' AND label IS NULL AND probability IS NULL)),
    PRIMARY KEY (version_id, caption_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS labels_by_probability ON labels (version_id, status, probability);
CREATE TABLE IF NOT EXISTS preferences (
    version_id INTEGER NOT NULL REFERENCES versions(id),
    caption_a  INTEGER NOT NULL REFERENCES captions(id),
    caption_b  INTEGER NOT NULL REFERENCES captions(id),
    preference REAL CHECK (preference BETWEEN 0.0 AND 1.0),  -- P(a shows more progress than b)
    status     TEXT NOT NULL CHECK (status IN ('labelled', 'unlabelable')),
    attempts   INTEGER NOT NULL,
    error      TEXT,
    created    REAL NOT NULL,
    CHECK (caption_a != caption_b),
    CHECK ((status = 'labelled' AND preference IS NOT NULL)
        OR (status = 'unlabelable' AND preference IS NULL)),
    PRIMARY KEY (version_id, caption_a, caption_b)
) WITHOUT ROWID;
"""

# A stored success is never replaced by a later failure for the same key: two runs sharing a
# store may ask the same question, and one run's timeout must not erase the other's answer.
_UPSERT_LABEL = """
INSERT INTO labels (version_id, caption_id, label, probability, status, attempts, error, created)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (version_id, caption_id) DO UPDATE SET
    label = excluded.label, probability = excluded.probability, status = excluded.status,
    attempts = excluded.attempts, error = excluded.error, created = excluded.created
WHERE excluded.status = 'labelled' OR labels.status = 'unlabelable'
"""

_UPSERT_PREFERENCE = """
INSERT INTO preferences
    (version_id, caption_a, caption_b, preference, status, attempts, error, created)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (version_id, caption_a, caption_b) DO UPDATE SET
    preference = excluded.preference, status = excluded.status,
    attempts = excluded.attempts, error = excluded.error, created = excluded.created
WHERE excluded.status = 'labelled' OR preferences.status = 'unlabelable'
"""


def _to_sql(caption_id: Any) -> int:
    """A uint64 caption id as the int64 SQLite stores (ids >= 2**63 become negative)."""
    value = operator.index(caption_id)  # accepts int and numpy integers, refuses floats
    if not 0 < value < _U64:
        raise ValueError(f"caption id {value} is not in 1..2**64-1 (0 means 'no caption')")
    return value - _U64 if value > _I64_MAX else value


def _from_sql(value: int) -> int:
    """The uint64 caption id of a stored int64."""
    return value + _U64 if value < 0 else value


@dataclass
class StoredLabel:
    """The annotator's result for one caption under one annotator version.

    ``status`` is ``"labelled"`` (``label`` 0/1 and ``probability`` of label 1 are set) or
    ``"unlabelable"`` (the LLM gave no usable answer after ``attempts`` tries; ``label`` and
    ``probability`` are ``None`` and ``error`` says why).
    """

    caption_id: int
    label: int | None
    probability: float | None
    status: str = LABELLED
    attempts: int = 1
    error: str | None = None
    #: unix time the result was stored (set by the store on read)
    created: float | None = None


@dataclass
class StoredPreference:
    """The annotator's judgement of the ordered pair ``(caption_a, caption_b)``.

    ``preference`` is P(a shows more progress than b) in [0, 1] (0.5: a tie), ``None`` when
    ``status`` is ``"unlabelable"``. ``(a, b)`` and ``(b, a)`` are different questions (the
    LLM sees them in that order) and are stored separately.
    """

    caption_a: int
    caption_b: int
    preference: float | None
    status: str = LABELLED
    attempts: int = 1
    error: str | None = None
    #: unix time the result was stored (set by the store on read)
    created: float | None = None


@dataclass(frozen=True)
class ScoredCaption:
    """A caption with its stored probability of label 1 (for reports)."""

    caption_id: int
    text: str
    probability: float


def _check_status(status: str, where: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"{where}: status {status!r} is not one of {STATUSES}")


def _check_probability(value: float | None, where: str) -> None:
    if value is None or not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{where}: {value!r} is not a probability in [0, 1]")


def _label_row(version_id: int, rec: StoredLabel, now: float) -> tuple:
    where = f"label for caption {rec.caption_id}"
    _check_status(rec.status, where)
    if rec.status == LABELLED:
        if rec.label not in (0, 1):
            raise ValueError(f"{where}: a labelled caption needs label 0 or 1, not {rec.label!r}")
        _check_probability(rec.probability, where)
        label, prob = int(rec.label), float(rec.probability)
    else:
        # Refusing values here (rather than dropping them) keeps "unlabelable" from ever being
        # read back as a label.
        if rec.label is not None or rec.probability is not None:
            raise ValueError(f"{where}: an unlabelable caption has no label or probability")
        label, prob = None, None
    if rec.attempts < 0:
        raise ValueError(f"{where}: attempts {rec.attempts} is negative")
    return (
        version_id,
        _to_sql(rec.caption_id),
        label,
        prob,
        rec.status,
        int(rec.attempts),
        rec.error,
        now,
    )


def _preference_row(version_id: int, rec: StoredPreference, now: float) -> tuple:
    a, b = _to_sql(rec.caption_a), _to_sql(rec.caption_b)
    where = f"preference for ({rec.caption_a}, {rec.caption_b})"
    if a == b:
        raise ValueError(f"{where}: a caption cannot be compared with itself")
    _check_status(rec.status, where)
    if rec.status == LABELLED:
        _check_probability(rec.preference, where)
        pref = float(rec.preference)
    else:
        if rec.preference is not None:
            raise ValueError(f"{where}: an unlabelable pair has no preference")
        pref = None
    if rec.attempts < 0:
        raise ValueError(f"{where}: attempts {rec.attempts} is negative")
    return (version_id, a, b, pref, rec.status, int(rec.attempts), rec.error, now)


def _label_from_sql(row: Sequence) -> StoredLabel:
    cid, label, prob, status, attempts, error, created = row
    return StoredLabel(_from_sql(cid), label, prob, status, attempts, error, created)


def _preference_from_sql(row: Sequence) -> StoredPreference:
    a, b, pref, status, attempts, error, created = row
    return StoredPreference(_from_sql(a), _from_sql(b), pref, status, attempts, error, created)


def _keys(ids: Iterable[int]) -> tuple[list[int], list[int]]:
    """The ids in first-seen order without repeats (as Python ints) and their stored keys."""
    unique = list(dict.fromkeys(operator.index(cid) for cid in ids))
    return unique, [_to_sql(cid) for cid in unique]


class AnnotationStore:
    """Caption texts, labels and preferences in one SQLite file.

    One instance holds one connection; it is safe to share between threads of one process
    (calls are serialised) but not across processes: open one per process, for example from the
    path inside a Ray actor. Several processes may open the same file at once.

    Args:
        path: the SQLite file (its directory is created).
        create: create a new store if ``path`` does not exist; otherwise that is a ``ValueError``.
        timeout: seconds a writer waits for another process's write transaction before
            ``sqlite3.OperationalError: database is locked``.
        synchronous: ``"NORMAL"`` (survives the death of any process) or ``"FULL"`` (also
            survives power loss; one fsync per commit).

    Example::

        with AnnotationStore("runs/labels.sqlite") as store:
            store.add_captions({17: "You kill the newt!"})
            store.put_labels("gemma3|class-v1", [StoredLabel(17, label=1, probability=0.93)])
            store.get_labels("gemma3|class-v1", [17])[17].label  # 1
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        create: bool = True,
        timeout: float = 30.0,
        synchronous: str = "NORMAL",
    ):
        self.path = Path(path)
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        if not self.path.exists():
            if not create:
                raise ValueError(f"{self.path}: no annotation store there (no such file)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._version_ids: dict[str, int] = {}
        # Autocommit mode (isolation_level=None): transactions are opened explicitly below, so
        # Python's sqlite3 never starts or commits one behind our back.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._configure(synchronous.upper())
            self._ensure_schema()
        except BaseException:
            self._conn.close()
            self._conn = None
            raise
        limit = 999  # SQLite's historical default, for Pythons without getlimit()
        if hasattr(self._conn, "getlimit"):
            limit = self._conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        # room for the version id and a pair's two columns in one statement
        self._chunk = max(1, min(limit, 30_000) // 2 - 1)
        logger.debug("opened annotation store %s", self.path)

    # -- connection ----------------------------------------------------------------------------
    def _configure(self, synchronous: str) -> None:
        conn = self._conn
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # locked, unreadable: not our call
                raise
            raise ValueError(f"{self.path} is not an SQLite database ({exc})") from None
        if str(mode).lower() != "wal":
            raise ValueError(
                f"{self.path}: SQLite could not switch the store to WAL mode (got {mode!r}); "
                "keep the store on a local filesystem"
            )
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")

    def _schema_version(self) -> int | None:
        """The stored schema version, or None for an empty file; refuses foreign databases."""
        with self._read() as conn:
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if "meta" not in tables:
                if tables:
                    raise ValueError(
                        f"{self.path} is an SQLite database but not an annotation store "
                        f"(it has tables {sorted(tables)} and no meta table)"
                    )
                return None
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            return int(row[0]) if row else None

    def _ensure_schema(self) -> None:
        found = self._schema_version()
        if found is None:
            with self._write() as conn:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            found = self._schema_version()
        if found is not None and found > SCHEMA_VERSION:
            raise ValueError(
                f"{self.path} was written with annotation store schema {found}, newer than the "
                f"schema {SCHEMA_VERSION} this oni-sys reads; upgrade oni-sys to open it"
            )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"the annotation store {self.path} is closed")
        if os.getpid() != self._pid:
            # An SQLite connection inherited through fork() corrupts locks if used.
            raise RuntimeError(
                f"the annotation store {self.path} was opened in process {self._pid}; "
                "open it again in this process"
            )
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed or none of it."""
        with self._lock:
            conn = self._connection()
            # IMMEDIATE takes the write lock up front (waiting out the busy timeout), so a
            # deferred read cannot fail later trying to upgrade to a write.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every statement inside sees the same committed snapshot."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> AnnotationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> None:
        raise TypeError(
            "an AnnotationStore holds an SQLite connection; send its path and open it in the "
            "receiving process"
        )

    def _select_in(
        self, conn: sqlite3.Connection, sql: str, keys: Sequence, prefix: tuple = (), width: int = 1
    ) -> Iterator[tuple]:
        """Rows of ``sql`` for all ``keys``, in statements whose ``IN ({marks})`` lists stay
        under SQLite's variable limit; ``width`` 2 makes each key a pair (a row value)."""
        mark = "?" if width == 1 else "(" + ", ".join("?" * width) + ")"
        for i in range(0, len(keys), self._chunk):
            chunk = keys[i : i + self._chunk]
            flat = chunk if width == 1 else [k for key in chunk for k in key]
            yield from conn.execute(
                sql.format(marks=",".join([mark] * len(chunk))), (*prefix, *flat)
            )

    # -- versions ------------------------------------------------------------------------------
    def _find_version(self, conn: sqlite3.Connection, version: str) -> int | None:
        vid = self._version_ids.get(version)
        if vid is None:
            row = conn.execute("SELECT id FROM versions WHERE name = ?", (version,)).fetchone()
            if row is None:
                return None
            # Version rows are never deleted, so a committed id stays valid for ever.
            vid = self._version_ids[version] = row[0]
        return vid

    def _version_for_write(self, conn: sqlite3.Connection, version: str) -> int:
        if not isinstance(version, str) or not version:
            raise ValueError(f"annotator version must be a non-empty string, not {version!r}")
        row = conn.execute("SELECT id FROM versions WHERE name = ?", (version,)).fetchone()
        if row is not None:
            return row[0]
        cur = conn.execute(
            "INSERT INTO versions (name, created) VALUES (?, ?)", (version, time.time())
        )
        return cur.lastrowid

    def versions(self) -> list[str]:
        """Annotator versions with anything stored, oldest first."""
        with self._read() as conn:
            return [r[0] for r in conn.execute("SELECT name FROM versions ORDER BY created, id")]

    # -- captions ------------------------------------------------------------------------------
    def add_captions(self, texts: dict[int, str]) -> int:
        """Store caption texts (id -> text); returns how many were new. Known ids keep their text."""
        if not texts:
            return 0
        now = time.time()
        rows = [(_to_sql(cid), str(text), now) for cid, text in texts.items()]
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO captions (id, text, first_seen) VALUES (?, ?, ?)", rows
            )
            return conn.total_changes - before

    def record_seen(self, counts: dict[int, int]) -> int:
        """Add ``counts`` (id -> times seen) to ``times_seen``; returns how many ids were known.

        Ids without a stored text are skipped: add their text first.
        """
        rows = [(int(n), _to_sql(cid)) for cid, n in counts.items() if n]
        if not rows:
            return 0
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany("UPDATE captions SET times_seen = times_seen + ? WHERE id = ?", rows)
            known = conn.total_changes - before
        if known < len(rows):
            logger.debug("record_seen: %d ids have no stored text", len(rows) - known)
        return known

    def caption_text(self, caption_id: int) -> str | None:
        """The text of one caption, or None if it was never stored."""
        return self.texts([caption_id]).get(operator.index(caption_id))

    def texts(self, ids: Iterable[int]) -> dict[int, str]:
        """Texts of the given ids that are stored (unknown ids are left out)."""
        _, keys = _keys(ids)
        out: dict[int, str] = {}
        with self._read() as conn:
            sql = "SELECT id, text FROM captions WHERE id IN ({marks})"
            for cid, text in self._select_in(conn, sql, keys):
                out[_from_sql(cid)] = text
        return out

    def all_texts(self) -> dict[int, str]:
        """Every stored caption (and question) text by id."""
        with self._read() as conn:
            return {_from_sql(i): t for i, t in conn.execute("SELECT id, text FROM captions")}

    def times_seen(self, ids: Iterable[int]) -> dict[int, int]:
        """``times_seen`` of the given ids that are stored."""
        _, keys = _keys(ids)
        out: dict[int, int] = {}
        with self._read() as conn:
            sql = "SELECT id, times_seen FROM captions WHERE id IN ({marks})"
            for cid, n in self._select_in(conn, sql, keys):
                out[_from_sql(cid)] = n
        return out

    def _missing_texts(self, conn: sqlite3.Connection, keys: Iterable[int]) -> list[int]:
        keys = list(dict.fromkeys(keys))
        sql = "SELECT id FROM captions WHERE id IN ({marks})"
        found = {r[0] for r in self._select_in(conn, sql, keys)}
        return [_from_sql(k) for k in keys if k not in found]

    # -- labels --------------------------------------------------------------------------------
    def put_labels(self, version: str, rows: list[StoredLabel]) -> None:
        """Store results for ``version`` in one transaction (all rows or, on any error, none).

        Every caption must have its text stored already. A stored ``labelled`` result is not
        replaced by an ``unlabelable`` one; a newer ``labelled`` result replaces an older one.
        """
        if not rows:
            return
        now = time.time()
        with self._write() as conn:
            vid = self._version_for_write(conn, version)
            values = [_label_row(vid, rec, now) for rec in rows]
            try:
                conn.executemany(_UPSERT_LABEL, values)
            except sqlite3.IntegrityError:
                unknown = self._missing_texts(conn, (v[1] for v in values))
                if not unknown:
                    raise
                raise ValueError(
                    f"{len(unknown)} labelled captions have no stored text (first: "
                    f"{unknown[:5]}); call add_captions before put_labels"
                ) from None

    def get_labels(self, version: str, ids: Iterable[int] | None = None) -> dict[int, StoredLabel]:
        """Stored results (labelled and unlabelable) for ``version``: all, or those of ``ids``."""
        cols = "caption_id, label, probability, status, attempts, error, created"
        out: dict[int, StoredLabel] = {}
        keys = None if ids is None else _keys(ids)[1]
        with self._read() as conn:
            vid = self._find_version(conn, version)
            if vid is None:
                return out
            if keys is None:
                rows = conn.execute(f"SELECT {cols} FROM labels WHERE version_id = ?", (vid,))
            else:
                sql = (
                    f"SELECT {cols} FROM labels WHERE version_id = ? AND caption_id IN ({{marks}})"
                )
                rows = self._select_in(conn, sql, keys, (vid,))
            for row in rows:
                rec = _label_from_sql(row)
                out[rec.caption_id] = rec
        return out

    def missing(self, version: str, ids: Iterable[int]) -> list[int]:
        """The ids (in order, without repeats) with no stored result at all for ``version``.

        Unlabelable captions count as stored: they are not asked again under the same version.
        """
        wanted, keys = _keys(ids)
        with self._read() as conn:
            vid = self._find_version(conn, version)
            if vid is None:
                return wanted
            sql = "SELECT caption_id FROM labels WHERE version_id = ? AND caption_id IN ({marks})"
            found = {r[0] for r in self._select_in(conn, sql, keys, (vid,))}
        return [cid for cid, key in zip(wanted, keys) if key not in found]

    def unanswered(self, version: str, limit: int | None = None) -> dict[int, tuple[str, int]]:
        """Captions with no stored result for ``version``, most seen first: id -> (text, times seen).

        What a restarted annotator still owes (texts are stored before they are asked about).
        """
        with self._read() as conn:
            vid = self._find_version(conn, version)
            sql = (
                "SELECT id, text, times_seen FROM captions c WHERE NOT EXISTS "
                "(SELECT 1 FROM labels l WHERE l.version_id = ? AND l.caption_id = c.id) "
                "ORDER BY times_seen DESC"
            )
            params: tuple = (-1 if vid is None else vid,)
            if limit is not None:
                sql += " LIMIT ?"
                params += (int(limit),)
            return {_from_sql(i): (t, n) for i, t, n in conn.execute(sql, params)}

    def top_captions(self, version: str, n: int, positive: bool = True) -> list[ScoredCaption]:
        """The ``n`` labelled captions with the highest (or, ``positive=False``, lowest)
        probability of label 1; ties go to the caption seen more often."""
        order = "DESC" if positive else "ASC"
        sql = f"""
            SELECT l.caption_id, c.text, l.probability FROM labels l
            JOIN captions c ON c.id = l.caption_id
            WHERE l.version_id = ? AND l.status = 'labelled'
            ORDER BY l.probability {order}, c.times_seen DESC, l.caption_id
            LIMIT ?"""
        with self._read() as conn:
            vid = self._find_version(conn, version)
            if vid is None:
                return []
            return [
                ScoredCaption(_from_sql(cid), text, prob)
                for cid, text, prob in conn.execute(sql, (vid, int(n)))
            ]

    # -- preferences ---------------------------------------------------------------------------
    def put_preferences(self, version: str, rows: list[StoredPreference]) -> None:
        """Store pair judgements for ``version`` in one transaction (as :meth:`put_labels`).

        A pair of a caption with itself is a ``ValueError``; both texts must be stored.
        """
        if not rows:
            return
        now = time.time()
        with self._write() as conn:
            vid = self._version_for_write(conn, version)
            values = [_preference_row(vid, rec, now) for rec in rows]
            try:
                conn.executemany(_UPSERT_PREFERENCE, values)
            except sqlite3.IntegrityError:
                unknown = self._missing_texts(conn, (k for v in values for k in v[1:3]))
                if not unknown:
                    raise
                raise ValueError(
                    f"{len(unknown)} compared captions have no stored text (first: "
                    f"{unknown[:5]}); call add_captions before put_preferences"
                ) from None

    def get_preferences(self, version: str) -> list[StoredPreference]:
        """All stored pair judgements of ``version`` (labelled and unlabelable), oldest first."""
        sql = """
            SELECT caption_a, caption_b, preference, status, attempts, error, created
            FROM preferences WHERE version_id = ? ORDER BY created, caption_a, caption_b"""
        with self._read() as conn:
            vid = self._find_version(conn, version)
            if vid is None:
                return []
            return [_preference_from_sql(r) for r in conn.execute(sql, (vid,))]

    def missing_preferences(
        self, version: str, pairs: Iterable[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """The ordered pairs (in order, without repeats) with no stored result for ``version``."""
        wanted = list(dict.fromkeys((operator.index(a), operator.index(b)) for a, b in pairs))
        keys = [(_to_sql(a), _to_sql(b)) for a, b in wanted]
        with self._read() as conn:
            vid = self._find_version(conn, version)
            if vid is None:
                return wanted
            sql = (
                "SELECT caption_a, caption_b FROM preferences "
                "WHERE version_id = ? AND (caption_a, caption_b) IN (VALUES {marks})"
            )
            found = set(self._select_in(conn, sql, keys, (vid,), width=2))
        return [pair for pair, key in zip(wanted, keys) if key not in found]

    # -- summaries -----------------------------------------------------------------------------
    def counts(self, version: str | None = None) -> dict[str, int]:
        """Captions stored, and for ``version`` (or all versions together) its labels:
        ``labelled`` (= ``positive`` + ``negative``), ``unlabelable`` and ``preferences``
        (labelled pairs; ``preferences_unlabelable`` counts the failed ones)."""
        out = dict.fromkeys(
            (
                "captions",
                "labelled",
                "positive",
                "negative",
                "unlabelable",
                "preferences",
                "preferences_unlabelable",
            ),
            0,
        )
        with self._read() as conn:
            out["captions"] = conn.execute("SELECT count(*) FROM captions").fetchone()[0]
            where, params = "", ()
            if version is not None:
                vid = self._find_version(conn, version)
                if vid is None:
                    return out
                where, params = "WHERE version_id = ?", (vid,)
            for status, label, n in conn.execute(
                f"SELECT status, label, count(*) FROM labels {where} GROUP BY status, label",
                params,
            ):
                if status == UNLABELABLE:
                    out["unlabelable"] += n
                else:
                    out["labelled"] += n
                    out["positive" if label == 1 else "negative"] += n
            for status, n in conn.execute(
                f"SELECT status, count(*) FROM preferences {where} GROUP BY status", params
            ):
                out["preferences" if status == LABELLED else "preferences_unlabelable"] += n
        return out

    def export_jsonl(self, path: str | os.PathLike, version: str | None = None) -> int:
        """Write every label and preference (of ``version``, or all) as JSON lines; returns rows.

        Label rows: ``{"kind": "label", "version", "caption_id", "caption", "label",
        "probability", "status", "attempts", "error", "created"}``. Preference rows:
        ``{"kind": "preference", "version", "caption_a", "caption_b", "caption_a_text",
        "caption_b_text", "preference", "status", "attempts", "error", "created"}``. Ids are
        unsigned 64-bit JSON integers. The file is replaced atomically (temporary file +
        rename), so a reader sees the old export or the new one, never part of one.
        """
        # run_dir imports torch; only an export should pay for that.
        from oni_sys.atomic_io import atomic_write_bytes

        lines: list[str] = []
        with self._read() as conn:
            where, params = "", ()
            if version is not None:
                vid = self._find_version(conn, version)
                where, params = "WHERE v.id = ?", (-1 if vid is None else vid,)
            label_sql = f"""
                SELECT v.name, l.caption_id, c.text, l.label, l.probability, l.status,
                       l.attempts, l.error, l.created
                FROM labels l JOIN versions v ON v.id = l.version_id
                JOIN captions c ON c.id = l.caption_id {where}
                ORDER BY v.id, l.caption_id"""
            for name, cid, text, label, prob, status, attempts, error, created in conn.execute(
                label_sql, params
            ):
                row = {
                    "kind": "label",
                    "version": name,
                    "caption_id": _from_sql(cid),
                    "caption": text,
                    "label": label,
                    "probability": prob,
                    "status": status,
                    "attempts": attempts,
                    "error": error,
                    "created": created,
                }
                lines.append(json.dumps(row, ensure_ascii=False))
            pref_sql = f"""
                SELECT v.name, p.caption_a, p.caption_b, ca.text, cb.text, p.preference,
                       p.status, p.attempts, p.error, p.created
                FROM preferences p JOIN versions v ON v.id = p.version_id
                JOIN captions ca ON ca.id = p.caption_a
                JOIN captions cb ON cb.id = p.caption_b {where}
                ORDER BY v.id, p.caption_a, p.caption_b"""
            for name, a, b, text_a, text_b, pref, status, attempts, error, created in conn.execute(
                pref_sql, params
            ):
                row = {
                    "kind": "preference",
                    "version": name,
                    "caption_a": _from_sql(a),
                    "caption_b": _from_sql(b),
                    "caption_a_text": text_a,
                    "caption_b_text": text_b,
                    "preference": pref,
                    "status": status,
                    "attempts": attempts,
                    "error": error,
                    "created": created,
                }
                lines.append(json.dumps(row, ensure_ascii=False))
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        atomic_write_bytes(Path(path), data)
        logger.info("exported %d rows of %s to %s", len(lines), self.path, path)
        return len(lines)
