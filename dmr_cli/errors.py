"""The exception tree.

Every failure the user can see is a `DmrError`. Each class carries the HTTP status the daemon
answers with and the exit code the CLI ends with, so the daemon's routes and the CLI's single
error boundary (`cli.main`) translate errors the same way everywhere.

Exit codes (documented in the README):
    0  success
    1  any other error
    2  usage error (bad flags or arguments)
    3  the daemon is not running or cannot be reached
    4  the model or reference does not exist
    5  authentication with a registry failed
    6  a conflict (model in use, must be forced, pull already running)
"""

from __future__ import annotations


class DmrError(Exception):
    status: int = 500
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InvalidReference(DmrError):
    status = 400
    exit_code = 2


class BadRequest(DmrError):
    status = 400


class NotFound(DmrError):
    status = 404
    exit_code = 4


class ModelNotFound(NotFound):
    pass


class Unauthorized(DmrError):
    status = 401
    exit_code = 5


class Conflict(DmrError):
    status = 409
    exit_code = 6


class UnsupportedMediaType(DmrError):
    """A model whose config media type this version cannot read (DMR answers 422)."""

    status = 422


class RegistryError(DmrError):
    """The registry answered with an error or could not be reached."""

    status = 500

    def __init__(
        self, message: str, *, hint: str | None = None, http_status: int | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.http_status = http_status

    @property
    def retryable(self) -> bool:
        return self.http_status is None or self.http_status in (502, 503, 504)


class DigestMismatch(DmrError):
    """Downloaded bytes do not hash to the digest the manifest promised."""

    status = 500


class StoreError(DmrError):
    status = 500


class DiskFull(StoreError):
    status = 507

    def __init__(self, message: str = "no space left on device", *, hint: str | None = None):
        super().__init__(
            message,
            hint=hint
            or "free some space (dmr df shows what the store uses) and pull again: "
            "completed layers are kept",
        )


class DaemonUnavailable(DmrError):
    exit_code = 3
    status = 503


class Cancelled(DmrError):
    status = 499
