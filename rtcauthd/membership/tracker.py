"""The participants whose membership is enforced, and what the SFU last said of each.

An entry is made when the AS routes mint a token (docs/membership.md#tracking) and starts
*pending*: the holder may never connect. The ``participant_joined`` webhook (or a sweep's
``GetParticipant``) makes it *connected*, and only connected participants are ever
removed. ``participant_left`` and ``room_finished`` forget it, with one exception of our
own: a participant this service removed keeps its entry (pending again) until its token
has expired, because LiveKit does not revoke the token and the client may reconnect with
it; the ``participant_joined`` that follows then finds the entry and is checked at once.
Every change is handed to the store; the store never changes what the tracker decides.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rtcauthd.membership.record import Participant

log = Logger()

Key = Tuple[str, str]


class Entry:
    """One tracked participant; ``removed`` means this service took it off the SFU."""

    __slots__ = ("participant", "connected", "removed")

    def __init__(self, participant: Participant, *, connected: bool = False, removed: bool = False) -> None:
        self.participant = participant
        self.connected = connected
        self.removed = removed

    @property
    def key(self) -> Key:
        return self.participant.key

    def __repr__(self) -> str:
        state = "connected" if self.connected else ("removed" if self.removed else "pending")
        return f"<Entry {self.participant.matrix_user_id} {self.participant.livekit_room}/{state}>"


class ParticipantTracker:
    """Entries by (LiveKit room, identity); ``store`` has ``put(participant)`` and ``delete(room, identity)``."""

    def __init__(self, *, clock: IReactorTime, store, token_ttl: float) -> None:
        self._clock = clock
        self._store = store
        self._token_ttl = token_ttl
        self._entries: Dict[Key, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def get(self, room: str, identity: str) -> Optional[Entry]:
        return self._entries.get((room, identity))

    # -- from the token routes and start-up --------------------------------------------

    def register(self, *, matrix_room_id: str, matrix_user_id: str, livekit_room: str, livekit_identity: str) -> Entry:
        """A token was minted: track it; a re-issued token keeps "connected" and refreshes the time."""
        participant = Participant(
            matrix_room_id=matrix_room_id,
            matrix_user_id=matrix_user_id,
            livekit_room=livekit_room,
            livekit_identity=livekit_identity,
            registered_at=self._clock.seconds(),
        )
        entry = self._entries.get(participant.key)
        if entry is None:
            entry = self._entries[participant.key] = Entry(participant)
        else:
            # The homeserver has just said this user is joined; an earlier removal is over.
            entry.participant, entry.removed = participant, False
        self._store.put(participant)
        return entry

    def recover(self, participants: List[Participant]) -> int:
        """Entries read back at start-up, all pending; one registered since start wins."""
        added = 0
        for participant in participants:
            if participant.key not in self._entries:
                self._entries[participant.key] = Entry(participant)
                added += 1
        return added

    def adopt(self, participant: Participant, *, connected: bool) -> Entry:
        """A participant another instance registered (docs/membership.md#several-instances):
        tracked here too, without writing its record again."""
        entry = self._entries.get(participant.key)
        if entry is None:
            entry = self._entries[participant.key] = Entry(participant, connected=connected)
        elif connected:
            entry.connected = True
        return entry

    def merge(
        self, participants: Dict[Key, Participant], states: Dict[Key, bytes], unsent: "set[Key]", *,
        trust_connected: bool = True,
    ) -> None:
        """Take the shared set in Redis as the truth: entries of other instances are added,
        and removals and connects they saw are applied. An entry of ours that Redis lacks
        (another instance saw it leave — or Redis lost its data) is dropped once its token
        has expired; until then it turns pending and its record is written again, so that
        a Redis restart without persistence does not end enforcement for running calls
        (the SFU lookup of the next sweep tells whether it is still there). The first merge
        after a start does not trust ``connected``: it may be older than the restart, and
        recovered entries are looked up on the SFU before anybody is removed."""
        for key, participant in participants.items():
            state = states.get(key)
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = Entry(
                    participant, connected=trust_connected and state == b"connected", removed=state == b"removed"
                )
                continue
            if participant.registered_at > entry.participant.registered_at:
                entry.participant = participant  # a newer token, minted elsewhere
            if state == b"removed":
                entry.connected, entry.removed = False, True
            elif state == b"connected" and trust_connected:
                entry.connected = True
        for key in [k for k in self._entries if k not in participants and k not in unsent]:
            entry = self._entries[key]
            if self.token_expired(entry):
                del self._entries[key]
            else:
                entry.connected = False
                self._store.put(entry.participant)

    # -- from webhooks ------------------------------------------------------------------

    def joined(self, room: str, identity: str) -> Optional[Entry]:
        """``participant_joined``: the entry, now connected (None: not ours, ignored)."""
        entry = self._entries.get((room, identity))
        if entry is not None:
            entry.connected = True
        return entry

    def left(self, room: str, identity: str) -> None:
        """``participant_left``: forgotten, unless we removed it (then kept until its token expires)."""
        entry = self._entries.get((room, identity))
        if entry is None:
            return
        if entry.removed:
            entry.connected = False
            return
        self.forget(entry)

    def room_finished(self, room: str) -> int:
        """``room_finished``: every entry of the LiveKit room but the removed ones is forgotten."""
        gone = [e for e in self._entries.values() if e.participant.livekit_room == room and not e.removed]
        for entry in gone:
            self.forget(entry)
        for entry in self._entries.values():
            if entry.participant.livekit_room == room:
                entry.connected = False
        return len(gone)

    # -- from the sweep ----------------------------------------------------------------

    def mark_connected(self, entry: Entry) -> None:
        if self._entries.get(entry.key) is entry:
            entry.connected = True

    def mark_removed(self, entry: Entry) -> None:
        if self._entries.get(entry.key) is entry:
            entry.connected, entry.removed = False, True

    def forget(self, entry: Entry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self._store.delete(*entry.key)

    def token_expired(self, entry: Entry) -> bool:
        """Its token (registered then, ``token_ttl`` long) can no longer be used to connect."""
        return self._clock.seconds() - entry.participant.registered_at > self._token_ttl

    def pending(self) -> List[Entry]:
        return [e for e in self._entries.values() if not e.connected]

    def connected_by_room(self) -> Dict[str, List[Entry]]:
        """Connected entries grouped by Matrix room: what one sweep asks the homeserver about."""
        rooms: Dict[str, List[Entry]] = defaultdict(list)
        for entry in self._entries.values():
            if entry.connected:
                rooms[entry.participant.matrix_room_id].append(entry)
        return dict(rooms)

    def matrix_rooms(self) -> List[str]:
        """Every Matrix room with a tracked participant (what a sweep claims)."""
        return sorted({e.participant.matrix_room_id for e in self._entries.values()})

    def in_matrix_room(self, matrix_room_id: str) -> List[Entry]:
        return [e for e in self._entries.values() if e.participant.matrix_room_id == matrix_room_id]
