"""Points in time: how a user names a state of the protected tree.

A POINT is a datetime, an ISO 8601 string (naive means local time), an int
(or a string of digits) of epoch microseconds, "seq:N", "bookmark:NAME" or
"latest". parse_point() only parses; Journal.resolve() maps it to a seq.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal, Union

from cdpcore.errors import PointError

PointLike = Union[datetime, str, int]
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
ONE_US = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Point:
    kind: Literal["latest", "seq", "time", "bookmark"]
    value: int | str | None = None

    def __str__(self) -> str:
        if self.kind == "latest":
            return "latest"
        if self.kind == "time":
            assert isinstance(self.value, int)
            return format_us(self.value)
        return f"{self.kind}:{self.value}"


def datetime_to_us(dt: datetime) -> int:
    """Epoch microseconds of dt; a naive datetime is local time."""
    if dt.tzinfo is None:
        dt = dt.astimezone()
    return (dt - EPOCH) // ONE_US


def us_to_datetime(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def format_us(us: int) -> str:
    """ISO 8601 in UTC with microseconds: the form cdpctl prints."""
    try:
        return us_to_datetime(us).isoformat(timespec="microseconds").replace("+00:00", "Z")
    except OverflowError:
        return f"{us}us"


def parse_point(p: PointLike | Point) -> Point:
    if isinstance(p, Point):
        return p
    if isinstance(p, bool):
        raise PointError(f"invalid point {p!r}")
    if isinstance(p, datetime):
        return Point("time", datetime_to_us(p))
    if isinstance(p, int):
        return Point("time", p)
    if not isinstance(p, str):
        raise PointError(f"invalid point {p!r}: expected datetime, str or int")
    s = p.strip()
    if s == "latest":
        return Point("latest")
    if s.startswith("seq:"):
        try:
            n = int(s[4:])
        except ValueError:
            raise PointError(f"invalid point {p!r}: seq:N needs a number") from None
        if n < 0:
            raise PointError(f"invalid point {p!r}: sequence numbers are not negative")
        return Point("seq", n)
    if s.startswith("bookmark:"):
        name = s[len("bookmark:"):]
        if not name:
            raise PointError(f"invalid point {p!r}: bookmark name is empty")
        return Point("bookmark", name)
    if s.isdigit():
        return Point("time", int(s))
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise PointError(
            f"cannot parse point {p!r}: expected an ISO 8601 time, epoch microseconds, "
            "seq:N, bookmark:NAME or latest"
        ) from None
    return Point("time", datetime_to_us(dt))
