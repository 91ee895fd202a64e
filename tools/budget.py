"""How big a tool result may be: an agent's context window is the budget.

Claude Code and Codex hand the model `structuredContent` (the text block is dropped) and Claude Code
refuses results above ~25,000 tokens, so every tool's *default* result stays within `RESULT_BUDGET`
bytes of JSON, pretty-printed as the text block is (which bounds the compact structured form too).
A caller who asks for more explicitly (`max_bytes`, `max_total`, `truncate_output_at`) gets up to the
server's `--read-max-bytes`. Every cut result says so and says how to get the rest.
"""

from __future__ import annotations

from typing import Any

import msgspec

RESULT_BUDGET = 64 * 1024
_encoder = msgspec.json.Encoder()


def result_size(value: Any) -> int:
    """Bytes of `value` as the text block renders it (JSON, indent 2)."""
    return len(msgspec.json.format(_encoder.encode(value), indent=2))


def keep_fitting(value: Any, items: list[Any], budget: int) -> int:
    """Shorten `items` (a list inside `value`) in place to the longest head with which `value` fits
    `budget`; returns how many were dropped."""
    if result_size(value) <= budget:
        return 0
    everything, lo, hi = list(items), 0, len(items)  # lo items fit, hi + 1 do not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        items[:] = everything[:mid]
        lo, hi = (mid, hi) if result_size(value) <= budget else (lo, mid - 1)
    items[:] = everything[:lo]
    return len(everything) - lo


def json_len(text: str) -> int:
    """Bytes of `text` as a JSON string (quotes and escapes included)."""
    return len(_encoder.encode(text))


def fit_prefix(text: str, budget: int) -> str:
    """The longest prefix of `text` whose JSON string form takes at most `budget` bytes."""
    return _fit(text, budget, head=True)


def fit_suffix(text: str, budget: int) -> str:
    """The longest suffix of `text` whose JSON string form takes at most `budget` bytes."""
    return _fit(text, budget, head=False)


def _fit(text: str, budget: int, *, head: bool) -> str:
    if json_len(text) <= budget:
        return text
    lo, hi = 0, len(text)  # characters kept: lo fits, hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        part = text[:mid] if head else text[len(text) - mid :]
        if json_len(part) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] if head else text[len(text) - lo :]


def utf8_boundary(data: bytes, cut: int) -> int:
    """The largest character boundary <= `cut` in UTF-8 `data` (never splits a multi-byte character)."""
    cut = min(cut, len(data))
    back = cut
    while back > 0 and back > cut - 4 and back < len(data) and data[back] & 0xC0 == 0x80:
        back -= 1
    if back < len(data) and data[back] & 0xC0 == 0x80:
        return cut  # not UTF-8 here: no boundary to find, cut where asked
    return back


def skip_continuation(data: bytes) -> bytes:
    """`data` without the (at most 3) continuation bytes of a character cut off at its start."""
    start = 0
    while start < min(3, len(data)) and data[start] & 0xC0 == 0x80:
        start += 1
    return data[start:]


def as_text(data: bytes) -> str:
    """Output bytes as text: UTF-8, a character cut off at the start dropped, bad bytes replaced."""
    return skip_continuation(data).decode("utf-8", errors="replace")


def fit_bytes(data: bytes, budget: int, *, head: bool) -> int:
    """How many bytes of `data`'s head (or tail) fit `budget` as a JSON string of `as_text`; a head never
    ends inside a character (a tail's cut character is dropped by `as_text`)."""

    def part(n: int) -> bytes:
        return data[:n] if head else data[len(data) - n :]

    if json_len(as_text(data)) <= budget:
        return len(data)
    lo, hi = 0, len(data)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if json_len(as_text(part(mid))) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return utf8_boundary(data, lo) if head else lo
