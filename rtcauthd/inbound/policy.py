"""The request-policy hook: one decision before any route handler runs.

The routes ask the policy about every request they are about to handle; the policy lets it
through or answers it itself. Rate limiting plugs in here, so a check may be asynchronous.
"""

from __future__ import annotations

from typing import Optional, Union

import attr
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from zope.interface import Interface, implementer

from rtcauthd.errors import MatrixError


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PolicyAnswer:
    """A raw answer (for what a MatrixError body cannot say, e.g. a ``Retry-After`` header)."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()


#: What a policy decides: ``None`` lets the request through; an error or answer is sent instead.
Verdict = Optional[Union[MatrixError, PolicyAnswer]]


class IRequestPolicy(Interface):
    def check(request: IRequest, endpoint: str) -> "Union[Verdict, Deferred[Verdict]]":
        """Decide on ``request`` for ``endpoint`` (the route's name, e.g. ``"get_token"``).

        Called after the route's own method and size checks, right before its handler.
        A MatrixError is answered as the handler's errors are (CORS headers included on
        the JSON endpoints); the handler then never runs.
        """


@implementer(IRequestPolicy)
class AllowAll:
    """The default: every request goes through."""

    def check(self, request: IRequest, endpoint: str) -> Verdict:
        return None
