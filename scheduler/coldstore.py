"""Where a scheduler keeps jobs that are only waiting for a time far ahead.

A pending job due in an hour needs nothing from the scheduler until shortly before
then, except to be found if a command names it (cancel, pause, a dependency).  Holding
its decoded spec costs about a kilobyte of Python objects; a partition owner with a
million such jobs would hold a gigabyte.  So :class:`~scheduler.state.PartitionState`
moves such "cold" jobs into a store that keeps only their encoded changelog record
(the same bytes as in ``jobs.state``), and takes them back — decodes them — when a
command names them or when their due time comes within the state's horizon.

Two stores implement the same small interface:

* :class:`MemoryColdStore`: a dict, for tests of the state machine;
* :class:`FileColdStore`: the records in an unlinked temporary file, read back with
  ``pread``; in memory only an index entry per job (the id, the file offset, and one
  int in a due-time heap), about 200 bytes.  The file is a cache of the changelog: it
  disappears with the process, and a new owner of the partition rebuilds it from
  ``jobs.state``.
"""

from __future__ import annotations

import heapq
import os
import struct
import tempfile
from pathlib import Path
from typing import Protocol

__all__ = ["ColdStore", "MemoryColdStore", "FileColdStore"]


class ColdStore(Protocol):
    """Encoded records of cold jobs, by job id, ordered by due time."""

    def put(self, job_id: str, due_ms: int, data: bytes) -> None:
        """Store (or replace) a job's record."""

    def take(self, job_id: str) -> bytes | None:
        """Remove a job and return its record (None if it is not here)."""

    def discard(self, job_id: str) -> None:
        """Remove a job if it is here."""

    def __contains__(self, job_id: object) -> bool: ...

    def __len__(self) -> int: ...

    def next_due_ms(self) -> int | None:
        """The earliest due time held."""

    def due_until(self, until_ms: int, limit: int | None = None) -> list[str]:
        """Ids of the (at most ``limit``) earliest jobs due at or before ``until_ms``,
        earliest first; the caller takes each of them."""

    def close(self) -> None:
        """Release what the store holds."""


class MemoryColdStore:
    """The reference store: everything in a dict."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[int, bytes]] = {}

    def put(self, job_id: str, due_ms: int, data: bytes) -> None:
        self._items[job_id] = (due_ms, bytes(data))

    def take(self, job_id: str) -> bytes | None:
        item = self._items.pop(job_id, None)
        return None if item is None else item[1]

    def discard(self, job_id: str) -> None:
        self._items.pop(job_id, None)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def next_due_ms(self) -> int | None:
        return min((d for d, _ in self._items.values()), default=None)

    def due_until(self, until_ms: int, limit: int | None = None) -> list[str]:
        due = [j for j, (d, _) in sorted(self._items.items(), key=lambda kv: kv[1][0]) if d <= until_ms]
        return due if limit is None else due[:limit]

    def ids(self) -> list[str]:
        """Every job id held (for tests)."""
        return list(self._items)

    def close(self) -> None:
        self._items.clear()


_HEX = frozenset("0123456789abcdef")


def _compact_id(job_id: str) -> str | bytes:
    """The index key of a job id: a canonical UUID string (the default id) as its 16 bytes
    (49 bytes of memory instead of 85); any other id as it is.  Bytes never equal a str,
    so the two forms cannot collide."""
    if len(job_id) == 36 and job_id[8] == job_id[13] == job_id[18] == job_id[23] == "-":
        h = job_id.replace("-", "")
        if len(h) == 32 and _HEX.issuperset(h):
            return bytes.fromhex(h)
    return job_id


# Record layout in the file: length of the rest (u32), due ms (i64), id length (u16), id, data.
_HEAD = struct.Struct("<IqH")
_OFFSET_BITS = 40  # heap key = due_ms << 40 | file offset: files up to 1 TiB
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1


class FileColdStore:
    """Records in an unlinked temporary file; an id -> key index and a heap of keys in memory.

    A key is one int, ``due_ms << 40 | file offset``, shared by the index and the heap.

    The file only grows while the process runs; when more than half of it (and over
    ``compact_bytes``) is dead records, the live ones are copied to a fresh file.
    """

    def __init__(self, directory: Path | str | None = None, *, compact_bytes: int = 64 * 1024 * 1024) -> None:
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self._dir = str(directory) if directory is not None else None
        self._compact_bytes = compact_bytes
        self._open()

    def _open(self) -> None:
        self._file = tempfile.TemporaryFile(dir=self._dir, prefix="jobsched-cold-")
        self._fd = self._file.fileno()
        self._end = 0
        self._live = 0
        self._index: dict[str | bytes, int] = {}
        self._heap: list[int] = []
        #: Counts changes, so that a checked heap top is re-checked only after one.
        self._changes = 0
        self._top: tuple[int, int | None] | None = None

    # -- io -------------------------------------------------------------------------------

    def _append(self, job_id: str, due_ms: int, data: bytes) -> int:
        jid = job_id.encode()
        rec = _HEAD.pack(8 + 2 + len(jid) + len(data), due_ms, len(jid)) + jid + data
        off = self._end
        os.pwrite(self._fd, rec, off)
        self._end += len(rec)
        self._live += len(rec)
        return off

    def _read(self, off: int) -> tuple[int, str, bytes, int]:
        """(due, id, data, record size) of the record at ``off``."""
        head = os.pread(self._fd, _HEAD.size, off)
        size, due, jlen = _HEAD.unpack(head)
        body = os.pread(self._fd, size - 10, off + _HEAD.size)
        return due, body[:jlen].decode(), body[jlen:], 4 + size

    def _read_id(self, off: int) -> str:
        """The job id of the record at ``off``, without its data (one read for ids up to 64 bytes)."""
        buf = os.pread(self._fd, _HEAD.size + 64, off)
        jlen = _HEAD.unpack_from(buf)[2]
        if jlen > 64:
            buf = os.pread(self._fd, _HEAD.size + jlen, off)
        return buf[_HEAD.size:_HEAD.size + jlen].decode()

    def _dead(self, off: int) -> None:
        head = os.pread(self._fd, _HEAD.size, off)
        self._live -= 4 + _HEAD.unpack(head)[0]

    # -- the interface ----------------------------------------------------------------------

    def put(self, job_id: str, due_ms: int, data: bytes) -> None:
        self._changes += 1
        k = _compact_id(job_id)
        old = self._index.get(k)
        if old is not None:
            self._dead(old & _OFFSET_MASK)
        key = (due_ms << _OFFSET_BITS) | self._append(job_id, due_ms, data)
        self._index[k] = key
        heapq.heappush(self._heap, key)
        if self._end > self._compact_bytes and self._end > 2 * self._live:
            self._compact()

    def take(self, job_id: str) -> bytes | None:
        key = self._index.pop(_compact_id(job_id), None)
        if key is None:
            return None
        self._changes += 1
        _, _, data, size = self._read(key & _OFFSET_MASK)
        self._live -= size
        return data

    def discard(self, job_id: str) -> None:
        key = self._index.pop(_compact_id(job_id), None)
        if key is not None:
            self._changes += 1
            self._dead(key & _OFFSET_MASK)

    def __contains__(self, job_id: object) -> bool:
        return isinstance(job_id, str) and _compact_id(job_id) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def _live_top(self) -> int | None:
        """The heap's first key that belongs to a live record (stale keys are dropped)."""
        if self._top is not None and self._top[0] == self._changes:
            return self._top[1]  # nothing changed since it was checked: no file read
        heap = self._heap
        key: int | None = None
        while heap:
            jid = self._read_id(heap[0] & _OFFSET_MASK)
            if self._index.get(_compact_id(jid)) == heap[0]:
                key = heap[0]
                break
            heapq.heappop(heap)
        self._top = (self._changes, key)
        return key

    def next_due_ms(self) -> int | None:
        key = self._live_top()
        return None if key is None else key >> _OFFSET_BITS

    def due_until(self, until_ms: int, limit: int | None = None) -> list[str]:
        out: list[str] = []
        last = ((until_ms + 1) << _OFFSET_BITS) - 1
        heap = self._heap
        while heap and heap[0] <= last and (limit is None or len(out) < limit):
            self._changes += 1
            key = heapq.heappop(heap)
            jid = self._read_id(key & _OFFSET_MASK)
            if self._index.get(_compact_id(jid)) == key:
                out.append(jid)
        return out

    def _compact(self) -> None:
        old_fd, old_file, old_index = self._fd, self._file, self._index
        self._open()
        keys = []
        for k, old_key in old_index.items():
            off = old_key & _OFFSET_MASK
            head = os.pread(old_fd, _HEAD.size, off)
            size, due, jlen = _HEAD.unpack(head)
            body = os.pread(old_fd, size - 10, off + _HEAD.size)
            key = (due << _OFFSET_BITS) | self._append(body[:jlen].decode(), due, body[jlen:])
            self._index[k] = key
            keys.append(key)
        heapq.heapify(keys)
        self._heap = keys
        self._changes += 1
        old_file.close()

    @property
    def file_bytes(self) -> int:
        return self._end

    def close(self) -> None:
        self._index.clear()
        self._heap.clear()
        self._file.close()
