"""Per-key usage kept across restarts in a small SQLite file (``security.usageFile``).

One row per key and UTC day. Nothing is written on the request path: a charge only adds to
the account's ``pending`` tally and makes sure a flush is due; the flush runs in a greenlet at
most once per ``FLUSH_S``, and the SQLite call itself in gevent's thread pool, so a slow disk
never stalls the hub. At start the file's totals are read back, so today's token quota and the
totals continue where they were. A file that cannot be opened or written is logged loudly
and usage is then counted in memory only: accounting must not take the gateway down.
"""

from __future__ import annotations

import atexit
import logging
import os
import sqlite3
import threading
import time
import weakref

import gevent

from app.usage import Tally, UsageBook, day_name, utc_day

log = logging.getLogger("ollama_lb.usage")
FLUSH_S = 1.0
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS usage (key TEXT NOT NULL, day TEXT NOT NULL, "
    "requests INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0, "
    "tokens_in INTEGER NOT NULL DEFAULT 0, tokens_out INTEGER NOT NULL DEFAULT 0, "
    "PRIMARY KEY (key, day))",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
UPSERT = ("INSERT INTO usage (key, day, requests, errors, tokens_in, tokens_out) "
          "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key, day) DO UPDATE SET "
          "requests = requests + excluded.requests, errors = errors + excluded.errors, "
          "tokens_in = tokens_in + excluded.tokens_in, "
          "tokens_out = tokens_out + excluded.tokens_out")


def resolve(path: str) -> str:
    """A relative path lives under systemd's ``$STATE_DIRECTORY`` (else the working dir)."""
    if os.path.isabs(path):
        return path
    base = os.environ.get("STATE_DIRECTORY", "").split(":")[0] or os.getcwd()
    return os.path.join(base, path)


class UsageStore:
    def __init__(self, path: str, book: UsageBook) -> None:
        self.path = resolve(path)
        self.book = book
        self._timer: gevent.Greenlet | None = None
        self._lock = threading.Lock()  # a real lock: writes run in pool threads and at close
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=5.0)
        for statement in SCHEMA:
            self._db.execute(statement)
        atexit.register(_close_at_exit, weakref.ref(self))

    def load(self) -> None:
        """Read the totals and today's row of every key back into the book (at start)."""
        today = utc_day()
        db = self._db
        row = db.execute("SELECT value FROM meta WHERE name = 'since'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta (name, value) VALUES ('since', ?)",
                       (repr(self.book.since),))
        else:
            self.book.since = float(row[0])
        totals = db.execute("SELECT key, SUM(requests), SUM(errors), SUM(tokens_in), "
                            "SUM(tokens_out) FROM usage GROUP BY key").fetchall()
        rows = {r[0]: Tally(*r[1:]) for r in db.execute(
            "SELECT key, requests, errors, tokens_in, tokens_out FROM usage WHERE day = ?",
            (day_name(today),))}
        for key, *sums in totals:
            self.book.restore(key, rows.get(key, Tally()), Tally(*sums), today)

    def dirty(self) -> None:
        """Something was charged: make sure a flush is due (cheap when one already is)."""
        if self._timer is None or self._timer.dead:
            self._timer = gevent.spawn_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        rows = self.book.take_pending()
        if not rows:
            return
        try:
            gevent.get_hub().threadpool.apply(self._write, (rows,))
        except Exception as exc:
            self.book.give_back(rows)
            log.error("usage file write failed; kept in memory and retried",
                      extra={"event": "usage_store", "file": self.path, "error": str(exc)})
            self.dirty()

    def _write(self, rows: list[tuple[str, int, Tally]]) -> None:
        """In a pool thread: one transaction for everything pending."""
        with self._lock:
            db = self._db
            if db is None:
                raise sqlite3.ProgrammingError("usage file closed")
            db.execute("BEGIN")
            try:
                db.executemany(UPSERT, [(key, day_name(day), t.requests, t.errors,
                                         t.tokens_in, t.tokens_out) for key, day, t in rows])
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        """Write what is pending now, on this thread, and close the file."""
        if self._timer is not None:
            self._timer.kill()
            self._timer = None
        if self._db is None:
            return
        rows = self.book.take_pending()
        try:
            if rows:
                self._write(rows)
        finally:
            with self._lock:
                self._db.close()
                self._db = None  # type: ignore[assignment]


def _close_at_exit(ref: weakref.ref[UsageStore]) -> None:
    store = ref()
    if store is not None:
        try:
            store.close()
        except Exception:  # exiting anyway: say so, lose nothing else
            log.exception("usage file not written at exit")


def open_store(path: str | None, book: UsageBook) -> UsageStore | None:
    """The store for ``security.usageFile``, loaded; None when unset or unusable."""
    if not path:
        return None
    started = time.monotonic()
    try:
        store = UsageStore(path, book)
        store.load()
    except (sqlite3.Error, OSError) as exc:
        log.error("usage file unusable; usage is counted in memory only", extra={
            "event": "usage_store", "file": resolve(path), "error": str(exc)})
        return None
    log.info("usage file loaded", extra={"event": "usage_store", "file": store.path,
                                         "keys": len(book.keys),
                                         "ms": round((time.monotonic() - started) * 1000, 1)})
    return store
