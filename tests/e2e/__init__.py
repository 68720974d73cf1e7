"""End-to-end tests: the real rtcauthd daemon against real Synapse homeservers."""
