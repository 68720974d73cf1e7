"""Outbound HTTP: every call rtcauthd makes to a homeserver, LiveKit or a well-known."""
