"""The one failure type of every outbound call, classified once where the call is made.

Federation, well-known, client-server API, LiveKit Twirp and Redis probes all fail with an
:class:`OutboundError`. Callers decide by its :class:`FailureKind` (retry? which Matrix
error? which doctor advice?) instead of parsing messages; ``step`` names what was being
done and ``detail`` is a one-line, already scrubbed text for the log; ``reason`` is the
same failure in words for people (the doctor shows it). :func:`kind_of` and :func:`reason`
classify and word a raw transport exception, once, where it is turned into an error.
"""

from __future__ import annotations

import enum
from typing import Optional

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, TimeoutError as DeferTimeout
from twisted.python.failure import Failure


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
    from the answer (a Twirp code, a Matrix errcode) when there was one; ``snippet`` the
    start of the answer's body (already made printable), for the log.
    """

    def __init__(
        self,
        kind: FailureKind,
        step: str,
        detail: str,
        *,
        status: Optional[int] = None,
        code: Optional[str] = None,
        reason: Optional[str] = None,
        snippet: str = "",
    ) -> None:
        super().__init__(kind, step, detail)
        self.kind = kind
        self.step = step
        self.detail = detail
        self.reason = detail if reason is None else reason
        self.status = status
        self.code = code
        self.snippet = snippet

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


def _inner(error: BaseException) -> list[BaseException]:
    """The exceptions a wrapper such as ResponseNeverReceived carries in ``.reasons``."""
    reasons = getattr(error, "reasons", None) or ()
    return [r.value if isinstance(r, Failure) else r for r in reasons if isinstance(r, (Failure, BaseException))]


def kind_of(error: BaseException) -> FailureKind:
    """The kind of a raw transport exception (a wrapper's first classified reason)."""
    if isinstance(error, OutboundError):
        return error.kind
    if isinstance(error, net_error.DNSLookupError):
        return FailureKind.RESOLVE
    if isinstance(error, (net_error.TCPTimedOutError, net_error.TimeoutError, DeferTimeout)):
        return FailureKind.TIMEOUT
    if isinstance(error, net_error.ConnectError):  # refused, no route, and the rest
        return FailureKind.CONNECT
    if isinstance(error, (SSL.Error, VerificationError)):
        return FailureKind.TLS
    if isinstance(error, (net_error.ConnectionDone, net_error.ConnectionLost)):
        return FailureKind.LOST
    for inner in _inner(error):
        kind = kind_of(inner)
        if kind is not FailureKind.OTHER:
            return kind
    return FailureKind.OTHER


def _openssl_reason(error: SSL.Error) -> str:
    reasons = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(item, tuple) and item:
            reasons.append(str(item[-1]))
    return ", ".join(r for r in reasons if r) or str(error) or "handshake failed"


def reason(error: BaseException) -> str:
    """A short human reason for a transport exception (no tracebacks, no URLs)."""
    wrapped = getattr(error, "reasons", None)
    if wrapped:
        texts: list[str] = []
        for item in wrapped:
            text = reason(item.value) if isinstance(item, Failure) else str(item)
            if text not in texts:
                texts.append(text)
        return "; ".join(texts)
    if isinstance(error, OutboundError):
        return error.reason
    if isinstance(error, VerificationError):
        return "TLS: the certificate does not cover this host name"
    if isinstance(error, SSL.Error):
        text = _openssl_reason(error)
        if "certificate verify failed" in text:
            return "TLS: certificate verify failed (not signed by a trusted CA, or expired)"
        return f"TLS handshake failed ({text})"
    if isinstance(error, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (net_error.TCPTimedOutError, net_error.TimeoutError, DeferTimeout)):
        return "connection timed out"
    if isinstance(error, net_error.DNSLookupError):
        return "the host name does not resolve to an address"
    if isinstance(error, net_error.NoRouteError):
        return "no route to host"
    if isinstance(error, (net_error.ConnectionDone, net_error.ConnectionLost)):
        return "the connection was closed without an answer"
    if isinstance(error, CancelledError):
        return "cancelled"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
