"""Shared state of one ``rtcauth doctor`` run: options, network, and findings computed once.

Several checks need the same intermediate facts (the zone apex's addresses, the client
well-known, the homeserver's MSC4143 transports, the advertised service, the token flow).
:class:`Context` computes each on first use and hands it to every check that asks
(:class:`Shared`), so a finding is fetched once however many checks depend on it, and
the runner can cancel all of them at the report's deadline.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import urljoin

import attr
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from rtcauthd.doctor.net import HTTPS_PORT, explain, parse_url
from rtcauthd.outbound.errors import FailureKind
from rtcauthd.outbound.client import HTTPResponse, OutboundError
from rtcauthd.matrix.servername import ServerName

#: Sent as ``Origin`` so that CORS answers can be judged as a browser would.
DOCTOR_ORIGIN = "https://rtcauth-doctor.invalid"
CLIENT_WELL_KNOWN_PATH = "/.well-known/matrix/client"
TRANSPORTS_PATH = "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports"
MAX_REDIRECTS = 5
MAX_SNIPPET = 120


@attr.s(frozen=True, auto_attribs=True)
class DoctorOptions:
    """What the operator asked for (command-line options, already validated)."""

    server_name: str
    https_port: int = HTTPS_PORT
    timeout: float = 5.0
    access_token: Optional[str] = attr.ib(default=None, repr=False)
    config: Any = attr.ib(default=None, repr=False)  # rtcauthd.config.Config
    config_error: Optional[str] = None
    config_source: Optional[str] = None


class Shared:
    """Computes a value once (on first use) and hands it to every caller."""

    def __init__(self, make: Callable[[], Awaitable[Any]]) -> None:
        self._make = make
        self._running: Optional[Deferred] = None
        self._done = False
        self._result: Any = None
        self._waiters: list[Deferred] = []

    def get(self) -> Deferred:
        if self._done:
            if isinstance(self._result, Failure):
                return _failed(self._result)
            return succeed(self._result)
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        if self._running is None:
            self._running = Deferred.fromCoroutine(self._make())
            self._running.addBoth(self._finish)
        return waiter

    def _finish(self, result: Any) -> None:
        self._done = True
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        return None

    def cancel(self) -> None:
        if self._running is not None and not self._done:
            self._running.cancel()


async def gather(coroutines) -> list:
    """Run coroutines concurrently; their results in order, or the first exception itself."""
    deferreds = [Deferred.fromCoroutine(c) for c in coroutines]
    try:
        return await gatherResults(deferreds, consumeErrors=True)
    except FirstError as e:
        e.subFailure.raiseException()


def _failed(failure: Failure) -> Deferred:
    d: Deferred = Deferred()
    d.errback(failure)
    return d


# -- small helpers ----------------------------------------------------------------------------


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def json_of(response: HTTPResponse) -> Any:
    """The body as JSON (NaN/Infinity refused); ValueError if it is not JSON."""
    try:
        return json.loads(response.body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ValueError("body is not UTF-8") from None


def errcode_of(response: HTTPResponse) -> Optional[str]:
    try:
        document = json_of(response)
    except ValueError:
        return None
    if isinstance(document, dict) and isinstance(document.get("errcode"), str):
        return document["errcode"]
    return None


def snippet(response: HTTPResponse) -> str:
    """``errcode: error`` of a Matrix error, else the start of the body."""
    try:
        document = json_of(response)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("errcode"), str):
        text = document["errcode"]
        if isinstance(document.get("error"), str):
            text += f" {document['error']!r}"
    else:
        text = " ".join(response.body.decode("utf-8", "replace").split())
    if len(text) > MAX_SNIPPET:
        text = text[:MAX_SNIPPET] + "…"
    return text


def status_text(response: HTTPResponse) -> str:
    body = snippet(response)
    return f"HTTP {response.code}" + (f" ({body})" if body else "")


def transport_fix(reason: str, otherwise: list[str]) -> list[str]:
    """The fix for a failed connection: TLS problems are explained on the TLS lines."""
    if reason.startswith("TLS"):
        return ["See the TLS lines below: the certificate must be valid for this host."]
    if "does not resolve" in reason:
        return ["See the DNS line: the host name has no address."]
    return otherwise


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listing(items, limit: int = 3) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f" and {len(items) - limit} more" if len(items) > limit else "")


@attr.s(auto_attribs=True)
class ClientWellKnown:
    """What ``https://<server>/.well-known/matrix/client`` gave (or why it gave nothing)."""

    url: str
    final_url: Optional[str] = None
    response: Optional[HTTPResponse] = None
    document: Optional[dict] = None
    base_url: Optional[str] = None
    redirects: list = attr.Factory(list)
    problems: list = attr.Factory(list)  # (message, fix paragraphs)
    fatal: bool = False  # no usable document at all
    unreachable: bool = False  # no HTTP answer at all
    cors: Optional[str] = None
    elsewhere: Optional[str] = None  # a well-known found on matrix.<server> instead


@attr.s(auto_attribs=True)
class Transports:
    """The homeserver's MSC4143 ``rtc/transports`` endpoint: ``state`` and entries."""

    state: str  # "ok", "needs-token", "absent", "error", "unknown"
    entries: list = attr.Factory(list)
    detail: str = ""


@attr.s(auto_attribs=True)
class Focus:
    """The advertised authorization service: the rtc-focus lines and a usable base URL."""

    results: list
    url: Optional[str] = None


@attr.s(auto_attribs=True)
class Flow:
    """Outcome of the ``--access-token`` flow (token → OpenID → service → JWT)."""

    results: list
    sfu_url: Optional[str] = None


class Context:
    """The run's options, network and the shared intermediate findings."""

    def __init__(self, *, clock: IReactorTime, options: DoctorOptions, server: ServerName, net) -> None:
        self.clock = clock
        self.options = options
        self.server = server
        self.net = net
        self.apex = Shared(self._apex)
        self.well_known = Shared(self._well_known)
        self.transports = Shared(self._transports)
        self.focus = Shared(self._focus)
        self.flow = Shared(self._flow)
        self._shared = [self.apex, self.well_known, self.transports, self.focus, self.flow]
        #: Set when the report's deadline has passed (late errors are not crashes).
        self.expired = False

    def cancel(self) -> None:
        for shared in self._shared:
            shared.cancel()

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def https_port(self) -> int:
        return self.options.https_port

    def https_url(self, host: str, path: str) -> str:
        bracketed = f"[{host}]" if ":" in host else host
        return f"https://{bracketed}{path}"

    async def fetch(
        self,
        method: bytes,
        url: str,
        *,
        headers: Optional[dict] = None,
        body: Optional[bytes] = None,
        step: str = "request",
    ) -> HTTPResponse:
        """One bounded request through the port-mapped client (OutboundError on failure)."""
        return await self.net.http.request(method, url, headers=headers, body=body, step=step)

    async def fetch_following(self, url: str, headers: dict) -> tuple[HTTPResponse, str, list]:
        """GET with redirects followed (as browsers and upstream's client do)."""
        redirects: list[str] = []
        for _ in range(MAX_REDIRECTS + 1):
            response = await self.fetch(b"GET", url, headers=headers, step="GET")
            location = response.header("Location")
            if response.code in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                redirects.append(url)
                continue
            return response, url, redirects
        raise OutboundError(FailureKind.REDIRECT, "redirect", f"more than {MAX_REDIRECTS} redirects")

    # -- shared findings -------------------------------------------------------------------

    async def _apex(self):
        return await self.net.dns.addresses(self.host)

    async def _well_known(self) -> ClientWellKnown:
        url = self.https_url(self.host, CLIENT_WELL_KNOWN_PATH)
        info = ClientWellKnown(url=url)
        headers = {"Accept": "application/json", "Origin": DOCTOR_ORIGIN}
        try:
            response, info.final_url, info.redirects = await self.fetch_following(url, headers)
        except OutboundError as e:
            info.fatal = info.unreachable = True
            info.problems.append((f"cannot fetch {url}: {explain(Failure(e))}", ()))
            if e.kind is not FailureKind.TIMEOUT:  # a hung host: do not wait twice
                await self._look_elsewhere(info, headers)
            return info
        info.response = response
        info.cors = response.header("Access-Control-Allow-Origin")
        if response.code != 200:
            info.fatal = True
            if response.code == 404:
                message = f"{url} answers 404: the bare server name serves no client well-known"
            else:
                message = f"{url} answers {status_text(response)}"
            info.problems.append((message, ()))
            await self._look_elsewhere(info, headers)
            return info
        try:
            document = json_of(response)
        except ValueError as e:
            document = None
            info.problems.append((f"{url} is not valid JSON ({e})", ()))
        if document is not None and not isinstance(document, dict):
            info.problems.append((f"{url} is JSON but not an object", ()))
            document = None
        if document is None:
            info.fatal = True
            return info
        info.document = document
        homeserver = document.get("m.homeserver")
        base_url = homeserver.get("base_url") if isinstance(homeserver, dict) else None
        if not isinstance(base_url, str) or not base_url:
            info.problems.append(
                (
                    f"{url} has no m.homeserver.base_url",
                    (f'Add "m.homeserver": {{"base_url": "https://matrix.{self.host}"}} '
                     "(the public URL of your homeserver's client API).",),
                )
            )
        else:
            try:
                scheme = parse_url(base_url).scheme
            except ValueError:
                scheme = ""
            if scheme == "https":
                info.base_url = base_url.rstrip("/")
            elif scheme == "http":
                info.base_url = base_url.rstrip("/")
                info.problems.append(
                    (
                        f"m.homeserver.base_url is {base_url}: browsers on https pages refuse "
                        "plain http (mixed content)",
                        ("Serve the client API over https and write its https:// URL.",),
                    )
                )
            else:
                info.problems.append((f"m.homeserver.base_url {base_url!r} is not an https:// URL", ()))
        if info.cors is None:
            info.problems.append(
                (
                    f"{url} has no Access-Control-Allow-Origin header: browsers (Element Web, "
                    "Element Call) cannot read it",
                    ("Send it with the header Access-Control-Allow-Origin: * (nginx: add_header "
                     "Access-Control-Allow-Origin * always;).",),
                )
            )
        elif info.cors.strip() not in ("*", DOCTOR_ORIGIN):
            info.problems.append(
                (
                    f"{url} allows only the origin {info.cors.strip()!r}: other web clients "
                    "cannot read it",
                    ("Send Access-Control-Allow-Origin: * instead.",),
                )
            )
        return info

    async def _look_elsewhere(self, info: ClientWellKnown, headers: dict) -> None:
        """Where people often put the well-known by mistake: the homeserver's own host."""
        if self.server.is_ip or self.host.startswith("matrix."):
            return
        url = self.https_url("matrix." + self.host, CLIENT_WELL_KNOWN_PATH)
        try:
            response, _final, _redirects = await self.fetch_following(url, headers)
            document = json_of(response) if response.code == 200 else None
        except (OutboundError, ValueError):
            return
        if isinstance(document, dict):
            info.elsewhere = url

    async def _transports(self) -> Transports:
        info = await self.well_known.get()
        if info.base_url is None:
            return Transports("unknown", detail="no homeserver base URL")
        headers = {"Accept": "application/json"}
        if self.options.access_token:
            headers["Authorization"] = "Bearer " + self.options.access_token
        try:
            response = await self.fetch(b"GET", info.base_url + TRANSPORTS_PATH, headers=headers, step="GET")
        except OutboundError as e:
            return Transports("error", detail=explain(Failure(e)))
        if response.code == 200:
            try:
                document = json_of(response)
            except ValueError:
                return Transports("error", detail="answer is not JSON")
            entries = document.get("rtc_transports") if isinstance(document, dict) else None
            return Transports("ok", entries=entries if isinstance(entries, list) else [])
        if response.code in (401, 403) and errcode_of(response) in ("M_MISSING_TOKEN", "M_UNKNOWN_TOKEN", "M_FORBIDDEN"):
            return Transports("needs-token", detail=status_text(response))
        if response.code in (400, 404, 405):
            return Transports("absent", detail=status_text(response))
        return Transports("error", detail=status_text(response))

    async def _focus(self) -> "Focus":
        from rtcauthd.doctor.checks import find_focus  # the focus check's own logic

        return await find_focus(self)

    async def _flow(self) -> "Flow":
        from rtcauthd.doctor.checks import run_token_flow

        return await run_token_flow(self)
