"""Runs every check concurrently under one deadline and collects the report.

Why a deadline on top of per-operation timeouts: some checks chain several bounded steps
(well-known, then SRV, then connect); the report must still come back in bounded time for
a dead host (under 15 s with the default ``--timeout`` of 5 s). Whatever has not finished
by then is reported as such and cancelled, and every connection doctor opened is closed
before the report is returned.

The checks (``check_*`` modules, one per link of the MatrixRTC call set-up chain) are
``async`` functions ``check_x(ctx) -> list[Result]`` that never raise for a problem they
diagnose: a problem becomes a ✗ or ! line naming what is wrong and what to change. The
six misconfigurations of the post-mortem behind this command each have a dedicated
diagnosis: no authorization service advertised; ``wss://`` instead of ``https://`` in
the well-known; no ``.well-known`` on the bare server name; a DNS wildcard not covering
the apex; an unreachable published IPv6 address; a homeserver without MSC4140. The
application-service deployments added their own (``check_transports``,
``check_appservice``): ``{}`` transports, a transport ``url`` that is not ``LIVEKIT_URL``,
registration keys Synapse ignores, a flag left off, a token pair that differs.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Optional

import attr
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from rtcauthd.doctor.check_appservice import check_appservice
from rtcauthd.doctor.check_client_api import check_client_api
from rtcauthd.doctor.check_discovery import check_client_discovery, check_rtc_focus
from rtcauthd.doctor.check_dns import check_dns, check_reachability
from rtcauthd.doctor.check_federation import check_federation
from rtcauthd.doctor.check_livekit import check_livekit
from rtcauthd.doctor.check_service import check_service
from rtcauthd.doctor.check_tls import check_tls
from rtcauthd.doctor.check_token_flow import check_delayed_event_limits, check_token_flow
from rtcauthd.doctor.check_transports import check_transports
from rtcauthd.doctor.context import Context, DoctorOptions
from rtcauthd.doctor.report import Report, Result, Status
from rtcauthd.matrix.servername import InvalidServerName, parse_server_name

log = Logger()

#: The whole report is cut off after this many ``--timeout``s (12 s by default).
DEADLINE_FACTOR = 2.4


@attr.s(frozen=True, auto_attribs=True)
class CheckSpec:
    id: str
    title: str
    run: Callable[[Context], Awaitable[list]]


#: Report order. Each check may emit several lines (e.g. one per address family or host).
CHECKS = (
    CheckSpec("dns", "DNS", check_dns),
    CheckSpec("reach", "Reachability", check_reachability),
    CheckSpec("well-known", "Client discovery", check_client_discovery),
    CheckSpec("rtc-focus", "RTC focus", check_rtc_focus),
    CheckSpec("transports", "RTC transports", check_transports),
    CheckSpec("service", "Auth service", check_service),
    CheckSpec("tls", "TLS", check_tls),
    CheckSpec("federation", "Federation", check_federation),
    CheckSpec("client-api", "Homeserver API", check_client_api),
    CheckSpec("token-flow", "Token flow", check_token_flow),
    CheckSpec("delayed-events", "Delayed events", check_delayed_event_limits),
    CheckSpec("appservice", "AS mode", check_appservice),
    CheckSpec("livekit", "LiveKit", check_livekit),
)


def deadline_for(timeout: float) -> float:
    return timeout * DEADLINE_FACTOR


async def _run_one(spec: CheckSpec, ctx: Context) -> list:
    try:
        return list(await spec.run(ctx))
    except CancelledError:
        raise
    except Exception as e:
        if ctx.expired:  # cut off at the deadline; already reported as unfinished
            raise CancelledError() from None
        log.failure("Doctor check {check} crashed", check=spec.id)
        return [Result(spec.id, spec.title, Status.FAIL, f"internal error in doctor: {type(e).__name__}: {e}")]


async def diagnose(options: DoctorOptions, *, reactor, network=None, specs=CHECKS) -> Report:
    """Run every check against ``options.server_name``; never raises for a bad deployment.

    ``network`` (see :class:`rtcauthd.doctor.net.Network`) is built from ``reactor`` and the
    options when not given; tests pass their own.
    """
    started = reactor.seconds()
    try:
        server = parse_server_name(options.server_name)
    except InvalidServerName as e:
        result = Result("server-name", "Server name", Status.FAIL, f"{options.server_name!r} is not a Matrix server name: {e.reason}")
        return Report(options.server_name, (result,), 0.0, options.https_port, options.timeout)
    if network is None:
        raise ValueError("diagnose() needs a network (see rtcauthd.doctor.net.build_network)")
    ctx = Context(clock=reactor, options=options, server=server, net=network)
    deadline = deadline_for(options.timeout)
    slots: list[Optional[list]] = [None] * len(specs)
    all_done: Deferred = Deferred()
    running: list[Deferred] = []

    def settle() -> None:
        if not all_done.called and all(slot is not None for slot in slots):
            all_done.callback(None)

    def store(result, index: int) -> None:
        if slots[index] is None:
            if isinstance(result, Failure):  # only cancellation gets here, and late
                result = [Result(specs[index].id, specs[index].title, Status.FAIL, "cancelled")]
            slots[index] = result
            settle()
        return None

    def expire() -> None:
        ctx.expired = True
        for index, spec in enumerate(specs):
            if slots[index] is None:
                slots[index] = [
                    Result(
                        spec.id,
                        spec.title,
                        Status.FAIL,
                        f"did not finish within {deadline:g} s, the report's time limit "
                        f"({DEADLINE_FACTOR:g} × --timeout)",
                    )
                ]
        settle()
        for d in running:
            d.cancel()
        ctx.cancel()

    for index, spec in enumerate(specs):
        d = Deferred.fromCoroutine(_run_one(spec, ctx))
        running.append(d)
        d.addBoth(store, index)
    timer = reactor.callLater(deadline, expire) if not all_done.called else None
    settle()
    await all_done
    if timer is not None and timer.active():
        timer.cancel()
    await network.close()
    results = tuple(result for slot in slots for result in slot)
    return Report(
        server_name=server.original,
        results=results,
        elapsed=reactor.seconds() - started,
        https_port=options.https_port,
        timeout=options.timeout,
    )
