"""`since` / `until` filter values of the Contree API.

The spec's prose says "Unix timestamp or interval", its examples are ISO 8601 and `GET /files` types
them `date-time` (CONTREE-API §14 #7), so all three forms are accepted: `2025-01-01T12:00:00+00:00`
(or `…Z`; a naive time is UTC), `1735732800` / `1735732800.5` and intervals `600s`, `15m`, `2h`, `3d`,
`1w` meaning that long before now.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from contree.errors import BadRequest

_INTERVAL = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIX = re.compile(r"^\s*\d+(\.\d+)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: str, *, now: datetime | None = None) -> datetime:
    """The UTC instant `value` denotes; ValueError (message names the value) when it is none of the forms."""
    match = _INTERVAL.match(value)
    if match:
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        try:
            return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
        except OverflowError:
            return datetime.min.replace(tzinfo=UTC)
    if _UNIX.match(value):
        try:
            return datetime.fromtimestamp(float(value), UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError(f"invalid time {value!r}: timestamp out of range") from None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"invalid time {value!r}: expected ISO 8601, unix seconds or an interval like 600s/15m/2h/3d/1w"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_interval(value: str) -> float:
    """Seconds of an interval like `600s`, `15m`, `2h`, `3d`, `1w`; ValueError naming the value."""
    match = _INTERVAL.match(value)
    if match is None:
        raise ValueError(f"invalid age {value!r}: use a number with s, m, h, d or w (e.g. 7d)")
    return float(int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def parse_timestamp(value: str, *, now: datetime | None = None) -> float:
    """`parse_time` as unix seconds (what the engine's SQLite columns compare against)."""
    return parse_time(value, now=now).timestamp()


def parse_instant(value: str, *, now: float | None = None) -> float:
    """A `since`/`until` value as unix seconds (ISO 8601, unix seconds or an interval ago); 400 if invalid."""
    try:
        return parse_timestamp(value, now=None if now is None else datetime.fromtimestamp(now, UTC))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def time_bounds(column: str, since: str | None, until: str | None) -> tuple[list[str], list[float]]:
    """The SQL conditions of a listing's `since`/`until` filters on `column` (unix seconds), and their
    arguments; 400 for an invalid value."""
    clauses: list[str] = []
    args: list[float] = []
    for value, op in ((since, ">="), (until, "<=")):
        if value:
            args.append(parse_instant(value))
            clauses.append(f"{column} {op} ?")
    return clauses, args


def isoformat(ts: float) -> str:
    """The API's timestamp format: ISO 8601 with an explicit UTC offset (`2024-01-01T12:00:00+00:00`)."""
    return datetime.fromtimestamp(ts, UTC).isoformat()
