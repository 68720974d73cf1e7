"""The whole daemon on a memory reactor, with fakes where it would touch the network.

``build_test_daemon`` goes through the real composition root (``tap.build_daemon``) so a test
sees the same wiring as production; ``SiteClient`` drives the daemon's own Site in memory
(its request factory enforces the body limit, its log is the access log).
"""

from __future__ import annotations

import json
from typing import Mapping, Optional, Union

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import Resource

from rtcauthd.config import Config, load_config
from rtcauthd.outbound.client import BytesProducer
from rtcauthd.store.memory import MemoryStore
from rtcauthd.tap import Agents, Daemon, build_daemon


def offline_agents(web: Optional[Resource] = None) -> Agents:
    """Every outbound agent answers from ``web`` in memory (by default: 404 for everything)."""
    agent = RequestTraversalAgent(web if web is not None else Resource())
    return Agents(federation=agent, plain=agent, guarded=agent)


def build_test_daemon(
    config: Union[Config, Mapping[str, str]],
    reactor=None,
    **parts,
) -> Daemon:
    """The daemon for ``config`` (a Config or an environment) on ``reactor`` (a fresh
    MemoryReactorClock by default), with a MemoryStore and offline agents unless ``parts``
    (build_daemon's keywords) say otherwise."""
    if not isinstance(config, Config):
        config = load_config(config)
    parts.setdefault("agents", offline_agents())
    parts.setdefault("store", MemoryStore())
    return build_daemon(config, reactor if reactor is not None else MemoryReactorClock(), **parts)


class SiteClient:
    """An in-memory HTTP client for one Site; ``flush()`` delivers what is pending."""

    def __init__(self, site) -> None:
        self._site = site
        self.agent = RequestTraversalAgent(site.resource)
        self.agent._serverFactory = site  # serve through our Site, not a plain one
        self.treq = HTTPClient(self.agent, data_to_body_producer=BytesProducer)

    def flush(self) -> None:
        self.agent.flush()
        admission = getattr(self._site, "admission", None)
        while admission is not None and len(admission):
            # The site handles requests one reactor turn after reading them.
            self._site.reactor.advance(0)
            self.agent.flush()

    def request(self, method: str, url: str, data=b"", headers=None) -> Deferred:
        """Fires with ``(response, body)``; a non-bytes ``data`` is sent as JSON."""
        if not isinstance(data, bytes):
            data = json.dumps(data).encode()
        d = self.treq.request(method, url, data=data, headers=headers)
        self.flush()
        return d.addCallback(lambda response: response.content().addCallback(lambda body: (response, body)))

    def raw_request(self, method: bytes, url: bytes) -> Deferred:
        """Bypasses treq, which upper-cases methods."""
        d = self.agent.request(method, url)
        self.flush()
        return d.addCallback(lambda response: treq.content(response).addCallback(lambda body: (response, body)))
