"""Registry credentials: one JSON file, created 0600, keyed by principal and registry host.

Secrets are never logged nor returned; the file is rewritten atomically (O_EXCL temp + rename)."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from pathlib import Path

import msgspec


class Credential(msgspec.Struct, kw_only=True):
    registry: str
    username: str
    token: str
    scopes: list[str] = msgspec.field(default_factory=lambda: ["pull"])
    created_at: float = 0.0

    def __repr__(self) -> str:  # keep tokens out of tracebacks and logs
        return f"Credential(registry={self.registry!r}, username={self.username!r}, token=<MASKED>)"


class CredentialStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Credential]:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return {}
        return msgspec.json.decode(raw, type=dict[str, Credential])

    def _save(self, entries: dict[str, Credential]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._path.with_name(f".{self._path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(msgspec.json.encode(entries))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    @staticmethod
    def _key(principal: str | None, registry: str) -> str:
        return f"{principal or ''}\x1f{registry}"

    def get(self, principal: str | None, registry: str) -> Credential | None:
        with self._lock:
            return self._load().get(self._key(principal, registry))

    def put(self, principal: str | None, registry: str, username: str, token: str) -> None:
        with self._lock:
            entries = self._load()
            entries[self._key(principal, registry)] = Credential(
                registry=registry, username=username, token=token, created_at=time.time()
            )
            self._save(entries)

    def delete(self, principal: str | None, registry: str) -> None:
        with self._lock:
            entries = self._load()
            if entries.pop(self._key(principal, registry), None) is not None:
                self._save(entries)
