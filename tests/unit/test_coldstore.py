"""The cold stores: the in-memory reference and the file-backed one behave the same."""

from __future__ import annotations

import random

import pytest

from scheduler.coldstore import FileColdStore, MemoryColdStore


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):  # type: ignore[no-untyped-def]
    s = MemoryColdStore() if request.param == "memory" else FileColdStore(tmp_path, compact_bytes=4096)
    yield s
    s.close()


def test_put_take_discard_contains(store) -> None:  # type: ignore[no-untyped-def]
    store.put("a", 300, b"A")
    store.put("b", 100, b"B" * 50)
    assert "a" in store and "b" in store and "c" not in store and len(store) == 2
    assert store.take("b") == b"B" * 50 and "b" not in store
    assert store.take("b") is None
    store.discard("a")
    store.discard("zz")
    assert len(store) == 0 and store.next_due_ms() is None


def test_due_order_and_replacement(store) -> None:  # type: ignore[no-untyped-def]
    store.put("late", 500, b"1")
    store.put("early", 100, b"2")
    store.put("mid", 300, b"3")
    store.put("early", 400, b"2b")  # replaced: its old due time no longer counts
    assert store.next_due_ms() == 300
    assert store.due_until(299) == []
    assert store.due_until(450) == ["mid", "early"]
    assert store.take("mid") == b"3" and store.take("early") == b"2b"
    assert store.next_due_ms() == 500 and store.due_until(10_000) == ["late"]


def test_a_taken_job_is_not_due_any_more(store) -> None:  # type: ignore[no-untyped-def]
    store.put("x", 100, b"x")
    store.put("y", 200, b"y")
    assert store.take("x") == b"x"
    assert store.next_due_ms() == 200 and store.due_until(1_000) == ["y"]


def test_many_records_survive_compaction_unchanged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rnd = random.Random(7)
    file_store, ref = FileColdStore(tmp_path, compact_bytes=4096), MemoryColdStore()
    for i in range(3000):
        jid = f"job-{rnd.randrange(400)}"
        op = rnd.random()
        if op < 0.6:
            due, data = rnd.randrange(10**12, 10**12 + 10**6), bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 80)))
            file_store.put(jid, due, data)
            ref.put(jid, due, data)
        elif op < 0.8:
            assert file_store.take(jid) == ref.take(jid)
        else:
            file_store.discard(jid)
            ref.discard(jid)
        assert len(file_store) == len(ref)
    assert file_store.file_bytes < 3000 * 100  # compacted along the way
    assert file_store.next_due_ms() == ref.next_due_ms()
    until = 10**12 + 500_000
    due_f, due_r = file_store.due_until(until), ref.due_until(until)
    assert sorted(due_f) == sorted(due_r)
    for jid in due_f:
        assert file_store.take(jid) == ref.take(jid)
    file_store.close()


def test_uuid_ids_and_other_ids_are_kept_apart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = FileColdStore(tmp_path)
    u = "0f8e3c1a-5b2d-4c7e-9a10-1234567890ab"
    s.put(u, 10, b"uuid")
    s.put(u.upper(), 20, b"upper")  # not canonical: kept as a string, a different job
    s.put("nightly-report", 30, b"named")
    assert u in s and u.upper() in s and "nightly-report" in s and len(s) == 3
    assert s.due_until(100) == [u, u.upper(), "nightly-report"]
    s.put(u, 40, b"again")
    assert s.take(u) == b"again" and u not in s and s.take(u.upper()) == b"upper"
    s.close()


def test_free_memory_is_released_where_glibc_can() -> None:
    import platform

    from infra.memory import release_free_memory

    assert release_free_memory() is (platform.libc_ver()[0] == "glibc")


def test_due_until_takes_at_most_the_limit_earliest_first(store) -> None:  # type: ignore[no-untyped-def]
    for i in range(10):
        store.put(f"j{i}", 1000 - i, b"x")
    assert store.due_until(2000, limit=3) == ["j9", "j8", "j7"]
    for j in ("j9", "j8", "j7"):
        store.take(j)
    assert store.due_until(2000, limit=3) == ["j6", "j5", "j4"]


def test_long_ids_are_read_back_whole(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = FileColdStore(tmp_path)
    long_id = "nightly-" + "x" * 200
    s.put(long_id, 50, b"data")
    s.put("short", 60, b"s")
    assert s.next_due_ms() == 50 and s.due_until(55) == [long_id]
    assert s.take(long_id) == b"data" and s.next_due_ms() == 60
    s.close()


def test_memory_is_trimmed_once_a_service_goes_idle_after_work_and_not_more_often() -> None:
    from infra.memory import TrimWhenIdle

    now = [100.0]
    trims: list[float] = []
    t = TrimWhenIdle(10.0, trim=lambda: trims.append(now[0]), clock=lambda: now[0])
    assert not t.idle() and trims == []  # idle from the start: nothing to give back
    t.busy()
    assert t.idle() and trims == [100.0]  # the first idle step after work
    assert not t.idle()  # nothing new since
    t.busy()
    now[0] = 105.0
    assert not t.idle()  # worked again, but within the interval
    now[0] = 110.0
    assert t.idle() and trims == [100.0, 110.0]
