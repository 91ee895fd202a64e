"""Query-string parsing for the REST server; every malformed value is a 400 naming the parameter."""

from __future__ import annotations

import re
from collections.abc import Mapping

from multidict import MultiMapping

from contree.errors import BadRequest, NotFound
from contree.timeparse import parse_time

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
MAX_INT = 2**63 - 1  # SQLite's INTEGER range: larger values are always malformed here
MAX_OFFSET = 2**62  # leaves room for offset + limit inside SQLite's range
STATUSES = ("PENDING", "ASSIGNED", "EXECUTING", "SUCCESS", "FAILED", "CANCELLED")
KINDS = ("image_import", "instance")


def flag(query: Mapping[str, str], name: str) -> bool:
    """HTTP-flag boolean: `?x` and `?x=1` enable, `?x=0` and absence disable."""
    value = query.get(name)
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in ("", "1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise BadRequest(f"invalid value for {name}: {value!r} (expected empty, 0 or 1)")


def integer(
    query: Mapping[str, str], name: str, default: int | None, *, lo: int | None = None, hi: int | None = None
) -> int | None:
    raw = query.get(name)
    if raw is None:
        return default
    return int_value(raw, name, lo=lo, hi=hi)


def int_value(
    raw: str, name: str, *, lo: int | None = None, hi: int | None = None, clamp: bool = False
) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise BadRequest(f"invalid value for {name}: {raw!r} (expected an integer)") from None
    if value > MAX_INT and not clamp:
        raise BadRequest(f"invalid value for {name}: {value} is out of range")
    if lo is not None and value < lo:
        raise BadRequest(f"invalid value for {name}: {value} (must be >= {lo})")
    if hi is not None and value > hi:
        raise BadRequest(f"invalid value for {name}: {value} (must be <= {hi})")
    return value


def paging(query: Mapping[str, str]) -> tuple[int, int]:
    limit = integer(query, "limit", 100, lo=1, hi=1000)
    raw = query.get("offset")
    # The spec sets no maximum offset: a huge one is valid and simply past the end.
    offset = min(int_value(raw, "offset", lo=0, clamp=True), MAX_OFFSET) if raw is not None else 0
    assert limit is not None
    return limit, offset


def time_filter(query: Mapping[str, str], name: str) -> str | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        parse_time(value)
    except ValueError as exc:
        raise BadRequest(f"invalid value for {name}: {exc}") from None
    return value


def required(query: Mapping[str, str], name: str) -> str:
    value = query.get(name)
    if value is None:
        raise BadRequest(f"missing required query parameter: {name}")
    if value == "":
        raise BadRequest(f"{name} must not be empty")
    return value


def repeated(query: MultiMapping[str], name: str, *, max_items: int, max_len: int | None = None) -> list[str]:
    values = list(query.getall(name, []))
    if len(values) > max_items:
        raise BadRequest(f"too many {name} values: {len(values)} (max {max_items})")
    for value in values:
        if max_len is not None and len(value) > max_len:
            raise BadRequest(f"{name} longer than {max_len} characters")
        if value == "":
            raise BadRequest(f"empty {name}")
    return values


def image_uuid(value: str, *, missing: type[Exception] = BadRequest) -> str:
    """A path UUID; endpoints whose spec lists no 400 pass `missing=NotFound`."""
    if not UUID_RE.match(value):
        raise missing(f"invalid image UUID: {value!r}")
    return value.lower()


def operation_uuid(value: str) -> str:
    if not UUID_RE.match(value):
        raise BadRequest(f"invalid operation UUID: {value!r}")
    return value.lower()


def sha256(value: str) -> str:
    if not SHA256_RE.match(value):
        raise NotFound(f"file not found: {value!r} is not a sha256 hex digest")
    return value.lower()


def status_filter(query: Mapping[str, str]) -> str | None:
    value = query.get("status")
    if value is None:
        return None
    upper = value.strip().upper()  # the spec's own example is lowercase (CONTREE-API §14 #9)
    if upper not in STATUSES:
        raise BadRequest(f"invalid status: {value!r} (expected one of {', '.join(STATUSES)})")
    return upper


def kind_filter(query: Mapping[str, str]) -> str | None:
    value = query.get("kind")
    if value is None:
        return None
    if value not in KINDS:
        raise BadRequest(f"invalid kind: {value!r} (expected image_import or instance)")
    return value
