"""Opening a txredisapi connection for a :class:`RedisTarget`, and naming its failures.

Failures are classified here, next to the connection that produces them, so the store
only asks "is this an outage?" (:func:`is_transient`) and "what kind of failure?"
(:func:`failure_kind`) instead of looking at txredisapi's exception types itself.

txredisapi connects through the global reactor, which is why this module (unlike the
rest of rtcauthd) does not take its connection machinery from the caller.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import txredisapi
from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS

from rtcauthd.outbound.errors import FailureKind, OutboundError
from rtcauthd.store.redis_url import RedisTarget

__all__ = ["connect", "describe", "failure_kind", "is_transient", "outbound_error", "sentinel_manager", "subscribe"]

log = Logger()


def _tls_creator(target: RedisTarget, tls_policy: Optional[Any]) -> Any:
    if target.skip_verify:
        from twisted.internet.ssl import CertificateOptions

        log.warn(
            "TLS certificate verification for Redis at {address} is DISABLED (skip_verify in LIVEKIT_REDIS_URL)",
            address=target.address,
        )
        return CertificateOptions(verify=False)
    if tls_policy is None:
        from twisted.web.client import BrowserLikePolicyForHTTPS

        tls_policy = BrowserLikePolicyForHTTPS()
    if IPolicyForHTTPS.providedBy(tls_policy):
        try:
            host = target.host.encode("ascii")
        except UnicodeEncodeError:
            host = target.host.encode("idna")
        return tls_policy.creatorForNetloc(host, target.port)
    return tls_policy  # already a connection creator / context factory


def _named(base: type, name: bytes) -> type:
    """``base`` that gives every (re)connection ``name`` (CLIENT SETNAME) once it is ready,
    so that peers reading CLIENT LIST see a live instance again within a round trip of a
    reconnect (docs/several-instances.md#the-liveness-rule)."""

    class Named(base):  # type: ignore[misc, valid-type]
        def connectionMade(self):
            d = defer.maybeDeferred(base.connectionMade, self)

            def setname(result: Any) -> Any:
                if self.connected:
                    self.execute_command("CLIENT", "SETNAME", name).addErrback(lambda _f: None)
                return result

            return d.addCallback(setname)

    return Named


def connect(target: RedisTarget, *, tls_policy: Optional[Any], reply_timeout: float, connect_timeout: float,
            sentinel: Optional[Any] = None, client_name: Optional[bytes] = None) -> Any:
    """A lazy, self-reconnecting txredisapi connection (bytes in, bytes out), named
    ``client_name`` on every connect if given."""
    handler = _connect(target, tls_policy=tls_policy, reply_timeout=reply_timeout,
                       connect_timeout=connect_timeout, sentinel=sentinel)
    if client_name is not None:
        # Connecting happens in a later reactor turn, so the factory builds this protocol.
        factory = handler._factory
        factory.protocol = _named(factory.protocol, client_name)
    return handler


def _connect(target: RedisTarget, *, tls_policy: Optional[Any], reply_timeout: float, connect_timeout: float,
             sentinel: Optional[Any]) -> Any:
    common = _common(target, reply_timeout=reply_timeout, connect_timeout=connect_timeout)
    if sentinel is not None:
        return sentinel.master_for(
            target.sentinel_master, factory_class=_MasterFactory, dbid=common["dbid"], poolsize=1, isLazy=True,
            charset=None, password=common["password"], replyTimeout=reply_timeout, convertNumbers=False,
            username=common.get("username"),
        )
    if target.transport == "unix":
        return txredisapi.lazyUnixConnection(target.path, **common)
    ssl_factory = _tls_creator(target, tls_policy) if target.transport == "tls" else False
    return txredisapi.lazyConnection(target.host, target.port, ssl_context_factory=ssl_factory, **common)


def _common(target: RedisTarget, *, reply_timeout: Optional[float], connect_timeout: float) -> dict[str, Any]:
    common: dict[str, Any] = {
        "dbid": target.db if target.db > 0 else None,  # no SELECT for db 0 (or go-redis' "negative")
        "reconnect": True,
        "charset": None,
        "password": target.password or None,
        "connectTimeout": connect_timeout,
        "replyTimeout": reply_timeout,
        "convertNumbers": False,
    }
    if target.username and target.password:
        common["username"] = target.username
    return common


class _MasterOnly(txredisapi.SentinelRedisProtocol):
    """txredisapi's Sentinel protocol compares ROLE with a str, which never matches with
    ``charset=None`` (bytes replies): this one checks the role in either form."""

    def connectionMade(self):
        def check_role(role: Any) -> Any:
            kind = role[0].decode() if isinstance(role[0], bytes) else role[0]
            if self.factory.is_master and kind != "master":
                self.transport.loseConnection()
                return None
            return txredisapi.RedisProtocol.connectionMade(self)

        if self.password is not None:
            self.auth(self.password, self.username)
        return self.role().addCallback(check_role)


class _MasterFactory(txredisapi.SentinelConnectionFactory):
    protocol = _MasterOnly


def sentinel_manager(target: RedisTarget) -> Optional[Any]:
    """The txredisapi Sentinel client for RTCAUTH_REDIS_SENTINELS (None without); one per
    store, shared by its connections, closed with the store (``disconnect()``)."""
    if not target.sentinels:
        return None
    return txredisapi.Sentinel([tuple(s) for s in target.sentinels], charset="utf-8")


class _Listener(txredisapi.SubscriberProtocol):
    """Subscribes again on every (re)connect, after txredisapi's AUTH/SELECT."""

    channels: tuple = ()
    on_message: Any = None

    @defer.inlineCallbacks
    def connectionMade(self):
        yield txredisapi.SubscriberProtocol.connectionMade(self)
        if self.connected:
            yield self.subscribe(list(self.channels))

    def messageReceived(self, pattern, channel, message):
        try:
            self.on_message(channel, message)
        except Exception:
            log.failure("Handling a message from Redis failed")


def subscribe(target: RedisTarget, channels: list[bytes], on_message: Any, *, tls_policy: Optional[Any],
              connect_timeout: float, sentinel: Optional[Any] = None) -> Any:
    """A self-reconnecting SUBSCRIBE connection calling ``on_message(channel, message)``;
    stop it with its ``disconnect()``. Messages sent while it is reconnecting are lost
    (pub/sub keeps nothing), which the cluster allows for (docs/several-instances.md#routing)."""
    common = _common(target, reply_timeout=None, connect_timeout=connect_timeout)
    protocol = type("Listener", (_Listener,), {"channels": tuple(channels), "on_message": staticmethod(on_message)})
    if sentinel is not None:
        # pub/sub reaches replicas too (PUBLISH is replicated), so no role check here
        factory = txredisapi.SentinelConnectionFactory(
            sentinel, target.sentinel_master, True, None, common["dbid"], 1, True,
            txredisapi.ConnectionHandler, None, common["password"], None, False, common.get("username"),
        )
        factory.protocol = protocol
        factory.startConnecting(txredisapi._SentinelEndpoint(factory))
        return factory
    factory = txredisapi.RedisFactory(
        target.address, common["dbid"], 1, True, txredisapi.ConnectionHandler, None,
        common["password"], None, False, common.get("username"),
    )
    factory.protocol = protocol
    if target.transport == "unix":
        from twisted.internet import reactor
        from twisted.internet.endpoints import UNIXClientEndpoint

        endpoint = UNIXClientEndpoint(reactor, target.path, timeout=connect_timeout)
    else:
        ssl_factory = _tls_creator(target, tls_policy) if target.transport == "tls" else None
        endpoint = txredisapi._makeEndpoint(target.host, target.port, connect_timeout, ssl_factory)
    factory.startConnecting(endpoint)
    return factory


def describe(failure: Failure) -> str:
    """A one-line text for the log (never a traceback)."""
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "no answer in time"
    return failure.getErrorMessage() or failure.type.__name__


def failure_kind(failure: Failure) -> FailureKind:
    """TIMEOUT for no answer in time, CONNECT for a refused or lost connection, else OTHER."""
    if failure.check(defer.TimeoutError, defer.CancelledError, txredisapi.TimeoutError, error.TimeoutError):
        return FailureKind.TIMEOUT
    if failure.check(txredisapi.ConnectionError, error.ConnectError, error.ConnectionClosed):
        return FailureKind.CONNECT
    return FailureKind.OTHER


def outbound_error(failure: Failure, step: str) -> OutboundError:
    return OutboundError(failure_kind(failure), step, describe(failure))


def is_transient(failure: Failure) -> bool:
    """Outage-like failures: the write is kept and retried once Redis is back."""
    if failure.check(txredisapi.ResponseError):
        # A server that answers is up; only a restarting one is worth waiting for.
        return str(failure.value).startswith(("LOADING", "MASTERDOWN", "TRYAGAIN"))
    return True


def decode_hash(
    mapping: dict, decode: Callable[[Any], Any], error: type, what: str, logger: Logger
) -> list[tuple[Any, Any]]:
    """``(field, decode(value))`` for each entry of a Redis hash read with HGETALL.

    An entry that does not decode (``error``) is logged on ``logger`` (the store's own, so
    its namespace stays) as a ``what`` and skipped, and left in Redis for whoever wrote it
    (an upstream instance, a newer rtcauthd). ``what`` is our own constant text.
    """
    decoded = []
    for field, value in mapping.items():
        try:
            decoded.append((field, decode(value)))
        except error as e:
            logger.warn(
                "Skipping unparsable " + what + " {field} in Redis (left in place): {error}",
                field=field.decode("utf-8", "replace") if isinstance(field, bytes) else str(field),
                error=str(e),
            )
    return decoded
