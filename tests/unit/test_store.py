"""cluster.store: the service's scans in a real SQLite file (WAL), as a restart finds them."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from cluster.store import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, Scan, StateFull, Store
from tests.conftest import fill


def _scan(i: int) -> Scan:
    return Scan(
        id=f"{i:012x}",
        name=f"s{i}",
        state=QUEUED,
        options={"high": 2.0 + i},
        corpus=f"c{i}.jsonl",
        out=f"out/s{i}",
        submitted_at=time.time(),
    )


def test_scans_round_trip_in_submission_order_and_survive_a_new_store(tmp_path):
    store = Store(tmp_path / "scans.sqlite")
    for i in range(3):
        store.add(_scan(i))
    assert store.start(_scan(1).id)
    store.progress(_scan(1).id, 10, 4, 400, 2.0)
    again = Store(tmp_path / "scans.sqlite")  # the service started again
    scans = again.all()
    assert [s.name for s in scans] == ["s0", "s1", "s2"] and scans[0].options == {"high": 2.0}
    assert (scans[1].state, scans[1].prompts_done, scans[1].tokens_done) == (RUNNING, 4, 400)
    assert scans[1].started_at is not None and scans[0].started_at is None
    assert again.requeue_running() == [_scan(1).id]
    assert again.get(_scan(1).id).state == QUEUED
    assert sqlite3.connect(tmp_path / "scans.sqlite").execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_find_by_prefix_cancel_and_ends(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    store.add(_scan(0xABC))
    store.add(_scan(0xABD))
    assert len(store.find("000000000ab")) == 2 and [s.name for s in store.find("000000000abd")] == [f"s{0xABD}"]
    store.request_cancel(_scan(0xABC).id)
    assert store.get(_scan(0xABC).id).cancel
    store.end(_scan(0xABC).id, CANCELLED, "cancelled")
    store.end(_scan(0xABD).id, COMPLETED)
    ended = {s.name: (s.state, s.error, s.finished_at is not None) for s in store.all()}
    assert ended == {f"s{0xABC}": (CANCELLED, "cancelled", True), f"s{0xABD}": (COMPLETED, None, True)}
    assert not store.add(_scan(0xABC))  # its name is taken


def test_writers_on_threads_do_not_lose_updates(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    ids = [_scan(i).id for i in range(8)]
    for i in range(8):
        store.add(_scan(i))

    def work(scan_id):
        for n in range(20):
            store.progress(scan_id, 20, n + 1, 0, 0.0)

    threads = [threading.Thread(target=work, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {s.prompts_done for s in store.all()} == {20}


def test_a_name_is_taken_once_even_by_two_writers(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    assert store.add(_scan(1))
    twin = _scan(2)
    twin.name = _scan(1).name
    assert not store.add(twin) and [s.id for s in store.all()] == [_scan(1).id]


def test_a_scan_starts_or_is_cancelled_before_it_starts_never_both(tmp_path):
    """The admission thread's start and a user's cancel race for a queued scan: one wins."""
    store = Store(tmp_path / "s.sqlite")
    for i in range(2):
        store.add(_scan(i))
    assert store.start(_scan(0).id) and not store.cancel_queued(_scan(0).id)
    assert store.get(_scan(0).id).state == RUNNING
    assert store.cancel_queued(_scan(1).id) and not store.start(_scan(1).id)
    cancelled = store.get(_scan(1).id)
    assert (cancelled.state, cancelled.error, cancelled.started_at) == (CANCELLED, "cancelled before it started", None)


def test_a_queued_scans_position_counts_the_queued_scans_before_it(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    for i in range(4):
        store.add(_scan(i))
    store.start(_scan(0).id)
    store.cancel_queued(_scan(2).id)
    assert [store.position(_scan(i).id) for i in (1, 3)] == [1, 2]


def test_on_a_full_disk_the_table_is_read_and_updated_and_a_row_past_its_room_is_one_line(tmpfs):
    """A real tmpfs, full: every row is read, and updated (a scan's start, progress, end), as
    often as need be; a new row past the room the files hold raises `StateFull`; with room
    again rows are added."""
    disk = tmpfs("256k")
    store = Store(disk / "scans.sqlite")
    for i in range(3):
        store.add(_scan(i))
    ballast = fill(disk)
    assert [s.name for s in store.all()] == ["s0", "s1", "s2"]
    scan_id = _scan(1).id
    for n in range(500):
        assert store.start(scan_id)
        store.progress(scan_id, 500, n, 10 * n, n / 10)
        store.end(scan_id, FAILED, f"writing part {n} failed (No space left on device)")
        assert store.requeue(scan_id)
    assert (store.get(scan_id).prompts_done, store.get(scan_id).state) == (499, QUEUED)
    with pytest.raises(StateFull, match=r"table .*scans.sqlite cannot be written \(.*\): free space on its disk"):
        for i in range(3, 1000):
            store.add(_scan(i))
    added = len(store.all())
    ballast.unlink()
    store.add(_scan(1000))
    assert len(store.all()) == added + 1
    store.close()
