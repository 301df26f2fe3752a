"""moesaic's error tree: what the core raises, mapped to a gRPC status or an MQTT error once.

Every error a client may see is a :class:`MoesaicError` with a short machine ``reason``
(``bad_tensor``, ``unknown_model``, ``queue_expired`` ...) and a human message. Adapters turn
them into wire errors in one place each: :func:`moesaic.rpc.status_of` (gRPC) and
:func:`describe` (the MQTT error JSON). Anything else that escapes the core is a bug: it
becomes :class:`Internal` with a short incident id, its traceback logged once, never shown.

The classes also derive from the built-in exception that means the same thing
(``InvalidInput`` is a ``ValueError``), so code that validates with the standard library keeps
working; only the adapters care which tree an exception came from.

>>> err = InvalidInput("input 'x': shape [3]; expected [-1, 4]", reason="bad_shape")
>>> describe(err)
{'code': 'invalid_input', 'reason': 'bad_shape', 'message': "input 'x': shape [3]; expected [-1, 4]"}
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, ClassVar

__all__ = [
    "MESSAGE_LIMIT",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidInput",
    "MoesaicError",
    "NotFound",
    "ResourceExhausted",
    "Unavailable",
    "as_moesaic_error",
    "clip",
    "describe",
    "quote",
]

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 1024
"""Most characters of a message a client sees; longer ones are cut with a marker."""


def clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters (a bad 20,000-character name is never echoed whole)."""
    if len(text) <= limit:
        return text
    marker = f"... ({len(text) - limit + 40} more characters)"
    return text[: limit - len(marker)] + marker


def quote(value: str, limit: int = 64) -> str:
    """``repr`` of a client-supplied string, cut to ``limit`` characters for messages."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"...({len(value)} chars)"


class MoesaicError(Exception):
    """Base of every error a client may see. ``code`` names the class, ``reason`` the case."""

    code: ClassVar[str] = "internal"
    default_reason: ClassVar[str] = "internal"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(clip(message))
        self.message = clip(message)
        self.reason = reason or self.default_reason


class InvalidInput(MoesaicError, ValueError):
    """The request or frame itself is wrong: bad tensor, shape, option, payload."""

    code = "invalid_input"
    default_reason = "invalid_input"


class NotFound(MoesaicError, LookupError):
    """A named model, task, expert or sensor does not exist here."""

    code = "not_found"
    default_reason = "unknown_name"


class Unavailable(MoesaicError):
    """The target exists but cannot serve now (loading, stopping, every expert down)."""

    code = "unavailable"
    default_reason = "unavailable"


class FailedPrecondition(MoesaicError):
    """The operation cannot succeed in the state things are in: a model version whose files
    do not load, a model with no version to serve. Retrying the same call will not help."""

    code = "failed_precondition"
    default_reason = "failed_precondition"


class DeadlineExceeded(MoesaicError, TimeoutError):
    """The request's deadline passed before (or while) its work could run."""

    code = "deadline_exceeded"
    default_reason = "deadline_exceeded"


class Cancelled(MoesaicError):
    """The client went away; the work it asked for was not done."""

    code = "cancelled"
    default_reason = "cancelled"


class ResourceExhausted(MoesaicError):
    """A configured limit was hit: message size, pixels, queue length."""

    code = "resource_exhausted"
    default_reason = "limit"


class Internal(MoesaicError):
    """A bug or an engine failure; the client sees only the incident id."""

    code = "internal"
    default_reason = "internal"


def as_moesaic_error(exc: BaseException, *, where: str = "request") -> MoesaicError:
    """``exc`` itself when it belongs to the tree, else :class:`Internal` with an incident id.

    The traceback of an unexpected exception is logged here, once, under that id.
    """
    if isinstance(exc, MoesaicError):
        return exc
    incident = uuid.uuid4().hex[:8]
    log.error("%s failed (incident %s)", where, incident, exc_info=exc)
    return Internal(f"internal error (incident {incident}); see the server log", reason="bug")


def describe(exc: BaseException) -> dict[str, Any]:
    """The MQTT / JSON form of an error: ``{"code", "reason", "message"}``."""
    err = as_moesaic_error(exc)
    return {"code": err.code, "reason": err.reason, "message": err.message}
