"""The one failure type of every outbound call, classified once where the call is made.

Federation, well-known, client-server API, LiveKit Twirp and Redis probes all fail with an
:class:`OutboundError`. Callers decide by its :class:`FailureKind` (retry? which Matrix
error? which doctor advice?) instead of parsing messages; ``step`` names what was being
done and ``detail`` is a one-line, already scrubbed text for the log.
"""

from __future__ import annotations

import enum
from typing import Optional


class FailureKind(enum.Enum):
    """What went wrong, independent of which call it was."""

    INVALID = "invalid"  # the request could not be formed (bad server name, URL, input)
    RESOLVE = "resolve"  # DNS / well-known / SRV gave no usable address
    REFUSED = "refused"  # the SSRF guard refused every address the name resolved to
    CONNECT = "connect"  # TCP connection failed (refused, unreachable, reset)
    TLS = "tls"  # handshake or certificate verification failed
    TIMEOUT = "timeout"  # no complete answer within the time bound
    TOO_LARGE = "too large"  # the answer exceeded the size cap
    REDIRECT = "redirect"  # too many or unusable redirects
    HTTP_STATUS = "http status"  # an answer arrived with a status the caller cannot use
    BAD_BODY = "bad body"  # an answer arrived but its body is unusable
    LOST = "lost"  # the connection went away mid-answer
    OTHER = "other"  # anything not classified above (a bug or an unexpected library error)


class OutboundError(Exception):
    """An outbound call failed.

    ``status`` is the HTTP status when an answer arrived; ``code`` a protocol error code
    from the answer (a Twirp code, a Matrix errcode) when there was one.
    """

    def __init__(
        self,
        kind: FailureKind,
        step: str,
        detail: str,
        *,
        status: Optional[int] = None,
        code: Optional[str] = None,
    ) -> None:
        super().__init__(kind, step, detail)
        self.kind = kind
        self.step = step
        self.detail = detail
        self.status = status
        self.code = code

    def __str__(self) -> str:
        return f"{self.step}: {self.detail}"

    def __repr__(self) -> str:
        return f"OutboundError({self.kind.name}, {self.step!r}, {self.detail!r}, status={self.status!r})"


def describe(failure) -> str:
    """One line for a raw failure (a Failure or an exception): ``Type: message``, no traceback.

    Wrappers that carry several failures (``ResponseNeverReceived`` and friends have
    ``reasons``) are described reason by reason; an OutboundError by its own text.
    """
    value = getattr(failure, "value", failure)
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "; ".join(describe(reason) for reason in reasons)
    if isinstance(value, OutboundError):
        return str(value)
    name = type(value).__name__
    message = str(value)
    return f"{name}: {message}" if message and message != name else name
