"""The service's scans and their states, in SQLite (WAL) under the service's state directory.

One row a scan: its id, name, options, corpus and output paths, state and progress. The
scheduler's thread writes states and progress; the HTTP handlers read, insert and mark
cancellation. Every call opens its own short transaction, so readers never wait behind a
scan, and a service killed at any moment leaves the table as of its last commit: on restart
queued scans stay queued and running ones are queued again, to resume from their manifests.

A full disk: one connection stays open for the store's life, so the log (WAL) and its index
stay on disk and the table is read without creating a file; a write that finds no room
checkpoints the log and writes again from the log's beginning, over space the file already
holds. What still cannot be written (a row past the space the files hold) raises `StateFull`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "running", "completed", "failed", "cancelled"
STATES = (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)
ENDED = (COMPLETED, FAILED, CANCELLED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS scans (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    name TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    options TEXT NOT NULL,
    corpus TEXT NOT NULL,
    out TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT,
    cancel INTEGER NOT NULL DEFAULT 0,
    prompts_total INTEGER NOT NULL DEFAULT 0,
    prompts_done INTEGER NOT NULL DEFAULT 0,
    tokens_done INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0
)
"""


@dataclass
class Scan:
    """One row of the table."""

    id: str
    name: str
    state: str
    options: dict[str, Any]
    """The scan's own options (thresholds, cap, top-k...), as submitted."""
    corpus: str
    out: str
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    cancel: bool = False
    prompts_total: int = 0
    prompts_done: int = 0
    tokens_done: int = 0
    seconds: float = 0.0
    """Seconds spent running (all attempts), for the rate."""
    seq: int = field(default=0, compare=False)


class StateFull(Exception):
    """The table cannot be written: its disk (the service's state directory) is full or failing."""


def _no_room(err: sqlite3.Error) -> bool:
    """Whether SQLite failed for want of room (or a failing disk). Python 3.10's errors carry
    no code name: their message says it."""
    name = getattr(err, "sqlite_errorname", "")
    return (
        name == "SQLITE_FULL"
        or name.startswith("SQLITE_IOERR")
        or str(err) in ("database or disk is full", "disk I/O error")
    )


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # one writer at a time within this process
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
        # Idle, never in a transaction: while it is open the last connection to close does not
        # remove the log and its index, which a new connection could not create on a full disk.
        self._held = sqlite3.connect(self.path, check_same_thread=False)
        self._held.execute("SELECT 1 FROM scans LIMIT 1").fetchall()

    def close(self) -> None:
        self._held.close()

    @contextmanager
    def _connect(self):
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                db.row_factory = sqlite3.Row
                # In WAL mode NORMAL loses no committed transaction when the process is killed (only,
                # at worst, the last ones on a power cut) and spares an fsync on every commit.
                db.execute("PRAGMA synchronous=NORMAL")
                yield db
            finally:
                db.close()
        except sqlite3.OperationalError as err:
            if not _no_room(err):
                raise
            raise StateFull(
                f"the service's table {self.path} cannot be written ({err}): free space on its disk, or check the disk "
                "(the service's --state, by default under --results)"
            ) from None

    def _write(self, sql: str, args: tuple) -> int:
        with self.lock, self._connect() as db:
            try:
                return _transaction(db, sql, args)
            except sqlite3.OperationalError as err:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if not _no_room(err):
                    raise
            # No room to grow the log: copy it into the table, so that the next write starts
            # the log again from its beginning, then write once more.
            db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            return _transaction(db, sql, args)

    def add(self, scan: Scan) -> bool:
        """Insert ``scan``; False when its name is taken (checked by the table, so two requests
        with one name cannot both get it)."""
        try:
            self._write(
                "INSERT INTO scans (id, name, state, options, corpus, out, submitted_at, prompts_total) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    scan.id,
                    scan.name,
                    scan.state,
                    json.dumps(scan.options),
                    scan.corpus,
                    scan.out,
                    scan.submitted_at,
                    scan.prompts_total,
                ),
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def get(self, scan_id: str) -> Scan | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM scans WHERE id = ?", (scan_id,)).fetchone()
        return _scan(row) if row else None

    def find(self, prefix: str) -> list[Scan]:
        """The scans whose id starts with ``prefix`` (the CLI takes a short id)."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM scans WHERE id LIKE ? ORDER BY seq", (prefix + "%",)).fetchall()
        return [_scan(r) for r in rows]

    def all(self) -> list[Scan]:
        with self._connect() as db:
            return [_scan(r) for r in db.execute("SELECT * FROM scans ORDER BY seq").fetchall()]

    def position(self, scan_id: str) -> int:
        """A queued scan's place in the queue (1: next to start)."""
        with self._connect() as db:
            row = db.execute(
                "SELECT COUNT(*) FROM scans WHERE state = ? AND seq <= (SELECT seq FROM scans WHERE id = ?)",
                (QUEUED, scan_id),
            ).fetchone()
        return row[0]

    def end(self, scan_id: str, state: str, error: str | None = None) -> None:
        """Mark a scan ended: completed, failed (with its ``error`` line) or cancelled. (A scan
        is queued by `add` or `requeue` and runs from `start`.)"""
        if state not in ENDED:
            raise ValueError(f"{state!r} is not an end state: {ENDED}")
        self._write(
            "UPDATE scans SET state = ?, finished_at = ?, error = ? WHERE id = ?", (state, time.time(), error, scan_id)
        )

    def start(self, scan_id: str) -> bool:
        """Mark a queued scan running; False when it is no longer queued (cancelled meanwhile)."""
        return bool(
            self._write(
                "UPDATE scans SET state = ?, started_at = COALESCE(started_at, ?) WHERE id = ? AND state = ?",
                (RUNNING, time.time(), scan_id, QUEUED),
            )
        )

    def cancel_queued(self, scan_id: str) -> bool:
        """Cancel a scan that has not started; False when it is no longer queued."""
        return bool(
            self._write(
                "UPDATE scans SET state = ?, finished_at = ?, error = ? WHERE id = ? AND state = ?",
                (CANCELLED, time.time(), "cancelled before it started", scan_id, QUEUED),
            )
        )

    def requeue(self, scan_id: str) -> bool:
        """Queue a cancelled or failed scan again (it resumes from its manifest); False when it
        is in another state. It keeps its place in submission order."""
        return bool(
            self._write(
                "UPDATE scans SET state = ?, finished_at = NULL, error = NULL, cancel = 0 "
                "WHERE id = ? AND state IN (?, ?)",
                (QUEUED, scan_id, CANCELLED, FAILED),
            )
        )

    def delete(self, scan_id: str) -> bool:
        """Remove an ended scan's row; False when it is queued or running (or gone already)."""
        return bool(self._write("DELETE FROM scans WHERE id = ? AND state IN (?, ?, ?)", (scan_id, *ENDED)))

    def progress(self, scan_id: str, total: int, done: int, tokens: int, seconds: float) -> None:
        self._write(
            "UPDATE scans SET prompts_total = ?, prompts_done = ?, tokens_done = ?, seconds = ? WHERE id = ?",
            (total, done, tokens, seconds, scan_id),
        )

    def request_cancel(self, scan_id: str) -> None:
        self._write("UPDATE scans SET cancel = 1 WHERE id = ?", (scan_id,))

    def requeue_running(self) -> list[str]:
        """After a restart: scans that were running are queued again (they resume from their
        manifests); returns their ids."""
        with self._connect() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM scans WHERE state = ?", (RUNNING,)).fetchall()]
        self._write("UPDATE scans SET state = ? WHERE state = ?", (QUEUED, RUNNING))
        return ids


def _transaction(db: sqlite3.Connection, sql: str, args: tuple) -> int:
    db.execute("BEGIN IMMEDIATE")
    cursor = db.execute(sql, args)
    db.execute("COMMIT")
    return cursor.rowcount


def _scan(row: sqlite3.Row) -> Scan:
    values = dict(row)
    values["options"] = json.loads(values["options"])
    values["cancel"] = bool(values["cancel"])
    return Scan(**values)
