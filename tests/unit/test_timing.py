"""Due-time arithmetic: durations, instants, cron under DST, backoff."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.errors import ValidationError
from scheduler.timing import (
    backoff_ms,
    fires_between,
    iso,
    next_cron_ms,
    parse_duration_ms,
    parse_instant_ms,
    validate_cron,
    wall_to_instant_ms,
    zone,
)

UTC = timezone.utc
MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000


def utc_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def wall(ms: int, tz: str) -> str:
    """Local wall clock and offset of an instant, e.g. ``2026-03-08T03:00-04:00``."""
    return datetime.fromtimestamp(ms / 1000, ZoneInfo(tz)).isoformat(timespec="minutes")


# ------------------------------------------------------------------------------ durations


@pytest.mark.parametrize(("text", "ms"), [
    ("250ms", 250), ("90s", 90_000), ("5m", 300_000), ("1h30m", 5_400_000), ("2d", 172_800_000),
    ("1w", 604_800_000), ("10", 10_000), ("1.5", 1_500), ("0.5s", 500), (" 1H 30M ", 5_400_000),
    ("1h 30m 10s", 5_410_000), ("0", 0), ("0s", 0),
])
def test_parse_duration(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["", "   ", "abc", "5x", "m5", "5m garbage", "1h-30m", "-5s", "5 minutes",
                                  "s", "1..5s", "5m?"])
def test_parse_duration_refuses_garbage_with_an_example(text: str) -> None:
    with pytest.raises(ValidationError, match=r"empty duration|bad duration .*use e\.g\. 30s, 5m, 1h30m, 250ms"):
        parse_duration_ms(text)


def test_parse_duration_names_the_bad_text() -> None:
    with pytest.raises(ValidationError, match=r"bad duration '5 parsecs'"):
        parse_duration_ms("5 parsecs")
    with pytest.raises(ValidationError, match="empty duration"):
        parse_duration_ms(" ")


# ------------------------------------------------------------------------------- instants


@pytest.mark.parametrize(("text", "ms"), [
    ("2026-01-01T00:00:00Z", 1_767_225_600_000),
    ("2026-01-01T00:00:00z", 1_767_225_600_000),
    ("2026-01-01T01:00:00+01:00", 1_767_225_600_000),
    ("2025-12-31T19:00:00-05:00", 1_767_225_600_000),
    ("2026-01-01T00:00:00.250+00:00", 1_767_225_600_250),
])
def test_parse_instant(text: str, ms: int) -> None:
    assert parse_instant_ms(text) == ms


def test_parse_instant_refuses_a_naive_time_and_says_how_to_fix_it() -> None:
    with pytest.raises(ValidationError, match=r"time '2026-01-01T00:00:00' has no UTC offset: add one"):
        parse_instant_ms("2026-01-01T00:00:00")


@pytest.mark.parametrize("text", ["tomorrow", "", "2026-13-01T00:00:00Z", "2026-01-01 25:00+00:00", "12:00Z"])
def test_parse_instant_refuses_garbage_with_an_example(text: str) -> None:
    with pytest.raises(ValidationError, match=r"bad time .*use ISO-8601 with an offset"):
        parse_instant_ms(text)


def test_iso_round_trips_with_parse_instant() -> None:
    assert iso(None) is None
    assert iso(1_767_225_600_250) == "2026-01-01T00:00:00.250Z"
    assert parse_instant_ms(iso(1_767_225_600_250) or "") == 1_767_225_600_250


# ----------------------------------------------------------------------------- cron / zones


def test_zone_refuses_unknown_names() -> None:
    assert zone("Europe/Berlin") == ZoneInfo("Europe/Berlin")
    for bad in ("Mars/Olympus", "", "../etc/passwd", "Europe"):
        with pytest.raises(ValidationError, match="unknown time zone .*IANA name"):
            zone(bad)


@pytest.mark.parametrize("expr", ["* * * * *", "30 2 * * *", "*/15 9-17 * * 1-5", "0 0 1 1 *", "@daily",
                                  "@hourly", "5,35 * * * *"])
def test_validate_cron_accepts(expr: str) -> None:
    validate_cron(expr)


@pytest.mark.parametrize(("expr", "message"), [
    ("", "empty cron expression"),
    ("   ", "empty cron expression"),
    ("* * * *", "expected 5 fields"),
    ("0 * * * * *", "expected 5 fields"),
    ("61 * * * *", r"bad cron expression '61 \* \* \* \*'"),
    ("* 25 * * *", "bad cron expression"),
    ("a b c d e", "bad cron expression"),
    ("@fortnightly", "bad cron expression"),
])
def test_validate_cron_refuses(expr: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        validate_cron(expr)


def test_next_cron_is_strictly_after() -> None:
    t = utc_ms("2026-05-05T10:00:00")
    assert next_cron_ms("0 * * * *", "UTC", t) == t + HOUR
    assert next_cron_ms("0 * * * *", "UTC", t - 1) == t
    assert next_cron_ms("*/15 * * * *", "UTC", t + 1) == t + 15 * MIN


def test_next_cron_reads_the_expression_in_the_zone() -> None:
    t = utc_ms("2026-07-01T00:00:00")
    # 09:00 in New York in summer is 13:00 UTC; in Berlin 07:00 UTC; in Sydney (winter) 23:00 UTC the day before.
    assert next_cron_ms("0 9 * * *", "America/New_York", t) == utc_ms("2026-07-01T13:00:00")
    assert next_cron_ms("0 9 * * *", "Europe/Berlin", t) == utc_ms("2026-07-01T07:00:00")
    assert next_cron_ms("0 9 * * *", "Australia/Sydney", t) == utc_ms("2026-07-01T23:00:00")


def test_fires_between_is_half_open_and_limited() -> None:
    t = utc_ms("2026-05-05T10:00:00")
    assert fires_between("0 * * * *", "UTC", t, t + 3 * HOUR) == [t + HOUR, t + 2 * HOUR, t + 3 * HOUR]
    assert fires_between("0 * * * *", "UTC", t - 1, t) == [t]
    assert fires_between("0 * * * *", "UTC", t, t + HOUR - 1) == []
    assert fires_between("* * * * *", "UTC", t, t + DAY, limit=5) == [t + i * MIN for i in range(1, 6)]


# --- DST: spring forward (skipped wall time) ----------------------------------------------

#: zone, transition instant (UTC) of spring-forward 2026, the skipped hour's wall clock
SPRING = [
    ("America/New_York", "2026-03-08T07:00:00", 2),   # 02:00 EST -> 03:00 EDT
    ("Europe/Berlin", "2026-03-29T01:00:00", 2),      # 02:00 CET -> 03:00 CEST
    ("Australia/Sydney", "2026-10-03T16:00:00", 2),   # 02:00 AEST -> 03:00 AEDT (southern spring)
]
#: zone, transition instant (UTC) of fall-back 2026, the repeated hour's wall clock
FALL = [
    ("America/New_York", "2026-11-01T06:00:00", 1),   # 02:00 EDT -> 01:00 EST: 01:xx twice
    ("Europe/Berlin", "2026-10-25T01:00:00", 2),      # 03:00 CEST -> 02:00 CET: 02:xx twice
    ("Australia/Sydney", "2026-04-04T16:00:00", 2),   # 03:00 AEDT -> 02:00 AEST: 02:xx twice
]


def _assert_one_per_day(fires: list[int], tz: str, days: int) -> None:
    """None lost, none doubled: exactly one fire on each of ``days`` consecutive local dates."""
    dates = [datetime.fromtimestamp(t / 1000, ZoneInfo(tz)).date() for t in fires]
    assert len(dates) == days
    assert all(b - a == timedelta(days=1) for a, b in zip(dates, dates[1:]))


@pytest.mark.parametrize(("tz", "transition", "hour"), SPRING)
def test_skipped_daily_time_runs_once_at_the_transition(tz: str, transition: str, hour: int) -> None:
    tr = utc_ms(transition)
    expr = f"30 {hour} * * *"
    fires = fires_between(expr, tz, tr - 2 * DAY - 2 * HOUR, tr + 2 * DAY + 2 * HOUR)
    assert tr in fires  # the day of the gap: at the transition instant
    _assert_one_per_day(fires, tz, 5)
    for t in fires:
        if t != tr:
            assert wall(t, tz)[11:16] == f"{hour:02d}:30"
    assert wall(tr, tz)[11:16] == f"{hour + 1:02d}:00"


@pytest.mark.parametrize(("tz", "transition", "hour"), SPRING)
def test_wall_time_in_the_gap_maps_to_the_transition(tz: str, transition: str, hour: int) -> None:
    tr = utc_ms(transition)
    day = datetime.fromtimestamp(tr / 1000, ZoneInfo(tz)).date()
    for minute in (0, 1, 15, 30, 59):
        w = datetime(day.year, day.month, day.day, hour, minute)
        assert wall_to_instant_ms(w, ZoneInfo(tz)) == tr
    # Just outside the gap: ordinary times.
    before = datetime(day.year, day.month, day.day, hour - 1, 59)
    assert wall_to_instant_ms(before, ZoneInfo(tz)) == tr - MIN


@pytest.mark.parametrize(("tz", "transition", "hour"), SPRING)
def test_quarter_hours_inside_the_gap_collapse_into_one_run(tz: str, transition: str, hour: int) -> None:
    tr = utc_ms(transition)
    fires = fires_between("*/15 * * * *", tz, tr - HOUR, tr + HOUR)
    # Four wall times before the gap, then :00/:15/:30/:45 of the skipped hour collapse with the
    # next hour's :00 into the transition instant, then :15/:30/:45/:00 as usual.
    assert fires == [tr - 45 * MIN, tr - 30 * MIN, tr - 15 * MIN, tr, tr + 15 * MIN, tr + 30 * MIN,
                     tr + 45 * MIN, tr + HOUR]
    assert fires.count(tr) == 1


def test_quarter_hours_inside_the_gap_collapse_even_without_a_natural_run_at_the_transition() -> None:
    # 02:10, 02:25, 02:40, 02:55 New York on 2026-03-08 do not exist: one run at 03:00 EDT.
    tr = utc_ms("2026-03-08T07:00:00")
    fires = fires_between("10-59/15 * * * *", "America/New_York", tr - HOUR, tr + HOUR)
    assert [wall(t, "America/New_York")[11:] for t in fires] == [
        "01:10-05:00", "01:25-05:00", "01:40-05:00", "01:55-05:00",
        "03:00-04:00",
        "03:10-04:00", "03:25-04:00", "03:40-04:00", "03:55-04:00"]


# --- DST: fall back (repeated wall time) -------------------------------------------------


@pytest.mark.parametrize(("tz", "transition", "hour"), FALL)
def test_repeated_daily_time_runs_once_at_its_first_occurrence(tz: str, transition: str, hour: int) -> None:
    tr = utc_ms(transition)
    expr = f"30 {hour} * * *"
    fires = fires_between(expr, tz, tr - 2 * DAY - 2 * HOUR, tr + 2 * DAY + 2 * HOUR)
    _assert_one_per_day(fires, tz, 5)
    assert all(wall(t, tz)[11:16] == f"{hour:02d}:30" for t in fires)
    # On the transition day: the first occurrence (summer offset) is half an hour before the
    # transition; the second occurrence, half an hour after, does not fire.
    assert tr - 30 * MIN in fires
    assert tr + 30 * MIN not in fires


@pytest.mark.parametrize(("tz", "transition", "hour"), FALL)
def test_next_cron_from_inside_the_repeated_hour(tz: str, transition: str, hour: int) -> None:
    tr = utc_ms(transition)
    expr = f"30 {hour} * * *"
    # Asked from the second 00:10 of the repeated hour: the 30 was already run (first time round),
    # so the next run is tomorrow's, not the repeated one 20 minutes away.
    nxt = next_cron_ms(expr, tz, tr + 10 * MIN)
    assert nxt != tr + 30 * MIN
    assert nxt == tr - 30 * MIN + DAY + HOUR  # same wall time tomorrow, one hour further in UTC
    # Asked from the first occurrence's :10: the first :30 is next.
    assert next_cron_ms(expr, tz, tr - 50 * MIN) == tr - 30 * MIN


@pytest.mark.parametrize(("tz", "transition", "hour"), FALL)
def test_half_hourly_through_the_repeated_hour_never_goes_back(tz: str, transition: str, hour: int) -> None:
    tr = utc_ms(transition)
    fires = fires_between("*/30 * * * *", tz, tr - 2 * HOUR, tr + 2 * HOUR)
    # The first pass through the repeated hour fires :00 and :30; the second pass does not.
    assert fires == [tr - 90 * MIN, tr - HOUR, tr - 30 * MIN, tr + HOUR, tr + 90 * MIN, tr + 2 * HOUR]


# --- DST property: agreement with a brute-force reading of the rules ----------------------

DST_WEEKS = [utc_ms(t) - 3 * DAY for _, t, _ in SPRING + FALL]
ZONES_OF_WEEKS = [tz for tz, _, _ in SPRING + FALL]


def _reference(minutes: set[int], hours: set[int], tz_name: str, after: int, until: int) -> list[int]:
    """Every fire in (after, until], from a minute-by-minute walk of UTC (no croniter, no fold)."""
    tz = ZoneInfo(tz_name)
    first_instant: dict[datetime, int] = {}  # wall clock -> first UTC instant showing it
    offsets: list[tuple[int, timedelta | None]] = []
    t = (after - 3 * HOUR) // MIN * MIN
    while t <= until + 3 * HOUR:
        local = datetime.fromtimestamp(t / 1000, tz)
        first_instant.setdefault(local.replace(tzinfo=None), t)
        offsets.append((t, local.utcoffset()))
        t += MIN
    jumps = [t1 for (_, o0), (t1, o1) in zip(offsets, offsets[1:]) if o1 is not None and o0 is not None and o1 > o0]
    out: set[int] = set()
    w = min(first_instant)
    end = max(first_instant)
    while w <= end:
        if w.minute in minutes and w.hour in hours:
            if w in first_instant:
                out.add(first_instant[w])
            else:  # shown by no instant: skipped by spring-forward (the window holds one transition)
                assert len(jumps) == 1
                out.add(jumps[0])
        w += timedelta(minutes=1)
    return sorted(x for x in out if after < x <= until)


@settings(max_examples=60, deadline=None)
@given(
    week=st.sampled_from(range(len(DST_WEEKS))),
    offset_min=st.integers(0, 6 * 24 * 60),
    span_h=st.integers(1, 30),
    minutes=st.sets(st.integers(0, 59), min_size=1, max_size=4),
    hours=st.sets(st.integers(0, 23), min_size=1, max_size=6),
)
def test_cron_through_dst_matches_a_brute_force_reference(
        week: int, offset_min: int, span_h: int, minutes: set[int], hours: set[int]) -> None:
    tz = ZONES_OF_WEEKS[week]
    after = DST_WEEKS[week] + offset_min * MIN + 7_000  # not on a minute boundary
    until = after + span_h * HOUR
    expr = f"{','.join(map(str, sorted(minutes)))} {','.join(map(str, sorted(hours)))} * * *"
    got = fires_between(expr, tz, after, until)
    assert got == sorted(set(got))  # strictly increasing
    assert got == _reference(minutes, hours, tz, after, until)
    if got:
        assert next_cron_ms(expr, tz, after) == got[0]


@settings(max_examples=40, deadline=None)
@given(week=st.sampled_from(range(len(DST_WEEKS))), offset_min=st.integers(0, 6 * 24 * 60),
       step=st.sampled_from([5, 7, 15, 20, 30]))
def test_consecutive_fires_strictly_increase_and_are_never_more_than_a_step_plus_an_hour_apart(
        week: int, offset_min: int, step: int) -> None:
    tz = ZONES_OF_WEEKS[week]
    start = DST_WEEKS[week] + offset_min * MIN
    fires = fires_between(f"*/{step} * * * *", tz, start, start + 6 * HOUR)
    assert fires and fires[0] > start
    gaps = [b - a for a, b in zip(fires, fires[1:])]
    assert all(g > 0 for g in gaps)
    assert all(g <= step * MIN + HOUR for g in gaps)


# --------------------------------------------------------------------------------- backoff


@given(attempt=st.integers(1, 40), base=st.integers(0, 10**7), cap_extra=st.integers(0, 10**8),
       seed=st.text(max_size=40))
def test_backoff_is_between_half_and_all_of_the_capped_exponential(
        attempt: int, base: int, cap_extra: int, seed: str) -> None:
    cap = base + cap_extra
    exp = min(cap, base * 2 ** (attempt - 1))
    d = backoff_ms(attempt, base, cap, seed)
    assert exp // 2 <= d <= exp
    assert d == backoff_ms(attempt, base, cap, seed)  # replaying computes the same delay


def test_backoff_doubles_until_the_cap() -> None:
    lows = [backoff_ms(a, 1000, 60_000, "j@1") for a in range(1, 12)]
    for a, d in enumerate(lows, start=1):
        exp = min(60_000, 1000 * 2 ** (a - 1))
        assert exp / 2 <= d <= exp
    assert max(lows) <= 60_000
    assert backoff_ms(50, 1000, 60_000, "j@1") >= 30_000


def test_backoff_jitter_spreads_runs_and_attempts() -> None:
    delays = {backoff_ms(3, 10_000, 300_000, f"job-{i}@0") for i in range(200)}
    assert len(delays) > 150  # different runs retry at different times
    assert min(delays) >= 20_000 and max(delays) <= 40_000
    assert backoff_ms(1, 10_000, 10_000, "x") != backoff_ms(2, 10_000, 10_000, "x")  # attempt is in the seed


def test_backoff_attempt_below_one_is_the_base() -> None:
    assert 500 <= backoff_ms(0, 1000, 60_000, "s") <= 1000
    assert backoff_ms(3, 0, 0, "s") == 0
