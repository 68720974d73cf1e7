"""The one record of a delegated leave: what the client handed over, in one unit.

Everything that carries a job — the token endpoint registering it, the job machine, the
Redis record (:class:`rtcauthd.store.model.StoredJob` wraps it with ``RestartedAt``) —
uses this type, so a new field is added here and in the stored form's encoder only.
The delay is integer nanoseconds: upstream's Go ``time.Duration``, which is also what the
Redis record stores, so nothing is rounded on the way.
"""

from __future__ import annotations

from typing import Optional, Tuple

import attr

NS_PER_SECOND = 1_000_000_000
NS_PER_MS = NS_PER_SECOND // 1000


def _owner(value: Optional[str]) -> Optional[str]:
    # Upstream stores "" for "no owner"; one spelling here keeps records comparable.
    return value or None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class JobParams:
    """A delayed leave to keep alive for (room, identity); ``delay_timeout_ns`` in nanoseconds.

    ``owner_user_id`` is the MXID a job registered through the application-service route
    acts as (docs/delegated-leave.md#acting-as-the-user); None for legacy-route jobs.
    """

    delay_id: str
    delay_timeout_ns: int
    server_name: str
    room: str
    identity: str
    owner_user_id: Optional[str] = attr.ib(default=None, converter=_owner)

    @property
    def key(self) -> Tuple[str, str]:
        """The job key (LiveKit room alias, LiveKit identity); one job per key."""
        return (self.room, self.identity)


def go_duration(ns: int) -> str:
    """``ns`` as Go's ``time.Duration.String`` writes it (e.g. ``0s``, ``-1.5ms``, ``1h0m0s``)."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < NS_PER_SECOND:
        for unit, scale in (("ns", 1), ("\u00b5s", 1_000), ("ms", 1_000_000)):
            if u < scale * 1_000:
                return sign + _go_fraction(u, scale) + unit
    minutes, rest = divmod(u, 60 * NS_PER_SECOND)
    text = _go_fraction(rest, NS_PER_SECOND) + "s"
    if minutes:
        hours, minutes = divmod(minutes, 60)
        text = (f"{hours}h" if hours else "") + f"{minutes}m" + text
    return sign + text


def _go_fraction(value: int, scale: int) -> str:
    whole, frac = divmod(value, scale)
    if not frac:
        return str(whole)
    digits = str(frac).rjust(len(str(scale)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"
