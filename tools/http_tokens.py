"""`--http-tokens-file`: one bearer token per HTTP client, each mapped to the principal its state is kept
under (operations, directory states, lineage, registry credentials)."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

log = logging.getLogger(__name__)


class TokensFileError(ValueError):
    pass


def load_tokens(path: Path) -> dict[str, str]:
    """token → principal from lines `<principal> <token>`; blank lines and `#` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensFileError(f"cannot read the HTTP tokens file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; chmod 600 it", path)
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokensFileError(f"{path}:{number}: expected '<principal> <token>'")
        principal, token = parts
        if token in tokens:
            raise TokensFileError(f"{path}:{number}: this token is already given to {tokens[token]!r}")
        if principal in tokens.values():
            raise TokensFileError(f"{path}:{number}: principal {principal!r} appears twice")
        tokens[token] = principal
    if not tokens:
        raise TokensFileError(f"{path} holds no '<principal> <token>' line")
    return tokens
