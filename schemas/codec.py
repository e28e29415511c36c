"""Avro single-object encoding of the event contract.

Every record on every topic is ``C3 01`` + the 8-byte little-endian CRC-64-AVRO
fingerprint of the writer schema's parsing canonical form + the Avro binary body.
A reader looks the fingerprint up among the schemas it knows (the current ones in
``schemas/`` and older versions in ``schemas/history/``) and resolves the writer's
schema to its own current version of the same record, so records written by older
code stay readable, and readers need no schema registry.

Deploy readers before writers: a reader that has never seen a writer's schema cannot
resolve it, and such a record goes to the dead-letter topic rather than being guessed at.
"""

from __future__ import annotations

import io
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable

import fastavro
import fastavro.schema
import orjson

from infra.errors import DecodeError, EncodeError
from schemas.events import EVENT_TYPES, STATE_TYPES, VALUE_TYPES, Event

#: Records that may stand alone in a message.
TOP_LEVEL: dict[str, type] = {**EVENT_TYPES, **STATE_TYPES}

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
SCHEMA_DIR = Path(__file__).resolve().parent
HISTORY_DIR = SCHEMA_DIR / "history"


def fingerprint(schema: Any) -> bytes:
    """The 8 bytes that name a schema in single-object encoding."""
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    # fastavro renders the 64-bit Rabin fingerprint as hex of its little-endian bytes,
    # which is exactly the byte order single-object encoding puts on the wire.
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


def _load_dir(path: Path) -> list[tuple[str, Any]]:
    """(record name, schema) for every ``.avsc`` of a folder, references expanded.

    A file may refer to named types defined in other files of the same folder
    (``io.jobsched.Name.avsc``).  History files (``schemas/history/*.avsc``) hold one
    older version of a record each, fully expanded.
    """
    out: list[tuple[str, Any]] = []
    for file in sorted(path.glob("*.avsc")):
        schema = fastavro.schema.load_schema(str(file), _write_hint=False)
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise EncodeError(f"{file}: not a record schema")
        out.append((schema["name"], schema))
    return out


_COMMON_STRINGS = frozenset({"user_id", "tenant_id", "name", "queue", "priority", "kind", "target", "kwargs_json",
                             "timezone", "overlap", "catchup", "cron", "status", "worker_id", "method", "url"})
_SHARED_VALUES = frozenset({"ExecutorSpec", "PythonSpec", "RetryPolicy"})
#: Bound on each sharing cache (cleared when exceeded): sharing saves memory, never leaks it.
_SHARE_LIMIT = 100_000


class _Shape:
    """How one record maps to its Python class: which fields hold nested records."""

    __slots__ = ("cls", "names", "nested", "lists", "unions", "common", "shared")

    def __init__(self, cls: type, schema: dict[str, Any]) -> None:
        self.cls = cls
        self.names = tuple(f.name for f in fields(cls))
        #: String fields whose values repeat across records: one copy of each is kept.
        self.common = tuple(n for n in self.names if n in _COMMON_STRINGS)
        #: Immutable value records: equal ones decode to one shared instance.
        self.shared = schema["name"].rsplit(".", 1)[-1] in _SHARED_VALUES
        self.nested: dict[str, type] = {}  # field -> class of a (nullable) record
        self.lists: dict[str, type] = {}  # field -> class of an array's record items
        #: Fields whose record sits in a union (a nullable record): encoded as a
        #: (full name, fields) pair, so fastavro writes that branch without first
        #: validating the value against each branch (half the cost of encoding a spec).
        self.unions: dict[str, str] = {}
        for f in schema["fields"]:
            typ = f["type"]
            for b in typ if isinstance(typ, list) else [typ]:
                if isinstance(b, dict) and b.get("type") == "record":
                    self.nested[f["name"]] = VALUE_TYPES[b["name"]]
                    if isinstance(typ, list):
                        self.unions[f["name"]] = b["name"]
                elif isinstance(b, dict) and b.get("type") == "array" and isinstance(b["items"], dict) \
                        and b["items"].get("type") == "record":
                    self.lists[f["name"]] = VALUE_TYPES[b["items"]["name"]]


class Codec:
    """Encodes events to single-object Avro and decodes any known writer version."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR, history_dirs: Iterable[Path] = (HISTORY_DIR,)) -> None:
        current = dict(_load_dir(schema_dir))
        self._writer: dict[str, tuple[bytes, Any]] = {}  # avro name -> (header, parsed schema)
        self._readers: dict[bytes, tuple[str, Any, Any]] = {}  # fingerprint -> (name, writer, reader)
        self._shapes: dict[str, _Shape] = {}
        self._strings: dict[str, str] = {}
        self._values: dict[tuple[Any, ...], Any] = {}
        for name, schema in current.items():
            parsed = fastavro.parse_schema(schema)
            fp = fingerprint(schema)
            self._readers[fp] = (name, parsed, parsed)
            cls = TOP_LEVEL.get(name) or VALUE_TYPES.get(name)
            if cls is not None:
                self._shapes[name] = _Shape(cls, schema)
            if name in TOP_LEVEL:
                self._writer[name] = (MAGIC + fp, parsed)
        for d in history_dirs:
            if not d.is_dir():
                continue
            for name, schema in _load_dir(d):
                if name not in current:
                    continue
                fp = fingerprint(schema)
                if fp not in self._readers:
                    reader = self._readers[fingerprint(current[name])][2]
                    self._readers[fp] = (name, fastavro.parse_schema(schema), reader)

    # -- encoding ---------------------------------------------------------------------

    def encode(self, event: Any) -> bytes:
        """Single-object Avro bytes for an event."""
        header_schema = self._writer.get(getattr(event, "avro_name", ""))
        if header_schema is None:
            raise EncodeError(f"{type(event).__name__} has no schema in the contract")
        header, schema = header_schema
        buf = io.BytesIO()
        buf.write(header)
        try:
            fastavro.schemaless_writer(buf, schema, self._to_dict(event))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise EncodeError(f"{type(event).__name__} does not fit its schema: {e}") from e
        return buf.getvalue()

    def _to_dict(self, value: Any) -> dict[str, Any]:
        shape = self._shapes["io.jobsched." + type(value).__name__]
        out = {}
        for n in shape.names:
            v = getattr(value, n)
            if v is not None:
                if n in shape.nested:
                    v = self._to_dict(v)
                    if n in shape.unions:
                        v = (shape.unions[n], v)
                elif n in shape.lists:
                    v = [self._to_dict(x) for x in v]
            out[n] = v
        return out

    # -- decoding ---------------------------------------------------------------------

    def schema_name(self, data: bytes) -> str:
        """The Avro record name a message was written with, without decoding its body."""
        return self._lookup(data)[0]

    def _lookup(self, data: bytes) -> tuple[str, Any, Any]:
        if data is None or len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("not Avro single-object encoded (missing C3 01 header)")
        try:
            return self._readers[bytes(data[2:HEADER_LEN])]
        except KeyError:
            raise DecodeError(f"unknown writer schema fingerprint {bytes(data[2:HEADER_LEN]).hex()}") from None

    def decode_dict(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """(record name, fields as a dict resolved to the current schema)."""
        name, writer, reader = self._lookup(data)
        buf = io.BytesIO(data)
        buf.seek(HEADER_LEN)
        try:
            # Same schema on both sides (the usual case): no resolution step needed.
            record = fastavro.schemaless_reader(buf, writer, None if reader is writer else reader)
        except Exception as e:  # fastavro raises many types on corrupt bodies
            raise DecodeError(f"corrupt {name} body: {type(e).__name__}: {e}") from e
        if buf.tell() != len(data):
            raise DecodeError(f"{name} body has {len(data) - buf.tell()} trailing bytes")
        return name, record  # type: ignore[return-value]

    def decode(self, data: bytes) -> Event:
        """The event a message holds, as its Python class."""
        name, record = self.decode_dict(data)
        if name not in EVENT_TYPES:
            raise DecodeError(f"{name} is not an event")
        return self._from_dict(name, record)  # type: ignore[no-any-return]

    def decode_state(self, data: bytes) -> Any:
        """A scheduler changelog record."""
        name, record = self.decode_dict(data)
        if name not in STATE_TYPES:
            raise DecodeError(f"{name} is not a state record")
        return self._from_dict(name, record)

    def _from_dict(self, name: str, record: dict[str, Any]) -> Any:
        shape = self._shapes[name]
        for n, cls in shape.nested.items():
            v = record.get(n)
            if v is not None:
                record[n] = self._from_dict("io.jobsched." + cls.__name__, v)
        for n, cls in shape.lists.items():
            v = record.get(n)
            if v:
                record[n] = [self._from_dict("io.jobsched." + cls.__name__, x) for x in v]
        # A scheduler holds a million pending specs: equal small values (user, queue, zone,
        # executor, retry policy) are kept once, not once per job.
        strs = self._strings
        for n in shape.common:
            v = record.get(n)
            if v is not None:
                record[n] = strs.setdefault(v, v)
        if len(strs) > _SHARE_LIMIT:
            strs.clear()
        try:
            if shape.shared:
                try:
                    key = (name, *record.values())
                    hit = self._values.get(key)
                except TypeError:  # a list or map inside: not shareable
                    return shape.cls(**record)
                if hit is None:
                    if len(self._values) > _SHARE_LIMIT:
                        self._values.clear()
                    hit = self._values[key] = shape.cls(**record)
                return hit
            return shape.cls(**record)
        except TypeError as e:
            raise DecodeError(f"{name} does not match its Python class: {e}") from e

    def to_json(self, event: Event) -> str:
        """A JSON rendering for people and audits (``jobsched replay --json``)."""
        # The type, then the fields in class order.  orjson renders the dataclass itself
        # (nested records included), several times faster than a dict and ``json``.
        body = orjson.dumps(event)
        return f'{{"type":"{event.avro_name.rsplit(".", 1)[-1]}",{body[1:].decode()}'


_default: Codec | None = None


def default_codec() -> Codec:
    """The process-wide codec over the shipped schemas (built on first use)."""
    global _default
    if _default is None:
        _default = Codec()
    return _default
