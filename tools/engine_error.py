"""When the engine cannot start, a stdio client still gets an answer it can show: every request is
answered with a JSON-RPC error carrying the one-line reason, until the client closes stdin."""

from __future__ import annotations

import sys
from typing import IO, Any

import msgspec

from protocol.errors import INTERNAL_ERROR


def answer_with_error(message: str, stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None) -> None:
    reader = stdin if stdin is not None else sys.stdin.buffer
    writer = stdout if stdout is not None else sys.stdout.buffer
    error = {"code": INTERNAL_ERROR, "message": message}
    for line in reader:
        try:
            incoming: Any = msgspec.json.decode(line)
        except msgspec.DecodeError:
            continue
        for item in incoming if isinstance(incoming, list) else [incoming]:
            if isinstance(item, dict) and "method" in item and item.get("id") is not None:
                reply = {"jsonrpc": "2.0", "id": item["id"], "error": error}
                writer.write(msgspec.json.encode(reply) + b"\n")
        writer.flush()
