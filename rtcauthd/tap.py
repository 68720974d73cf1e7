"""``twistd rtcauth``: command-line options and the one place that builds real agents.

Everything else receives its reactor, agents and clients; here they are made from the
Config and wired together into a :class:`Daemon` (``build_daemon``).
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any, Mapping, Optional

import attr
from twisted.internet.defer import DeferredSemaphore
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from rtcauthd import __version__
from rtcauthd import logging as rtc_logging
from rtcauthd.config import Config, ConfigError, load_config, settings_help

log = Logger()

#: SFU participant lookups in flight at once; the rest queue (each still bounded in time).
MAX_CONCURRENT_LOOKUPS = 128

class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "rtcauthd: the MatrixRTC authorization service (a drop-in for lk-jwt-service). "
        "Verifies Matrix OpenID tokens over federation and answers LiveKit access tokens."
    )
    optFlags = [
        [
            "dev",
            None,
            "Development mode: LiveKit dev credentials (devkey/secret), ws://localhost:7880 and "
            "full access for localhost wherever the environment sets nothing. Loudly logged.",
        ],
    ]
    optParameters = [
        ["config", "c", None, "Read KEY=value settings from this env file first (environment wins)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this Twisted endpoint string (repeatable), e.g. tcp6:8080:interface=\\:\\:,
        unix:/run/rtcauthd.sock, systemd:domain=INET:index=0. Overrides LIVEKIT_JWT_BIND."""
        self["listen"].append(endpoint)

    def getUsage(self, width=None) -> str:
        # The settings table is preformatted; usage's word wrapping would scramble it.
        return super().getUsage(width) + settings_help()

    def opt_version(self) -> None:
        print(f"rtcauthd {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        # Route twistd's log output through our observer unless --logger was given.
        parent = getattr(self, "parent", None)
        if parent is not None and not parent.get("logger"):
            parent["logger"] = "rtcauthd.logging.make_observer"


def fail_startup(message: str) -> "NoReturn":  # noqa: F821
    """One line naming the problem on stderr, exit status 1, no traceback."""
    sys.stderr.write(f"rtcauthd: configuration error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


def makeService(options: Mapping) -> "RtcAuthService":  # noqa: F821
    from twisted.internet import reactor

    from rtcauthd.gc_schedule import tune_for_serving

    try:
        config = load_config(
            os.environ,
            config_file=options.get("config"),
            listen=tuple(options.get("listen") or ()),
            dev=bool(options.get("dev")),
        )
    except ConfigError as e:
        fail_startup(str(e))
    rtc_logging.configure(
        level=config.log_level, log_format=config.log_format, secrets=config.secrets
    )
    raise_open_file_limit()
    try:
        service = build_daemon(config, reactor).service
    except ConfigError as e:
        fail_startup(str(e))
    # Serving from here on: garbage collection between reactor turns (rtcauthd/gc_schedule.py).
    service.when_ready().addCallbacks(lambda _ports: tune_for_serving(reactor), lambda _failure: None)
    return service


def raise_open_file_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit, as Go does at start: restored jobs, pooled
    connections and clients need more than the usual 1024 descriptors."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warn("Could not raise the open-file limit from {soft}: {error}", soft=soft, error=e)
            return
        log.info("Open-file limit raised from {soft} to {hard}", soft=soft, hard=hard)


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class Agents:
    """The outbound IAgents everything else is built on; tests hand in fakes."""

    federation: Any  # server-server API: .well-known/SRV resolution, SSRF-filtered
    plain: Any  # LiveKit and the client-server API of listed servers
    guarded: Any  # the client-server API of servers admitted only by "*": SSRF-filtered


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class Daemon:
    """The wired object graph, so tests and benchmarks can reach any part of it."""

    config: Config
    reactor: Any
    service: Any  # RtcAuthService: what twistd runs
    app: Any  # RtcAuthApp: the routes
    appservice: Optional[Any]  # the application-service routes, mounted only in AS mode
    membership: Optional[Any]  # MembershipMonitor: AS mode with a non-zero check interval
    site: Any  # RtcAuthSite serving the app
    metrics_site: Optional[Any]
    authorizer: Any
    manager: Any  # JobManager
    delegation: Any  # DelegatedLeave (or the stand-in given to build_daemon)
    store: Any  # IJobStore
    metrics: Any
    tokens: Any  # TokenMinter
    rooms: Any  # RoomServiceClient (Twirp)
    federation: Any  # VerificationGate over the FederationClient
    cs_api: Any  # ClientAPIResolver
    delayed_events: Any  # DelayedEventClient
    federation_http: Any
    plain_http: Any
    redirecting_http: Any
    guarded_http: Any
    pool: Any  # BoundedConnectionPool: full-access homeservers and LiveKit
    stranger_pool: Any  # BoundedConnectionPool: every other homeserver


def build_daemon(
    config: Config,
    reactor,
    *,
    agents: Optional[Agents] = None,
    store=None,
    federation=None,
    rooms=None,
    delegation=None,
    policy=None,
) -> Daemon:
    """Wire the daemon from its Config (raises ConfigError for settings that fail to load).

    Every keyword replaces one part with a stand-in (tests) or plugs one in (``policy``:
    an IRequestPolicy asked before every route handler); left out, the default is built.
    """
    from rtcauthd.authorizer import Authorizer
    from rtcauthd.leave.delegation import DelegatedLeave
    from rtcauthd.leave.jobs import State
    from rtcauthd.leave.manager import JobManager
    from rtcauthd.metrics import Metrics
    from rtcauthd.livekit.webhooks import WebhookVerifier
    from rtcauthd.matrix.csapi import ClientAPIResolver, DelayedEventClient
    from rtcauthd.inbound.app import RtcAuthApp
    from rtcauthd.inbound.admission import DEFAULT_BATCH, served_first
    from rtcauthd.inbound.site import RtcAuthSite, UTF8URLsOnly
    from rtcauthd.outbound.client import GoRedirectAgent, HTTPClient
    from rtcauthd.outbound.pool import full_access_pool, strangers_pool
    from rtcauthd.livekit.tokens import TokenMinter
    from rtcauthd.livekit.twirp import RoomServiceClient
    from rtcauthd.matrix.fanout import VerificationGate
    from rtcauthd.matrix.federation import FederationClient
    from rtcauthd.matrix.federation_agent import (
        build_federation_agent,
        build_guarded_web_agent,
        build_plain_agent,
    )
    from rtcauthd.matrix.ipfilter import DEFAULT_BLOCKLIST, IPRangeFilter
    from rtcauthd.service import RtcAuthService
    from rtcauthd.tls import TLSConfigError, TLSPolicy

    listeners = [("listen endpoint", d) for d in config.listen]
    if config.metrics_listen:
        listeners.append(("RTCAUTH_METRICS_LISTEN", config.metrics_listen))
    for what, description in listeners:
        try:
            serverFromString(reactor, description)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{what} {description!r} is invalid: {e}") from None
    try:
        tls_policy = TLSPolicy(ca_file=config.ca_file, insecure=config.insecure_skip_verify_tls)
    except TLSConfigError as e:
        raise ConfigError(str(e)) from None

    for warning in config.warnings:
        log.warn("{warning}", warning=warning)
    log.info(
        "rtcauthd {version}: LiveKit {url}, key from {key_source}, secret from {secret_source}, "
        "full access for {full_access}",
        version=__version__,
        url=config.livekit_url,
        key_source=config.key_source,
        secret_source=config.secret_source,
        full_access=", ".join(config.full_access_homeservers) or "(nobody)",
    )

    metrics = Metrics()
    ip_filter = IPRangeFilter(
        blocklist=list(config.ip_blocklist) if config.ip_blocklist is not None else list(DEFAULT_BLOCKLIST),
        allowlist=list(config.ip_allowlist),
    )
    # Keep-alive for every homeserver (docs/connection-pooling.md): the operator's hosts
    # and LiveKit share one pool, everyone else has a bounded one of its own.
    pool = full_access_pool(reactor)
    stranger_pool = strangers_pool(reactor, ip_filter, per_host=config.federation_max_per_server)
    if agents is None:
        agents = Agents(
            federation=build_federation_agent(
                reactor,
                tls_policy=tls_policy,
                ip_filter=ip_filter,
                is_trusted=config.is_named_full_access,  # "*" never disables the SSRF filter
                pool=pool,
                stranger_pool=stranger_pool,
                # Half the bound, so a hanging well-known host leaves time for the SRV/8448 fallback.
                well_known_timeout=config.outbound_timeout / 2,
            ),
            plain=build_plain_agent(reactor, tls_policy=tls_policy, pool=pool),
            guarded=build_guarded_web_agent(reactor, tls_policy=tls_policy, ip_filter=ip_filter),
        )
    federation_http = HTTPClient(clock=reactor, agent=agents.federation, timeout=config.outbound_timeout)
    plain_http = HTTPClient(clock=reactor, agent=agents.plain, timeout=config.outbound_timeout)
    # The client-server API calls follow redirects as upstream's Go client does (max 10);
    # servers admitted only by "*" get the SSRF-filtered variant for every hop.
    redirecting_http = HTTPClient(
        clock=reactor,
        agent=GoRedirectAgent(agents.plain, limit=10),
        timeout=config.outbound_timeout,
    )
    guarded_http = HTTPClient(clock=reactor, agent=agents.guarded, timeout=config.outbound_timeout)
    tokens = TokenMinter(
        api_key=config.api_key, api_secret=config.api_secret, clock=reactor, participant_ttl=config.token_ttl
    )
    if rooms is None:
        rooms = RoomServiceClient(
            livekit_url=config.livekit_url,
            http=plain_http,
            tokens=tokens,
            timeout=config.outbound_timeout,
            metrics=metrics,
        )
    if store is None:
        store = build_store(config, reactor, tls_policy, metrics)
    cs_api = ClientAPIResolver(
        clock=reactor,
        http=redirecting_http,
        guarded_http=guarded_http,
        is_trusted=config.is_named_full_access,
        overrides=config.cs_api_url_overrides,
    )
    delayed_events = DelayedEventClient(clock=reactor, resolver=cs_api, metrics=metrics, as_token=config.as_token)
    lookups = DeferredSemaphore(MAX_CONCURRENT_LOOKUPS)
    manager = JobManager(
        clock=reactor,
        store=store,
        restart=delayed_events.restart,
        send=delayed_events.send,
        # Bounded: 100 000 restored jobs all look up their participant at once (docs/delegated-leave.md#participant-lookup).
        lookup_participant=lambda params: lookups.run(rooms.get_participant, params.room, params.identity),
        sanity_interval=float(config.sanity_check_interval),
    )
    metrics.watch_pools({"full_access": pool, "strangers": stranger_pool})
    metrics.watch_jobs(lambda: (job.state.value for job in manager), (state.value for state in State))
    if delegation is None:
        delegation = DelegatedLeave(
            manager=manager,
            resolver=cs_api,
            webhooks=WebhookVerifier(api_key=config.api_key, api_secret=config.api_secret, clock=reactor),
            metrics=metrics,
            max_delay_seconds=config.max_delay_seconds,
        )
    if federation is None:
        federation = VerificationGate(
            FederationClient(http=federation_http),
            clock=reactor,
            is_full_access=config.is_named_full_access,
            max_inflight=config.federation_max_inflight,
            max_per_server=config.federation_max_per_server,
            metrics=metrics,
        )
    authorizer = Authorizer(
        config=config,
        federation=federation,
        tokens=tokens,
        rooms=rooms,
        leave_jobs=delegation,
        clock=reactor,
        metrics=metrics,
    )
    if policy is None:
        policy = request_policy(config, reactor, metrics)
    app = RtcAuthApp(authorizer=authorizer, clock=reactor, webhooks=delegation, policy=policy)
    root = app.resource()
    appservice = membership = None
    if config.appservice:
        # Synapse's proxied MSC4195 routes (docs/appservice.md). plain_http verifies TLS and
        # follows no redirect, so the as_token cannot travel anywhere else.
        from rtcauthd.inbound.appservice import appservice_resource, build_appservice_app
        from rtcauthd.matrix.appservice import HomeserverAppservice

        homeserver = HomeserverAppservice(clock=reactor, http=plain_http, as_token=config.as_token)
        if config.membership_check_interval > 0:
            membership = build_membership(
                config, reactor, homeserver, cs_api, rooms, manager, delegation, tls_policy, metrics, store
            )
        appservice = build_appservice_app(
            config=config,
            clock=reactor,
            http=plain_http,
            resolve_cs_api=cs_api.resolve,
            tokens=tokens,
            rooms=rooms,
            leave_jobs=delegation,
            lookup_delay=delayed_events.lookup_delay,
            metrics=metrics,
            homeserver=homeserver,
            participants=membership,
        )
        root = appservice_resource(root, appservice)
    site = RtcAuthSite(
        UTF8URLsOnly(root),
        max_body=config.max_body_bytes,
        reactor=reactor,
        clock=reactor,
        request_timeout=config.request_timeout,
        max_connections=config.max_connections if config.max_connections is not None else default_max_connections(),
        metrics=metrics,
        admission_batch=DEFAULT_BATCH,
        admission_classify=served_first(config.is_named_full_access, config.hs_token if config.appservice else None),
    )

    async def before_listen() -> None:
        # Stored jobs resume before the first /healthz 200 (docs/endpoints.md#health-endpoint).
        await manager.restore(reactor.seconds())
        if membership is not None:
            await membership.start()

    async def after_stop() -> None:
        if membership is not None:
            await membership.stop()
        manager.stop()  # timers cancelled; stored records stay for the next process
        await store.close()
        await pool.closeCachedConnections()
        await stranger_pool.closeCachedConnections()

    extra_listeners = []
    stats_site = metrics_site(metrics, reactor) if config.metrics_listen else None
    if stats_site is not None:
        extra_listeners.append((config.metrics_listen, stats_site))

    service = RtcAuthService(
        reactor=reactor,
        endpoints=config.listen,
        site=site,
        extra_listeners=extra_listeners,
        before_listen=before_listen,
        after_stop=after_stop,
    )
    return Daemon(
        config=config,
        reactor=reactor,
        service=service,
        app=app,
        appservice=appservice,
        membership=membership,
        site=site,
        metrics_site=stats_site,
        authorizer=authorizer,
        manager=manager,
        delegation=delegation,
        store=store,
        metrics=metrics,
        tokens=tokens,
        rooms=rooms,
        federation=federation,
        cs_api=cs_api,
        delayed_events=delayed_events,
        federation_http=federation_http,
        plain_http=plain_http,
        redirecting_http=redirecting_http,
        guarded_http=guarded_http,
        pool=pool,
        stranger_pool=stranger_pool,
    )


def build_membership(
    config: Config, reactor, homeserver, cs_api, rooms, manager, delegation, tls_policy, metrics, store=None
):
    """Membership enforcement (docs/membership.md): told of AS tokens and of every webhook;
    on the job store's Redis target, sharing the work with the other instances there."""
    from rtcauthd.membership.monitor import build_monitor

    redis_tls = redis_tls_policy(config, tls_policy)
    target = redis_target(config) if config.redis_url else None
    monitor = build_monitor(
        config=config,
        clock=reactor,
        homeserver=homeserver,
        resolve_cs_api=cs_api.resolve,
        rooms=rooms,
        stop_job=manager.discard,
        tls_policy=redis_tls,
        metrics=metrics,
        redis_target=target,
        cluster=(lambda: getattr(store, "cluster", None)) if target is not None else None,
    )
    observers = getattr(delegation, "observers", None)
    if observers is not None:
        observers.append(monitor.on_webhook)
    return monitor


def metrics_site(metrics, reactor):
    """A Site serving ``/metrics`` (Prometheus text format) and nothing else."""
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from rtcauthd.metrics import MetricsPage

    root = Resource()
    root.putChild(b"metrics", MetricsPage(metrics.registry))
    site = Site(root, reactor=reactor)
    site.noisy = False
    return site


def default_max_connections() -> int:
    """Half the open-file limit (the rest is for outbound calls, Redis and logs), at most 16384."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 16384
    return max(64, min(soft // 2, 16384))


def request_policy(config: Config, reactor, metrics):
    """The per-client rate limit from the config, or no policy when it is turned off (0)."""
    from rtcauthd.inbound.client_address import ClientAddresses
    from rtcauthd.inbound.policy import AllowAll
    from rtcauthd.inbound.ratelimit import RateLimitPolicy

    if config.ratelimit_per_second <= 0 or config.ratelimit_burst < 1:
        return AllowAll()
    return RateLimitPolicy(
        reactor,
        rate=config.ratelimit_per_second,
        burst=config.ratelimit_burst,
        clients=ClientAddresses(config.trusted_proxies),
        metrics=metrics,
    )


def cluster_settings(config: Config):
    """Instances sharing LIVEKIT_REDIS_URL share the jobs; nothing to turn on (docs/several-instances.md)."""
    from rtcauthd.cluster.coordinator import ClusterSettings
    from rtcauthd.cluster.lease import default_instance_name

    return ClusterSettings(name=config.instance_name or default_instance_name(), lease_seconds=config.job_lease_seconds)


def build_store(config: Config, reactor, tls_policy, metrics=None):
    """Redis when LIVEKIT_REDIS_URL is set, else memory (jobs lost on restart; logged)."""
    if not config.redis_url:
        from rtcauthd.store.memory import MemoryStore

        return MemoryStore()
    from rtcauthd.store.redis import RedisStore
    from rtcauthd.store.redis_url import RedisURLError

    try:
        redis_tls = redis_tls_policy(config, tls_policy)
        return RedisStore(
            redis_target(config), clock=reactor, tls_policy=redis_tls, metrics=metrics, cluster=cluster_settings(config)
        )
    except RedisURLError as e:
        raise ConfigError(f"Could not connect Redis store: {e}") from None


def redis_target(config: Config):
    """``LIVEKIT_REDIS_URL`` parsed (RedisURLError if invalid), with the Sentinels if set."""
    from rtcauthd.store.redis_url import parse_redis_url

    target = parse_redis_url(config.redis_url)
    if config.redis_sentinels:
        target = attr.evolve(target, sentinels=config.redis_sentinels, sentinel_master=config.redis_sentinel_master)
    return target


def redis_tls_policy(config: Config, tls_policy):
    """LIVEKIT_INSECURE_SKIP_VERIFY_TLS does not reach Redis (upstream's switch doesn't
    either); rediss:// verifies with the system roots plus RTCAUTH_CA_FILE."""
    from rtcauthd.tls import TLSPolicy

    return TLSPolicy(ca_file=config.ca_file, insecure=False) if tls_policy.insecure else tls_policy
