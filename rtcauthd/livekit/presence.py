"""What the SFU tells us about a participant, shared by the LiveKit clients and the job machine.

The Twirp client answers a :class:`Presence`; webhooks become one of the ``SIGNAL_*``
names (upstream's job-signal names). Keeping them here lets ``leave/`` react to the SFU
without importing the Twirp client or the webhook verifier.
"""

from __future__ import annotations

import enum


class Presence(enum.Enum):
    """Outcome of a participant lookup."""

    PRESENT = "present"
    ABSENT = "absent"  # the SFU itself said not_found
    UNKNOWN = "unknown"  # transport error or an answer we cannot trust


SIGNAL_CONNECTED = "ParticipantConnected"
SIGNAL_DISCONNECTED_INTENTIONALLY = "ParticipantDisconnectedIntentionally"
SIGNAL_CONNECTION_ABORTED = "ParticipantConnectionAborted"
