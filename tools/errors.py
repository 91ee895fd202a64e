"""Backend errors → tool errors the model can act on (never a backend traceback)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from contree.errors import BackendError, Forbidden, NotFound, Unauthorized
from protocol.errors import ToolError

log = logging.getLogger(__name__)


@contextmanager
def backend_errors(what: str = "") -> Iterator[None]:
    try:
        yield
    except BackendError as exc:
        log.debug("backend error %s: %s", exc.status, exc.message)
        prefix = f"{what}: " if what else ""
        if isinstance(exc, NotFound):
            raise ToolError(f"{prefix}not found ({exc.message})") from None
        if isinstance(exc, Forbidden):
            raise ToolError(f"{prefix}permission denied ({exc.message}); check whoami") from None
        if isinstance(exc, Unauthorized):
            raise ToolError(f"{prefix}authentication failed ({exc.message})") from None
        raise ToolError(f"{prefix}{exc.message} (status {exc.status})") from None
