"""Typed backend errors shared by the engine, the REST client and the REST server."""

from __future__ import annotations


class BackendError(Exception):
    """An error with the HTTP status the Contree API uses for it."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message


class BadRequest(BackendError):
    status = 400


class Unauthorized(BackendError):
    status = 401


class Forbidden(BackendError):
    status = 403


class NotFound(BackendError):
    status = 404


class Conflict(BackendError):
    status = 409


class Gone(BackendError):
    status = 410


class Unprocessable(BackendError):
    status = 422


class TooEarly(BackendError):
    status = 425


class RateLimited(BackendError):
    status = 429


class Unavailable(BackendError):
    status = 503


_BY_STATUS: dict[int, type[BackendError]] = {
    cls.status: cls
    for cls in (
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, Gone, Unprocessable, TooEarly, RateLimited,
    )
}


def error_for_status(status: int, message: str, *, retry_after: float | None = None) -> BackendError:
    """The typed error for an HTTP status (5xx → Unavailable keeping the real status)."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = Unavailable if status >= 500 else BackendError
    return cls(message, status=status, retry_after=retry_after)
