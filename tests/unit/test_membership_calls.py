"""The calls membership enforcement adds: joined_members, RemoveParticipant, DeleteRoom, and
its setting (docs/membership.md#homeserver-requests, docs/membership.md#configuration)."""

from __future__ import annotations

import jwt
from livekit.protocol import room as lk_room
from twisted.trial.unittest import SynchronousTestCase

from rtcauthd.outbound.errors import FailureKind, OutboundError
from tests.support.config_loading import ConfigLoading
from tests.support.outbound import failed_with
from tests.unit.test_appservice_homeserver import AS_TOKEN, BASE, Fixture
from tests.unit.test_twirp import ALIAS, IDENTITY, KEY, SECRET, Answer, _Base, static, twirp_json

JOINED_PATH = b"/_matrix/client/v3/rooms/!room:example.com/joined_members"


class JoinedMembersTests(Fixture):
    def joined(self, room="!room:example.com"):
        return self.call(self.hs.joined_members(BASE, room))

    def test_user_ids_with_the_as_token_and_no_masquerade(self):
        self.server.answers[JOINED_PATH] = (
            200, b'{"joined": {"@a:example.com": {"display_name": "A"}, "@b:remote.example": {}}}'
        )
        self.assertEqual(self.successResultOf(self.joined()), frozenset({"@a:example.com", "@b:remote.example"}))
        [(method, uri, auth, _body)] = self.server.seen  # no /versions needed
        self.assertEqual((method, uri, auth), (b"GET", JOINED_PATH, b"Bearer " + AS_TOKEN.encode()))

    def test_room_id_is_one_path_segment(self):
        self.server.answers[b"/_matrix/client/v3/rooms/!a%2Fb%3Fc%23d:example.com/joined_members"] = (200, b'{"joined": {}}')
        self.assertEqual(self.successResultOf(self.joined("!a/b?c#d:example.com")), frozenset())

    def test_403_keeps_its_status(self):
        self.server.answers[JOINED_PATH] = (403, b'{"errcode": "M_FORBIDDEN", "error": "not in room"}')
        error = failed_with(self, self.joined(), FailureKind.HTTP_STATUS)
        self.assertEqual((error.status, error.code), (403, "M_FORBIDDEN"))

    def test_bodies_without_a_joined_object_fail(self):
        for body in (b"nope", b"[]", b"{}", b'{"joined": ["@a:example.com"]}'):
            self.server.answers[JOINED_PATH] = (200, body)
            failed_with(self, self.joined(), FailureKind.BAD_BODY)

    def test_bounded_in_time(self):
        self.server.hang = True
        d = self.joined()
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        failed_with(self, d, FailureKind.TIMEOUT)


class RemovalCallTests(_Base):
    def test_remove_participant_with_a_room_admin_token(self):
        self.sfu.participants.add((ALIAS, IDENTITY))
        self.assertIs(self.successResultOf(self.client().remove_participant(ALIAS, IDENTITY)), True)
        [seen] = self.sfu.seen
        self.assertEqual(seen.path, "/twirp/livekit.RoomService/RemoveParticipant")
        request = lk_room.RoomParticipantIdentity.FromString(seen.body)
        self.assertEqual((request.room, request.identity), (ALIAS, IDENTITY))
        claims = jwt.decode(seen.headers["authorization"][0][7:], SECRET, algorithms=["HS256"], issuer=KEY,
                            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})
        self.assertEqual(claims["video"], {"roomAdmin": True, "room": ALIAS})

    def test_not_found_is_false(self):
        self.assertIs(self.successResultOf(self.client().remove_participant(ALIAS, IDENTITY)), False)

    def test_other_errors_fail(self):
        self.sfu.script["RemoveParticipant"] = static(Answer(503, twirp_json("unavailable", "busy")))
        error = self.failureResultOf(self.client().remove_participant(ALIAS, IDENTITY), OutboundError).value
        self.assertEqual((error.status, error.code), (503, "unavailable"))
        # a bare 404 of a proxy is not the SFU's not_found
        self.sfu.script["RemoveParticipant"] = static(Answer(404, b"<html>"))
        error = self.failureResultOf(self.client().remove_participant(ALIAS, IDENTITY), OutboundError).value
        self.assertEqual(error.code, "bad_route")

    def test_delete_room_with_a_room_create_token(self):
        self.assertIs(self.successResultOf(self.client().delete_room(ALIAS)), True)
        [seen] = self.sfu.seen
        self.assertEqual(seen.path, "/twirp/livekit.RoomService/DeleteRoom")
        self.assertEqual(lk_room.DeleteRoomRequest.FromString(seen.body).room, ALIAS)
        self.sfu.script["DeleteRoom"] = static(Answer(404, twirp_json("not_found", "room does not exist")))
        self.assertIs(self.successResultOf(self.client().delete_room(ALIAS)), False)


class SettingTests(ConfigLoading, SynchronousTestCase):
    NAME = "LIVEKIT_MEMBERSHIP_CHECK_INTERVAL_SECONDS"
    WARNING = "LIVEKIT_MEMBERSHIP_CHECK_INTERVAL_SECONDS has no effect unless running as an application service"
    AS = {"LIVEKIT_AS_TOKEN": "as", "LIVEKIT_HS_TOKEN": "hs", "LIVEKIT_HS_SERVER_NAME": "example.com"}

    def test_default_is_30_and_0_turns_it_off(self):
        self.assertEqual(self.load(self.AS).membership_check_interval, 30)
        for raw, interval in (("", 30), ("0", 0), ("5", 5), ("+7", 7)):
            self.assertEqual(self.load({**self.AS, self.NAME: raw}).membership_check_interval, interval)

    def test_anything_but_a_non_negative_integer_is_fatal(self):
        for bad in ("-1", "1.5", "30s", " 30", "abc", "99999999999999999999"):
            self.assertConfigError(f'{self.NAME} must be a non-negative integer, got "{bad}"', {**self.AS, self.NAME: bad})

    def test_warning_without_application_service_mode(self):
        self.assertIn(self.WARNING, self.load({self.NAME: "30"}).warnings)
        self.assertNotIn(self.WARNING, self.load({self.NAME: "0"}).warnings)
        self.assertNotIn(self.WARNING, self.load().warnings)  # the default alone says nothing
        self.assertNotIn(self.WARNING, self.load({**self.AS, self.NAME: "30"}).warnings)
