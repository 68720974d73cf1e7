"""LiveKit: names, tokens, RoomService over Twirp, webhooks."""
