"""The AgentError tree: the one home of the error codes used on the wire."""

from __future__ import annotations

from typing import ClassVar

import msgspec

__all__ = [
    "AgentError",
    "AuditWriteFailed",
    "BadSignature",
    "CameraOffline",
    "ChecksumMismatch",
    "DeployFailed",
    "DownloadFailed",
    "ErrorInfo",
    "Expired",
    "IncompatibleModel",
    "Internal",
    "Interrupted",
    "InvalidChunk",
    "InvalidModel",
    "InvalidPayload",
    "ModelNotFound",
    "ModelWriteFailed",
    "PayloadTooLarge",
    "ReplayWindowFull",
    "RetainedCommand",
    "SessionTakenOver",
    "ShuttingDown",
    "StateUnreadable",
    "StateWriteFailed",
    "StorageFull",
    "Unauthorized",
    "UnknownCamera",
    "UnknownStream",
    "UploadNotFound",
    "UploadTimeout",
    "clip",
    "echo",
    "error_info",
]

MAX_MESSAGE_CHARS = 1000
"""Longest error message sent: a backstop for text that quotes its input."""


def clip(text: str, limit: int = 80) -> str:
    """`text`, cut to `limit` characters with an ellipsis and its length when longer."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} chars)"


def echo(value: str, limit: int = 80) -> str:
    """Untrusted input quoted in a message: repr'd, and cut like `clip`."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} chars)"


class ErrorInfo(msgspec.Struct, frozen=True):
    """An error as events and status carry it."""

    code: str
    message: str


class AgentError(Exception):
    """Base of every error the agent reports; `code` is the snake_case wire code."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message


class InvalidPayload(AgentError):
    """The command payload does not decode into the schema."""

    code = "invalid_payload"

    def __init__(self, message: str, *, path: str | None = None) -> None:
        message = clip(message, MAX_MESSAGE_CHARS // 2)  # so that the path is never cut off
        super().__init__(f"{message} - at `{path}`" if path else message)
        self.path = path
        self.reason = message


class UnknownCamera(AgentError):
    code = "unknown_camera"

    def __init__(self, *, camera: str) -> None:
        super().__init__(f"no camera with mxid {echo(camera)} is known to this agent")
        self.camera = camera


class UnknownStream(AgentError):
    code = "unknown_stream"

    def __init__(self, *, camera: str, stream: str, available: tuple[str, ...] = ()) -> None:
        detail = f"; it has {', '.join(available)}" if available else ""
        super().__init__(f"camera {clip(camera)} has no stream {echo(stream)}{detail}")
        self.camera = camera
        self.stream = stream


class InvalidModel(AgentError):
    """The model is not a MyriadX blob."""

    code = "invalid_model"


class IncompatibleModel(AgentError):
    """The blob parses but cannot run on the requested stream with the requested config."""

    code = "incompatible_model"


class ChecksumMismatch(AgentError):
    code = "checksum_mismatch"

    def __init__(self, *, expected: str, actual: str) -> None:
        super().__init__(f"model_sha256 is {expected} but the model's sha256 is {actual}")
        self.expected = expected
        self.actual = actual


class ModelNotFound(AgentError):
    code = "model_not_found"

    def __init__(self, *, sha256: str) -> None:
        super().__init__(f"no stored model has sha256 {sha256}; send the model with the command")
        self.sha256 = sha256


class PayloadTooLarge(AgentError):
    code = "payload_too_large"

    def __init__(self, *, size: int, limit: int) -> None:
        super().__init__(f"payload is {size} bytes; the limit is {limit} bytes")
        self.size = size
        self.limit = limit


class RetainedCommand(AgentError):
    code = "retained_command"

    def __init__(self) -> None:
        super().__init__("retained command messages are never executed; publish without retain")


class Expired(AgentError):
    code = "expired"

    def __init__(self, *, expires_at: float, now: float) -> None:
        super().__init__(f"command expired at {expires_at:.3f}; it arrived at {now:.3f}")
        self.expires_at = expires_at


class Unauthorized(AgentError):
    """Unsigned where signatures are required, or signed by a key not trusted for it."""

    code = "unauthorized"


class BadSignature(AgentError):
    """A signature that is malformed or does not verify."""

    code = "bad_signature"


class ReplayWindowFull(AgentError):
    """Too many signed requests are inside their validity window to take another one."""

    code = "replay_window_full"

    def __init__(self, *, limit: int, retry_after: float) -> None:
        super().__init__(
            f"{limit} signed requests are still within their expires_at and kept against "
            f"replays ([security] max_signed_requests); send it again in {retry_after:.0f} s, "
            "or sign requests with a nearer expires_at"
        )
        self.limit = limit


class CameraOffline(AgentError):
    code = "camera_offline"

    def __init__(self, *, camera: str) -> None:
        super().__init__(f"camera {camera} is offline")
        self.camera = camera


class DeployFailed(AgentError):
    """The camera did not come up with the requested NN set."""

    code = "deploy_failed"


class DownloadFailed(AgentError):
    """A `model_url` could not be fetched: an HTTP status, or a network problem past retries.

    `url` is given without credentials (no userinfo, no query string).
    """

    code = "download_failed"

    def __init__(self, *, reason: str, status: int | None = None, url: str | None = None) -> None:
        where = f" {clip(url, 200)}" if url else ""
        super().__init__(
            f"download of{where} failed: {reason}" if where else f"download failed: {reason}"
        )
        self.reason = reason
        self.status = status
        self.url = url


class Interrupted(AgentError):
    code = "interrupted"


class ShuttingDown(AgentError):
    """Received just before a shutdown, and answered instead of handled."""

    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("the agent stopped before handling this command; send it again")


class StateWriteFailed(AgentError):
    """The state folder cannot be written: a command that would change it is refused."""

    code = "state_write_failed"


class Internal(AgentError):
    code = "internal"


# --- chunked model uploads, answered on `{base}/models/{sha256}/status` -------------------


class InvalidChunk(AgentError):
    """A chunk of a model upload outside the model, misaligned or of the wrong length."""

    code = "invalid_chunk"


class UploadNotFound(AgentError):
    code = "upload_not_found"

    def __init__(self, *, sha256: str) -> None:
        super().__init__(
            f"no upload of {clip(sha256)} is in progress; send its manifest to .../upload first"
        )
        self.sha256 = sha256


class UploadTimeout(AgentError):
    code = "upload_timeout"

    def __init__(self, *, seconds: float) -> None:
        super().__init__(f"no chunk arrived for {seconds:g} s; the partial model was deleted")
        self.seconds = seconds


class StorageFull(AgentError):
    """No room for another upload: `models.max_partial_bytes`, or too many at once."""

    code = "storage_full"


# --- problems of the agent itself, published on `{base}/errors` --------------------------


class StateUnreadable(AgentError):
    """The state file could not be read at start-up; it was moved aside."""

    code = "state_unreadable"


class ModelWriteFailed(AgentError):
    """A model could not be written to the model store."""

    code = "model_write_failed"


class AuditWriteFailed(AgentError):
    """The audit log cannot be written: commands are still handled, their lines are lost."""

    code = "audit_write_failed"


class SessionTakenOver(AgentError):
    """Another MQTT client seems to use the agent's client id."""

    code = "session_taken_over"


def error_info(exc: AgentError) -> ErrorInfo:
    """What an event or status says about `exc`."""
    return ErrorInfo(code=exc.code, message=exc.message)
