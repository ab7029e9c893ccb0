"""One error hierarchy for the whole daemon.

Every error a user can cause carries a stable snake_case ``code`` and an HTTP status; the API middleware
turns it into ``{"error": {"code", "message"}}`` and the client turns that into exit status 125.
"""
from __future__ import annotations


class MicrovmError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(MicrovmError):
    status = 400
    code = "bad_request"


class NotFound(MicrovmError):
    status = 404
    code = "not_found"


class Conflict(MicrovmError):
    status = 409
    code = "conflict"


class InvalidState(Conflict):
    code = "invalid_state"


class RequestTimeout(MicrovmError):
    status = 408
    code = "timeout"


class PayloadTooLarge(MicrovmError):
    status = 413
    code = "payload_too_large"


class Unprocessable(MicrovmError):
    """The request was well formed but its content (a module, a snapshot) is not acceptable."""

    status = 422
    code = "unprocessable"


class NotImplementedYet(MicrovmError):
    status = 501
    code = "not_implemented"


class ShuttingDown(MicrovmError):
    """The daemon is stopping: new work is refused (retry against the daemon that replaces it)."""

    status = 503
    code = "shutting_down"


class InsufficientStorage(MicrovmError):
    status = 507
    code = "insufficient_storage"
