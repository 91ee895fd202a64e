from datetime import UTC, datetime

import pytest

from contree.timeparse import isoformat, parse_time, parse_timestamp

NOW = datetime(2026, 1, 10, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-01-01T12:00:00+00:00", datetime(2025, 1, 1, 12, tzinfo=UTC)),
        ("2025-01-01T14:00:00+02:00", datetime(2025, 1, 1, 12, tzinfo=UTC)),
        ("2025-01-01T12:00:00Z", datetime(2025, 1, 1, 12, tzinfo=UTC)),
        ("2025-01-01T12:00:00", datetime(2025, 1, 1, 12, tzinfo=UTC)),
        ("1735732800", datetime(2025, 1, 1, 12, tzinfo=UTC)),
        ("1735732800.5", datetime(2025, 1, 1, 12, 0, 0, 500000, tzinfo=UTC)),
        ("600s", datetime(2026, 1, 10, 11, 50, tzinfo=UTC)),
        ("15m", datetime(2026, 1, 10, 11, 45, tzinfo=UTC)),
        ("2h", datetime(2026, 1, 10, 10, tzinfo=UTC)),
        ("3d", datetime(2026, 1, 7, 12, tzinfo=UTC)),
        ("1w", datetime(2026, 1, 3, 12, tzinfo=UTC)),
    ],
)
def test_accepted_forms(value: str, expected: datetime) -> None:
    assert parse_time(value, now=NOW) == expected


@pytest.mark.parametrize("value", ["", "abc", "15x", "-5m", "1.5h", "2025-13-01", "99999999999999999999"])
def test_invalid_values_raise_value_error(value: str) -> None:
    with pytest.raises(ValueError, match="invalid time"):
        parse_time(value, now=NOW)


def test_huge_interval_clamps_instead_of_overflowing() -> None:
    assert parse_time("999999999999w", now=NOW).year == 1


def test_timestamp_round_trip() -> None:
    ts = parse_timestamp("2025-01-01T12:00:00+00:00")
    assert ts == 1735732800.0
    assert isoformat(ts) == "2025-01-01T12:00:00+00:00"
