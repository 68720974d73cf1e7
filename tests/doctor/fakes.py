"""A whole MatrixRTC deployment on loopback, for ``rtcauth doctor`` tests.

- :class:`FakeDNS`: a twisted.names server (UDP and TCP on one port) for an in-memory zone
  with wildcard support, which doctor is pointed at with ``--dns-server``;
- :class:`TLSFront`: one TLS listener (127.0.0.1 and, optionally, ::1 on the same port)
  that serves every host by name (virtual hosts), with per-name certificates via SNI;
- fake resources for the server-name host (well-knowns), the homeserver, the
  authorization service and the SFU, each with knobs for the misconfigurations the
  doctor must diagnose.

:class:`Deployment` wires them into a *correct* deployment; tests break one thing and
run the doctor in-process through the real network stack (``build_network``).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, unquote

import jwt as pyjwt
from livekit.protocol.models import Room
from livekit.protocol.room import CreateRoomRequest
from OpenSSL import SSL
from twisted.internet import defer, error, protocol, ssl
from twisted.names import common, dns, server as dns_server
from twisted.names.error import DomainError
from twisted.web import resource, vhost
from zope.interface import implementer
from twisted.internet.interfaces import IOpenSSLContextFactory, IResolver

from tests.blackbox.harness import FakeServer, lk_hash
from tests.support.certs import TestCA

SERVER = "example.test"
HS_HOST = "matrix." + SERVER
SERVICE_HOST = "rtc." + SERVER
SFU_HOST = "sfu." + SERVER
SERVICE_PREFIX = "/livekit/jwt"
USER_ID = "@alice:" + SERVER
DEVICE_ID = "DOCTORDEVICE"
ACCESS_TOKEN = "syt_doctor_access_token"
LIVEKIT_KEY = "doctorkey"
LIVEKIT_SECRET = "doctor-secret-0123456789abcdef-0123456789"


def coroutine_test(f):
    """Run an ``async def`` test method as a Deferred (works on every trial version)."""

    @functools.wraps(f)
    def wrapper(self, *args, **kwargs):
        return defer.Deferred.fromCoroutine(f(self, *args, **kwargs))

    return wrapper


# ---------------------------------------------------------------------------------------
# DNS


@implementer(IResolver)
class Zone(common.ResolverBase):
    """Records by owner name; ``*.parent`` wildcards; names above records exist (NODATA)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, list] = {}
        self.queries: list[tuple[str, int]] = []

    def add(self, name: str, payload) -> None:
        self.records.setdefault(name.lower().rstrip("."), []).append(payload)

    def address(self, name: str, *addresses: str) -> None:
        for address in addresses:
            self.add(name, dns.Record_AAAA(address) if ":" in address else dns.Record_A(address))

    def remove(self, name: str) -> None:
        self.records.pop(name.lower().rstrip("."), None)

    def _find(self, name: str) -> Optional[list]:
        if name in self.records:
            return self.records[name]
        labels = name.split(".")
        for i in range(1, len(labels)):
            wildcard = "*." + ".".join(labels[i:])
            if wildcard in self.records:
                return self.records[wildcard]
        if any(owner.endswith("." + name) for owner in self.records):
            return []  # an empty non-terminal: exists, has no records
        return None

    def _lookup(self, name, cls, type, timeout):
        text = (name.decode("ascii") if isinstance(name, bytes) else name).lower().rstrip(".")
        self.queries.append((text, type))
        found = self._find(text)
        if found is None:
            return defer.fail(DomainError(text))
        answers = [
            dns.RRHeader(name=text, type=p.TYPE, cls=dns.IN, ttl=60, payload=p, auth=True)
            for p in found
            if p.TYPE == type
        ]
        return defer.succeed((answers, [], []))


class _Silent(protocol.DatagramProtocol):
    def datagramReceived(self, data, addr):
        pass


class FakeDNS:
    """A DNS server for a :class:`Zone` on 127.0.0.1 (UDP and TCP, same port)."""

    def __init__(self, zone: Zone, *, reactor, silent: bool = False) -> None:
        self.zone = zone
        self.reactor = reactor
        self.silent = silent
        self._ports: list = []

    def start(self) -> None:
        factory = dns_server.DNSServerFactory(authorities=[self.zone])
        for _ in range(20):
            udp_protocol = _Silent() if self.silent else dns.DNSDatagramProtocol(controller=factory)
            udp = self.reactor.listenUDP(0, udp_protocol, interface="127.0.0.1")
            try:
                tcp = self.reactor.listenTCP(udp.getHost().port, factory, interface="127.0.0.1")
            except error.CannotListenError:
                udp.stopListening()
                continue
            self._ports = [udp, tcp]
            return
        raise RuntimeError("no free port pair for the fake DNS server")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._ports[0].getHost().port}"

    def stop(self) -> defer.Deferred:
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self._ports])


# ---------------------------------------------------------------------------------------
# TLS front with virtual hosts


@implementer(IOpenSSLContextFactory)
class SNIContextFactory:
    """Server TLS settings picking the certificate by SNI name (default otherwise)."""

    def __init__(self, default, by_name: dict[str, Any]) -> None:
        self._default = self._options(default)
        self._by_name = {name: self._options(pair) for name, pair in by_name.items()}
        self._context = None

    @staticmethod
    def _options(pair):
        return ssl.PrivateCertificate.loadPEM(pair.key_pem + pair.cert_pem).options()

    def getContext(self) -> SSL.Context:
        if self._context is None:
            context = self._default.getContext()

            def pick(connection) -> None:
                name = connection.get_servername()
                options = self._by_name.get(name.decode("ascii")) if name else None
                if options is not None:
                    connection.set_context(options.getContext())

            context.set_tlsext_servername_callback(pick)
            self._context = context
        return self._context


class TLSFront:
    """One TLS port on 127.0.0.1 (and ::1) serving a NameVirtualHost."""

    def __init__(self, vhosts: vhost.NameVirtualHost, *, reactor) -> None:
        self.vhosts = vhosts
        self.reactor = reactor
        self.servers: list[FakeServer] = []
        self.port: Optional[int] = None

    def start(self, context_factory, *, ipv6: bool) -> None:
        for _ in range(20):
            v4 = FakeServer(self.vhosts, reactor=self.reactor)
            v4.listen_ssl("127.0.0.1", context_factory)
            servers = [v4]
            if ipv6:
                v6 = FakeServer(self.vhosts, reactor=self.reactor)
                try:
                    v6.listen_ssl("::1", context_factory, port=v4.port)
                except error.CannotListenError:
                    v4._port.stopListening()
                    continue
                servers.append(v6)
            self.servers, self.port = servers, v4.port
            return
        raise RuntimeError("no port free on both 127.0.0.1 and ::1")

    def stop(self) -> defer.Deferred:
        return defer.gatherResults([s.stop() for s in self.servers])


# ---------------------------------------------------------------------------------------
# HTTP resources


def _json(request, status: int, obj, headers: Optional[dict] = None) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in (headers or {}).items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return json.dumps(obj).encode("utf-8")


def _empty(request, status: int, headers: dict) -> bytes:
    request.setResponseCode(status)
    for name, value in headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return b""


def _error(request, status: int, errcode: str, message: str, headers=None) -> bytes:
    return _json(request, status, {"errcode": errcode, "error": message}, headers)


class Router(resource.Resource):
    """A leaf resource dispatching on (method, full path) to handlers; records requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str]] = []

    def route(self, request, method: str, path: str) -> Optional[Callable]:  # overridden
        return None

    def render(self, request):
        method = request.method.decode("ascii")
        path = request.path.decode("utf-8")
        self.requests.append((method, path))
        handler = self.route(request, method, path)
        if handler is None:
            return _error(request, 404, "M_UNRECOGNIZED", "Unrecognized request")
        return handler(request)


class ServerNameHost(Router):
    """``https://example.test``: the client and server well-knowns."""

    def __init__(self, deployment: "Deployment") -> None:
        super().__init__()
        self.d = deployment
        self.client_well_known: Optional[dict] = None  # None → 404
        self.cors = True
        self.server_well_known: Optional[dict] = None

    def route(self, request, method, path):
        if method == "GET" and path == "/.well-known/matrix/client" and self.client_well_known is not None:
            headers = {"Access-Control-Allow-Origin": "*"} if self.cors else {}
            return lambda r: _json(r, 200, self.client_well_known, headers)
        if method == "GET" and path == "/.well-known/matrix/server" and self.server_well_known is not None:
            return lambda r: _json(r, 200, self.server_well_known)
        return None


class Homeserver(ServerNameHost):
    """``https://matrix.example.test``: client API, federation userinfo, MSC4140, MSC4143."""

    def __init__(self, deployment: "Deployment") -> None:
        super().__init__(deployment)
        self.msc4140 = True
        self.transports: Optional[list] = None  # None → endpoint absent
        self.openid_tokens: dict[str, str] = {}
        self.delayed_event_burst: Optional[int] = None  # None → never throttled
        self.delayed_event_calls = 0
        #: "open" (Synapse today), "auth" (the current MSC text), None (no endpoint).
        self.delayed_event_endpoint: Optional[str] = "open"

    def _authorised(self, request) -> bool:
        return request.getHeader(b"authorization") == f"Bearer {ACCESS_TOKEN}".encode("ascii")

    def route(self, request, method, path):
        handler = super().route(request, method, path)
        if handler is not None:
            return handler
        if method == "GET" and path == "/_matrix/client/versions":
            features = {"org.matrix.msc4140": True} if self.msc4140 else {}
            return lambda r: _json(r, 200, {"versions": ["v1.1", "v1.11"], "unstable_features": features})
        if method == "GET" and path == "/_matrix/client/v3/account/whoami":
            return self._whoami
        if method == "POST" and path.startswith("/_matrix/client/v3/user/") and path.endswith("/openid/request_token"):
            return self._openid
        if method == "GET" and path == "/_matrix/federation/v1/openid/userinfo":
            return self._userinfo
        if method == "GET" and path == "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports":
            if self.transports is None:
                return None
            return self._transports
        if method == "POST" and path.startswith("/_matrix/client/unstable/org.matrix.msc4140/delayed_events/"):
            return self._delayed_event if self.delayed_event_endpoint else None
        return None

    def _whoami(self, request):
        if not self._authorised(request):
            return _error(request, 401, "M_UNKNOWN_TOKEN", "Invalid access token passed.")
        return _json(request, 200, {"user_id": USER_ID, "device_id": DEVICE_ID})

    def _openid(self, request):
        user = unquote(request.path.decode("ascii").split("/")[5])
        if not self._authorised(request) or user != USER_ID:
            return _error(request, 403, "M_FORBIDDEN", "Cannot request tokens for other users.")
        token = f"oidc_{len(self.openid_tokens) + 1}_doctor"
        self.openid_tokens[token] = USER_ID
        return _json(
            request,
            200,
            {"access_token": token, "token_type": "Bearer", "matrix_server_name": SERVER, "expires_in": 3600},
        )

    def _userinfo(self, request):
        token = parse_qs(request.uri.decode("ascii").partition("?")[2]).get("access_token", [""])[0]
        user = self.openid_tokens.get(token)
        if user is None:
            return _error(request, 401, "M_UNKNOWN_TOKEN", "Access Token unknown or expired")
        return _json(request, 200, {"sub": user})

    def _transports(self, request):
        if not self._authorised(request):
            return _error(request, 401, "M_MISSING_TOKEN", "Missing access token.")
        return _json(request, 200, {"rtc_transports": self.transports})

    def _delayed_event(self, request):
        self.delayed_event_calls += 1
        if self.delayed_event_endpoint == "auth" and not self._authorised(request):
            return _error(request, 401, "M_MISSING_TOKEN", "Missing access token.")
        if self.delayed_event_burst is not None and self.delayed_event_calls > self.delayed_event_burst:
            body = {"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests", "retry_after_ms": 1000}
            return _json(request, 429, body, {"Retry-After": "1"})
        return _error(request, 404, "M_NOT_FOUND", "Delayed event not found")


CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token",
}


class Service(Router):
    """``https://rtc.example.test/livekit/jwt``: an authorization service behind a proxy."""

    def __init__(self, deployment: "Deployment") -> None:
        super().__init__()
        self.d = deployment
        self.strip_prefix = True
        self.cors = True
        self.sfu_url = f"wss://{SFU_HOST}"
        self.running = True

    def route(self, request, method, path):
        if not self.running:
            return lambda r: _error(r, 502, "M_UNKNOWN", "Bad Gateway")
        if not path.startswith(SERVICE_PREFIX + "/"):
            return None
        if self.strip_prefix:
            path = path[len(SERVICE_PREFIX):]
        headers = dict(CORS) if self.cors else {}
        if path == "/healthz" and method in ("GET", "HEAD"):
            return lambda r: b""
        if path in ("/get_token", "/sfu/get"):
            if method == "OPTIONS":
                return lambda r: _empty(r, 200, headers)
            if method == "POST" and path == "/get_token":
                return lambda r: self._get_token(r, headers)
        return lambda r: (r.setResponseCode(404), b"404 page not found\n")[1]

    def _get_token(self, request, headers):
        try:
            body = json.loads(request.content.read())
            openid, member = body["openid_token"], body["member"]
            room_id, slot_id = body["room_id"], body["slot_id"]
        except (ValueError, KeyError, TypeError):
            return _error(request, 400, "M_BAD_JSON", "The request body is missing `room_id` or `slot_id`", headers)
        user = self.d.homeserver.openid_tokens.get(openid.get("access_token"))
        if user is None or user != member.get("claimed_user_id"):
            return _error(request, 401, "M_UNAUTHORIZED", "The request could not be authorised.", headers)
        now = int(self.d.reactor.seconds())
        identity = lk_hash(user, member["claimed_device_id"], member["id"])
        claims = {
            "iss": LIVEKIT_KEY,
            "sub": identity,
            "exp": now + 3600,
            "nbf": now,
            "iat": now,
            "identity": identity,
            "video": {
                "roomJoin": True,
                "room": lk_hash(room_id, slot_id),
                "canPublish": True,
                "canSubscribe": True,
                "canUpdateOwnMetadata": True,
            },
        }
        token = pyjwt.encode(claims, LIVEKIT_SECRET, algorithm="HS256")
        return _json(request, 200, {"url": self.sfu_url, "jwt": token}, headers)


class SFU(Router):
    """``https://sfu.example.test``: LiveKit's ``/`` answer and Twirp CreateRoom."""

    def __init__(self, deployment: "Deployment") -> None:
        super().__init__()
        self.d = deployment
        self.secret = LIVEKIT_SECRET
        self.rooms: list[str] = []

    def route(self, request, method, path):
        if method == "GET" and path == "/":
            return lambda r: b"OK"
        if method == "POST" and path == "/twirp/livekit.RoomService/CreateRoom":
            return self._create_room
        return lambda r: _json(r, 404, {"code": "bad_route", "msg": f"no handler for path {path}"})

    def _create_room(self, request):
        auth = (request.getHeader(b"authorization") or b"").decode("ascii")
        try:
            claims = pyjwt.decode(auth.removeprefix("Bearer "), self.secret, algorithms=["HS256"])
        except pyjwt.InvalidTokenError as e:
            return _json(request, 401, {"code": "unauthenticated", "msg": f"invalid token: {e}"})
        if not claims.get("video", {}).get("roomCreate"):
            return _json(request, 403, {"code": "permission_denied", "msg": "no roomCreate grant"})
        req = CreateRoomRequest.FromString(request.content.read())
        self.rooms.append(req.name)
        request.setHeader(b"content-type", b"application/protobuf")
        return Room(sid="RM_doctor", name=req.name, creation_time=int(self.d.reactor.seconds())).SerializeToString()


# ---------------------------------------------------------------------------------------
# the whole deployment


class Deployment:
    """A correct deployment of example.test on loopback; break parts of it per test."""

    def __init__(self, *, reactor, ipv6: bool = True) -> None:
        self.reactor = reactor
        self.ipv6 = ipv6
        self.listen_ipv6 = ipv6
        self.ca = TestCA()
        self.names = [SERVER, HS_HOST, SERVICE_HOST, SFU_HOST]
        self.certificates: dict[str, Any] = {}  # per-name overrides (SNI)
        self.default_certificate = None
        self.zone = Zone()
        for name in self.names:
            self.zone.address(name, "127.0.0.1", *(["::1"] if ipv6 else []))
        self.server_host = ServerNameHost(self)
        self.homeserver = Homeserver(self)
        self.service = Service(self)
        self.sfu = SFU(self)
        self.vhosts = vhost.NameVirtualHost()
        for name, site in (
            (SERVER, self.server_host),
            (HS_HOST, self.homeserver),
            (SERVICE_HOST, self.service),
            (SFU_HOST, self.sfu),
        ):
            self.vhosts.addHost(name.encode("ascii"), site)
        self.dns = FakeDNS(self.zone, reactor=reactor)
        self.front = TLSFront(self.vhosts, reactor=reactor)
        self.tmp = tempfile.mkdtemp(prefix="rtcauth-doctor-")
        self.ca_file = self.ca.write_ca(self.tmp)

    @property
    def service_url(self) -> str:
        return f"https://{SERVICE_HOST}{SERVICE_PREFIX}"

    def start(self) -> None:
        """Listen (DNS, TLS front) and fill in the well-knowns for the chosen port."""
        self.dns.start()
        default = self.default_certificate or self.ca.issue(self.names + ["127.0.0.1", "::1"])
        self.front.start(SNIContextFactory(default, self.certificates), ipv6=self.listen_ipv6)
        self.server_host.client_well_known = {
            "m.homeserver": {"base_url": f"https://{HS_HOST}"},
            "org.matrix.msc4143.rtc_foci": [{"type": "livekit", "livekit_service_url": self.service_url}],
        }
        self.server_host.server_well_known = {"m.server": f"{HS_HOST}:{self.front.port}"}

    def stop(self) -> defer.Deferred:
        return defer.gatherResults([self.dns.stop(), self.front.stop()])

    def env_file(self, **overrides: str) -> str:
        env = {
            "LIVEKIT_URL": f"wss://{SFU_HOST}",
            "LIVEKIT_KEY": LIVEKIT_KEY,
            "LIVEKIT_SECRET": LIVEKIT_SECRET,
            "LIVEKIT_FULL_ACCESS_HOMESERVERS": SERVER,
        }
        env.update(overrides)
        path = os.path.join(self.tmp, "rtcauthd.env")
        with open(path, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in env.items()))
        return path

    def doctor(self, *, server_name: str = SERVER, timeout: float = 5.0, access_token=None,
               config_file: Optional[str] = None, ca_file: Any = True, environ=None):
        """Run the doctor in-process against this deployment (a Deferred of the Report)."""
        from rtcauthd.config import ConfigError, load_config
        from rtcauthd.doctor.context import DoctorOptions
        from rtcauthd.doctor.dns import parse_dns_server
        from rtcauthd.doctor.net import build_network
        from rtcauthd.doctor.runner import diagnose

        config = config_error = source = None
        if config_file is not None:
            source = f"--config {config_file}"
            try:
                config = load_config(environ or {}, config_file=config_file)
            except ConfigError as e:
                config_error = str(e)
        options = DoctorOptions(
            server_name=server_name,
            https_port=self.front.port,
            timeout=timeout,
            access_token=access_token,
            config=config,
            config_error=config_error,
            config_source=source,
        )
        network = build_network(
            self.reactor,
            timeout=timeout,
            https_port=self.front.port,
            dns_servers=[parse_dns_server(self.dns.address)],
            custom_dns=True,
            ca_file=self.ca_file if ca_file is True else ca_file,
            user_agent="rtcauth-doctor-test",
        )
        return defer.Deferred.fromCoroutine(diagnose(options, reactor=self.reactor, network=network))
