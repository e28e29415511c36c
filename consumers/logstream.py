"""Live, bounded capture of one attempt's output as :class:`~schemas.events.LogChunk` events.

A :class:`LogStream` takes raw bytes from any number of streams (``stdout``, ``stderr``,
``system``) and hands finished chunks to a *sink* (the worker's Kafka producer; a list in
unit tests).  It knows nothing about Kafka.

Chunking
    Each stream has its own buffer.  A chunk leaves when its buffer reaches
    ``chunk_bytes`` (16 KiB), when :meth:`LogStream.flush_due` finds bytes older than
    ``flush_interval`` (200 ms; the executor's wait loop calls it several times a
    second), or when the attempt ends.  Order is exact within a stream and correct to
    within one flush interval across streams.

Decoding
    Bytes are decoded as UTF-8 with ``errors="replace"`` by an incremental decoder per
    stream, so a character split across two reads is not mangled.

Cap
    At most ``cap_bytes`` raw bytes of output (all streams together) are kept per
    attempt.  Beyond that, output is counted and discarded; the caller keeps draining
    the pipes so the child never blocks on a full pipe.  When the attempt ends, ONE
    system chunk says how much was dropped.

End
    The last chunk of a finished attempt carries ``eof=True`` (an attempt that wrote
    nothing since its last chunk gets one empty ``system`` chunk with it).  An
    interrupted attempt, which will run again elsewhere, ends without one.

Sequence numbers
    ``seq`` counts 0, 1, 2 … per stream object, i.e. per (run_id, attempt).  Chunks are
    handed to the sink under a lock in ``seq`` order, so a producer that keeps per-key
    order (idempotent producer, key run_id) writes them in order.
"""

from __future__ import annotations

import codecs
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from schemas.events import LogChunk

__all__ = ["LogStream", "RunIdentity", "STREAMS", "DEFAULT_CHUNK_BYTES", "DEFAULT_FLUSH_INTERVAL"]

STREAMS: tuple[str, ...] = ("stdout", "stderr", "system")
DEFAULT_CHUNK_BYTES = 16 * 1024
DEFAULT_FLUSH_INTERVAL = 0.2


class RunIdentity(Protocol):
    """The fields a chunk copies from the attempt it belongs to (a ``RunReady`` has them)."""

    @property
    def job_id(self) -> str: ...
    @property
    def run_id(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def user_id(self) -> str: ...
    @property
    def tenant_id(self) -> str: ...


@dataclass
class _Buffer:
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    data: bytearray = field(default_factory=bytearray)
    since: float | None = None  # clock time of the oldest unflushed byte


class LogStream:
    """Chunks, decodes and caps one attempt's output; thread-safe."""

    def __init__(
        self,
        run: RunIdentity,
        sink: Callable[[LogChunk], None],
        *,
        cap_bytes: int = 10 * 1024 * 1024,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        worker_id: str | None = None,
    ) -> None:
        if cap_bytes < 0:
            raise ValueError(f"cap_bytes must be >= 0, got {cap_bytes}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self._run = run
        self._worker_id = worker_id
        self._sink = sink
        self._cap = cap_bytes
        self._chunk = chunk_bytes
        self._interval = flush_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._buffers: dict[str, _Buffer] = {}
        self._seq = 0
        self._closed = False
        #: Raw bytes of output kept (they are in the chunks).
        self.kept_bytes = 0
        #: Raw bytes of output dropped because of the cap.
        self.discarded_bytes = 0

    # -- state ------------------------------------------------------------------------

    @property
    def truncated(self) -> bool:
        return self.discarded_bytes > 0

    @property
    def chunks_sent(self) -> int:
        return self._seq

    @property
    def closed(self) -> bool:
        return self._closed

    # -- input ------------------------------------------------------------------------

    def write(self, stream: str, data: bytes | str) -> None:
        """Output of the job (counts towards the cap)."""
        if stream not in STREAMS:
            raise ValueError(f"unknown stream {stream!r}; expected one of {', '.join(STREAMS)}")
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if not raw:
            return
        with self._lock:
            if self._closed:
                return
            room = self._cap - self.kept_bytes
            if room <= 0:
                self.discarded_bytes += len(raw)
                return
            if len(raw) > room:
                self.discarded_bytes += len(raw) - room
                raw = raw[:room]
            self.kept_bytes += len(raw)
            buf = self._buffers.get(stream)
            if buf is None:
                buf = self._buffers[stream] = _Buffer()
            if buf.since is None:
                buf.since = self._clock()
            buf.data += raw
            while len(buf.data) >= self._chunk:
                self._emit_bytes(stream, buf, self._chunk, final=False)

    def note(self, text: str) -> None:
        """A message of the worker itself (stream ``system``), outside the cap.

        Everything buffered is flushed first, so the note reads after the output it
        comments on.
        """
        with self._lock:
            if self._closed:
                return
            self._flush_all(final=False)
            self._send("system", text, eof=False)

    # -- output -----------------------------------------------------------------------

    def flush_due(self) -> None:
        """Send the buffers whose oldest byte is older than the flush interval."""
        with self._lock:
            if self._closed:
                return
            now = self._clock()
            for stream, buf in self._buffers.items():
                if buf.since is not None and now - buf.since >= self._interval:
                    self._emit_bytes(stream, buf, len(buf.data), final=False)

    def flush(self) -> None:
        """Send everything buffered now."""
        with self._lock:
            if not self._closed:
                self._flush_all(final=False)

    def close(self, *, eof: bool = True) -> None:
        """Flush, say what the cap dropped, and (normally) mark the last chunk ``eof``.

        ``eof=False`` is for an attempt that was interrupted and will run again
        elsewhere: its log is not complete, so nobody should stop following it.
        """
        with self._lock:
            if self._closed:
                return
            sink = self._sink
            last: list[LogChunk] = []
            if eof:
                # Hold back the last chunk so that it carries the eof flag itself: one record
                # per attempt fewer than a separate empty eof chunk.
                def hold(chunk: LogChunk) -> None:
                    if last:
                        sink(last.pop())
                    last.append(chunk)

                self._sink = hold
            try:
                self._flush_all(final=True)
                if self.discarded_bytes:
                    self._send(
                        "system",
                        f"[output truncated at {self._cap} bytes; {self.discarded_bytes} more bytes discarded]",
                        eof=False,
                    )
            finally:
                self._sink = sink
            if eof:
                if last:
                    sink(replace(last[0], eof=True))
                else:
                    self._send("system", "", eof=True)
            self._closed = True

    # -- internals (lock held) --------------------------------------------------------

    def _flush_all(self, *, final: bool) -> None:
        for stream, buf in self._buffers.items():
            self._emit_bytes(stream, buf, len(buf.data), final=final)

    def _emit_bytes(self, stream: str, buf: _Buffer, n: int, *, final: bool) -> None:
        piece = bytes(buf.data[:n])
        del buf.data[:n]
        buf.since = self._clock() if buf.data else None
        text = buf.decoder.decode(piece, final)
        if text:
            self._send(stream, text, eof=False)

    def _send(self, stream: str, text: str, *, eof: bool) -> None:
        r = self._run
        chunk = LogChunk(
            user_id=r.user_id,
            tenant_id=r.tenant_id,
            job_id=r.job_id,
            run_id=r.run_id,
            attempt=r.attempt,
            seq=self._seq,
            stream=stream,
            data=text,
            eof=eof,
            worker_id=self._worker_id,
        )
        self._seq += 1
        self._sink(chunk)
