"""Byte sizes as people write them on command lines: `1048576`, `512K`, `64M`, `1G`, `2GiB`."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of `text`; K/M/G/T are binary multiples (K = 1024). ValueError when malformed."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: use bytes or a number with K, M, G or T (e.g. 512M)")
    return int(match.group(1)) * _FACTORS[match.group(2).lower()]
