"""Points in time: every way to name one, and every way to get it wrong."""
from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdpcore import Journal, PointError
from cdpcore.point import Point, datetime_to_us, format_us, parse_point, us_to_datetime

US = 1_704_164_645_678_901  # 2024-01-02T03:04:05.678901Z
T0 = 1_700_000_000_000_000


@pytest.fixture
def local_tz():
    """Run with a chosen local time zone; restore the process's afterwards."""
    old = os.environ.get("TZ")

    def set_tz(name: str) -> None:
        os.environ["TZ"] = name
        time.tzset()

    yield set_tz
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


def tp(value) -> int:
    p = parse_point(value)
    assert p.kind == "time"
    return p.value


def test_datetimes():
    utc = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert tp(utc) == US
    east = utc.astimezone(timezone(timedelta(hours=8)))
    assert tp(east) == US
    assert tp(datetime(1970, 1, 1, tzinfo=UTC)) == 0
    assert tp(datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)) == -1


def test_naive_datetimes_are_local_time(local_tz):
    local_tz("Asia/Shanghai")  # UTC+8, no daylight saving
    assert tp(datetime(2024, 1, 2, 11, 4, 5, 678901)) == US
    assert tp("2024-01-02T11:04:05.678901") == US
    assert tp("2024-01-02 11:04:05.678901") == US
    assert tp("2024-01-02") == int(datetime(2024, 1, 1, 16, tzinfo=UTC).timestamp()) * 10**6
    local_tz("America/New_York")  # UTC-5 in January, UTC-4 in July
    assert tp("2024-01-01T22:04:05.678901") == US
    assert tp("2024-07-01T12:00:00") == int(datetime(2024, 7, 1, 16, tzinfo=UTC).timestamp()) * 10**6
    local_tz("UTC")
    assert tp("2024-01-02T03:04:05.678901") == US


def test_iso_strings_with_zone(local_tz):
    local_tz("Asia/Shanghai")  # must not matter for these
    assert tp("2024-01-02T03:04:05.678901Z") == US
    assert tp("2024-01-02T03:04:05.678901+00:00") == US
    assert tp("2024-01-02T11:04:05.678901+08:00") == US
    assert tp("2024-01-01T22:04:05.678901-05:00") == US
    assert tp("  2024-01-02T03:04:05.678901Z\n") == US
    assert tp("2024-01-02T03:04:05Z") == US - 678901


def test_epoch_microseconds():
    assert tp(US) == US
    assert tp(str(US)) == US
    assert tp(f" {US} ") == US
    assert tp(0) == 0 and tp("0") == 0
    assert tp(-5) == -5  # before 1970 is a time like any other


def test_other_forms():
    assert parse_point("latest") == Point("latest")
    assert parse_point(" latest ") == Point("latest")
    assert parse_point("seq:0") == Point("seq", 0)
    assert parse_point("seq:42") == Point("seq", 42)
    assert parse_point("bookmark:before upgrade") == Point("bookmark", "before upgrade")
    assert parse_point("bookmark:a:b") == Point("bookmark", "a:b")
    p = Point("seq", 3)
    assert parse_point(p) is p
    assert str(Point("latest")) == "latest" and str(Point("seq", 3)) == "seq:3"
    assert str(Point("bookmark", "x")) == "bookmark:x"
    assert str(Point("time", US)) == "2024-01-02T03:04:05.678901Z"


@pytest.mark.parametrize("bad", [
    True, False, None, 3.5, b"123", [1], "", "   ", "seq:", "seq:-1", "seq:x", "seq:1.5",
    "bookmark:", "yesterday", "2024-13-01", "2024-01-02T25:00:00", "-5", "12ab", "LATEST",
    "seq 3", "latest!",
])
def test_invalid_points(bad):
    with pytest.raises(PointError):
        parse_point(bad)


@given(st.integers(-(2**61), 2**61))
def test_format_and_parse_round_trip(us):
    if not -62135596800 * 10**6 <= us <= 253402300799 * 10**6:  # years 1..9999
        return
    s = format_us(us)
    assert s.endswith("Z")
    assert tp(s) == us
    assert datetime_to_us(us_to_datetime(us)) == us


def test_format_out_of_range_does_not_raise():
    assert format_us(2**62) == f"{2**62}us"


# ---- resolve errors -----------------------------------------------------------------


def test_resolve_errors(journal_dirs):
    jpath, root = journal_dirs
    with Journal.create(jpath, root) as j:
        assert j.resolve("latest") == 0
        assert j.resolve("seq:0") == 0
        with pytest.raises(PointError):
            j.resolve(T0)  # no records yet
        with pytest.raises(PointError):
            j.resolve("seq:1")
        j.append_flush(ts=T0)
        j.bookmark("mark", ts=T0 + 10)
        j.append_flush(ts=T0 + 20)
        assert j.resolve("bookmark:mark") == 2
        with pytest.raises(PointError, match="no bookmark named 'other'"):
            j.resolve("bookmark:other")
        with pytest.raises(PointError, match="seq:4 is not in the journal"):
            j.resolve("seq:4")
        with pytest.raises(PointError, match="before the journal's first record"):
            j.resolve(T0 - 1)
        with pytest.raises(PointError):
            j.resolve(format_us(T0 - 1))
        assert j.resolve(T0) == 1 and j.resolve(T0 + 19) == 2 and j.resolve(2**62) == 3
        with pytest.raises(PointError):
            j.resolve("nonsense")
        with pytest.raises(PointError):
            list(j.records(since="bookmark:nope"))
        with pytest.raises(PointError):
            j.record(0)
        with pytest.raises(PointError):
            j.record(4)
        assert j.record(3).seq == 3
