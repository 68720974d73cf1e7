"""The one record of a delegated leave: what the client handed over, in one unit.

Everything that carries a job — the token endpoint registering it, the job machine, the
Redis record (:class:`rtcauthd.store.model.StoredJob` wraps it with ``RestartedAt``) —
uses this type, so a new field is added here and in the stored form's encoder only.
The delay is integer nanoseconds: upstream's Go ``time.Duration``, which is also what the
Redis record stores, so nothing is rounded on the way.
"""

from __future__ import annotations

from typing import Tuple

import attr

NS_PER_SECOND = 1_000_000_000
NS_PER_MS = NS_PER_SECOND // 1000


@attr.s(frozen=True, slots=True, auto_attribs=True)
class JobParams:
    """A delayed leave to keep alive for (room, identity); ``delay_timeout_ns`` in nanoseconds."""

    delay_id: str
    delay_timeout_ns: int
    server_name: str
    room: str
    identity: str

    @property
    def key(self) -> Tuple[str, str]:
        """The job key (LiveKit room alias, LiveKit identity); one job per key."""
        return (self.room, self.identity)
