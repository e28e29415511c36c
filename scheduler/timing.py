"""Due-time arithmetic: cron in a time zone, DST rules, durations, backoff.

Cron expressions are read as *wall-clock* times in the job's IANA zone, then mapped
to instants with two rules for daylight-saving transitions:

* A wall time that does not exist (skipped by spring-forward) runs once, at the first
  valid instant after the gap, i.e. the transition itself.  Several skipped wall times
  (``*/15`` inside the gap) collapse into that one run.
* A wall time that occurs twice (repeated by fall-back) runs once, at its first
  occurrence.

All instants are epoch milliseconds (UTC).  Nothing here reads a clock: callers pass
"now", so the scheduler state machine stays deterministic and testable.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from infra.errors import ValidationError

_UTC = timezone.utc
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration_ms(text: str) -> int:
    """``"90s"``, ``"5m"``, ``"1h30m"``, ``"250ms"``, or plain seconds ``"10"`` -> milliseconds."""
    s = text.strip().lower()
    if not s:
        raise ValidationError("empty duration")
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return int(float(s) * 1000)
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos and s[pos:m.start()].strip():
            break
        total += float(m.group(1)) * _UNIT_MS[m.group(2)]
        pos = m.end()
    if pos == 0 or s[pos:].strip():
        raise ValidationError(f"bad duration {text!r}: use e.g. 30s, 5m, 1h30m, 250ms")
    return int(total)


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    """The IANA zone, or a ValidationError that names it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, IsADirectoryError):
        raise ValidationError(f"unknown time zone {name!r} (use an IANA name such as Europe/Paris)") from None


def validate_cron(expr: str) -> None:
    """Refuse an expression croniter cannot read, with the reason."""
    if not expr or not expr.strip():
        raise ValidationError("empty cron expression")
    fields = expr.split()
    if not expr.startswith("@") and len(fields) != 5:
        raise ValidationError(
            f"bad cron expression {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week)"
        )
    if not croniter.is_valid(expr):
        raise ValidationError(f"bad cron expression {expr!r}")


def _offset_s(instant_s: int, tz: ZoneInfo) -> float:
    off = datetime.fromtimestamp(instant_s, tz).utcoffset()
    return off.total_seconds() if off is not None else 0.0


def wall_to_instant_ms(wall: datetime, tz: ZoneInfo) -> int:
    """The instant a naive wall-clock time means in ``tz``, by the DST rules above."""
    first = wall.replace(tzinfo=tz, fold=0)
    back = first.astimezone(_UTC).astimezone(tz).replace(tzinfo=None)
    if back == wall:
        return int(first.timestamp() * 1000)  # exists; fold=0 is the first occurrence
    # In a gap: fold=1 maps with the offset after the transition (an earlier instant),
    # fold=0 with the one before (a later instant).  The transition lies between.
    lo = int(wall.replace(tzinfo=tz, fold=1).timestamp())
    hi = int(first.timestamp())
    if lo > hi:
        lo, hi = hi, lo
    before = _offset_s(lo, tz)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset_s(mid, tz) == before:
            lo = mid
        else:
            hi = mid
    return hi * 1000


def _instants_after(expr: str, tz_name: str, after_ms: int):  # type: ignore[no-untyped-def]
    """Nominal fire instants strictly after ``after_ms``, in increasing order, forever."""
    tz = zone(tz_name)
    wall = datetime.fromtimestamp(after_ms / 1000, tz).replace(tzinfo=None)
    # No wall time before `after`'s own maps to an instant after it (a repeated hour maps
    # to its first occurrence, a skipped one to the transition), so croniter can start
    # there; candidates at or before `after` (a repeated hour's second pass) are skipped.
    it = croniter(expr, wall - timedelta(seconds=1))
    last = after_ms
    misses = 0
    while misses < 100_000:
        instant = wall_to_instant_ms(it.get_next(datetime), tz)
        if instant > last:
            misses = 0
            last = instant
            yield instant
        else:
            misses += 1
    raise ValidationError(f"cron expression {expr!r} never fires")


@lru_cache(maxsize=4096)
def next_cron_ms(expr: str, tz_name: str, after_ms: int) -> int:
    """The first nominal fire instant strictly after ``after_ms``.

    Remembered: the crons that share an expression and a zone and have just fired ask the
    same question (every ``0 * * * *`` job at the top of the hour, every job of a restored
    partition), and croniter takes 60-160 µs to answer it, most of it parsing the
    expression again.  Without this, a thousand such crons firing at one instant spent
    over 80 % of their firing step here.
    """
    return int(next(_instants_after(expr, tz_name, after_ms)))


def fires_between(expr: str, tz_name: str, after_ms: int, until_ms: int, limit: int = 10_000) -> list[int]:
    """Nominal instants in (after_ms, until_ms], oldest first, at most ``limit``."""
    out: list[int] = []
    if until_ms <= after_ms:
        return out
    for t in _instants_after(expr, tz_name, after_ms):
        if t > until_ms or len(out) >= limit:
            break
        out.append(t)
    return out


def backoff_ms(attempt: int, base_ms: int, max_ms: int, seed: str) -> int:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, jittered.

    "Equal jitter": half the exponential delay is fixed, the other half random, so
    retries of many failed jobs spread out but never come sooner than half the base.
    The randomness is derived from ``seed`` (the run id), so replaying the same events
    computes the same delay.
    """
    exp = min(max_ms, base_ms * (2 ** max(0, attempt - 1)))
    h = int.from_bytes(hashlib.blake2b(f"{seed}#{attempt}".encode(), digest_size=8).digest(), "big")
    frac = h / 2**64
    return int(exp / 2 + frac * exp / 2)


def iso(ms: int | None) -> str | None:
    """ISO-8601 UTC for an epoch-millisecond instant."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, _UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_instant_ms(text: str) -> int:
    """An ISO-8601 timestamp *with* an offset (or Z) -> epoch milliseconds."""
    s = text.strip()
    if s.endswith("Z") or s.endswith("z"):
        s = s[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise ValidationError(f"bad time {text!r}: use ISO-8601 with an offset, e.g. 2026-12-24T18:00:00+01:00") from None
    if dt.tzinfo is None:
        raise ValidationError(f"time {text!r} has no UTC offset: add one (e.g. +01:00 or Z)")
    return int(dt.timestamp() * 1000)
