"""The delayed-leave job's states, signals and transition tables, as plain data.

Upstream's state machine must be matched exactly (which disconnects send the leave, which
abort silently, when ``restart`` is called), so it is written down once, here, and
:class:`rtcauthd.leave.jobs.DelayedLeaveJob` only interprets it.

Transition table (docs/delegated-leave.md#transitions; blank = ignored, ``*`` = internal action, no state change)::

    Signal \\ State                       Waiting       Connected      Disconn.  Aborted   Replaced
    ParticipantConnected                  Connected
    ParticipantLookupSuccessful           Connected
    ParticipantDisconnectedIntentionally  (ignored)     Disconnected
    ParticipantConnectionAborted          Aborted       Disconnected
    DelayedEventReset                                   * restart
    DelayedEventTimedOut                                Aborted
    DelayedEventNotFound                                Aborted
    CsApiUrlNotFound                                    Aborted
    WaitingStateTimedOut                  Disconnected
    SFUParticipantGone                                  Disconnected
    SFUNotAvailable
    JobReplaced                           Replaced      Replaced       Replaced  Replaced
"""

from __future__ import annotations

import enum
from types import MappingProxyType
from typing import Mapping, Tuple


class State(enum.Enum):
    WaitingForInitialConnect = "WaitingForInitialConnect"
    Connected = "Connected"
    Disconnected = "Disconnected"
    Aborted = "Aborted"
    Replaced = "Replaced"


class Signal(enum.Enum):
    """Events a job reacts to; values are upstream's names (webhook mapping uses them)."""

    ParticipantConnected = "ParticipantConnected"
    ParticipantLookupSuccessful = "ParticipantLookupSuccessful"
    ParticipantDisconnectedIntentionally = "ParticipantDisconnectedIntentionally"
    ParticipantConnectionAborted = "ParticipantConnectionAborted"
    DelayedEventReset = "DelayedEventReset"
    DelayedEventTimedOut = "DelayedEventTimedOut"
    DelayedEventNotFound = "DelayedEventNotFound"
    CsApiUrlNotFound = "CsApiUrlNotFound"
    WaitingStateTimedOut = "WaitingStateTimedOut"
    SFUNotAvailable = "SFUNotAvailable"  # defined upstream, never raised
    JobReplaced = "JobReplaced"
    SFUParticipantGone = "SFUParticipantGone"



_W, _C, _D, _A, _R = (
    State.WaitingForInitialConnect,
    State.Connected,
    State.Disconnected,
    State.Aborted,
    State.Replaced,
)

#: (state, signal) → target state. Anything missing here and in INTERNAL_ACTIONS is ignored.
TRANSITIONS: Mapping[Tuple[State, Signal], State] = MappingProxyType(
    {
        (_W, Signal.ParticipantConnected): _C,
        (_W, Signal.ParticipantLookupSuccessful): _C,
        (_W, Signal.ParticipantConnectionAborted): _A,
        (_W, Signal.WaitingStateTimedOut): _D,
        (_W, Signal.JobReplaced): _R,
        (_C, Signal.ParticipantDisconnectedIntentionally): _D,
        (_C, Signal.ParticipantConnectionAborted): _D,
        (_C, Signal.DelayedEventTimedOut): _A,
        (_C, Signal.DelayedEventNotFound): _A,
        (_C, Signal.CsApiUrlNotFound): _A,
        (_C, Signal.SFUParticipantGone): _D,
        (_C, Signal.JobReplaced): _R,
        (_D, Signal.JobReplaced): _R,
        (_A, Signal.JobReplaced): _R,
    }
)

#: (state, signal) → method name run *instead of* a transition (no exit/entry actions).
INTERNAL_ACTIONS: Mapping[Tuple[State, Signal], str] = MappingProxyType(
    {
        (_C, Signal.DelayedEventReset): "_start_restart",
    }
)

#: state → method name run when the state is entered / left by a transition.
ENTRY_ACTIONS: Mapping[State, str] = MappingProxyType(
    {
        _C: "_enter_connected",
        _D: "_enter_disconnected",
        _A: "_enter_aborted",
        # Replaced: nothing; the manager cancels the job right after signalling it.
    }
)
EXIT_ACTIONS: Mapping[State, str] = MappingProxyType(
    {
        _W: "_exit_waiting",
        _C: "_exit_connected",
    }
)
