"""HTTP: the inbound Klein app and the outbound client."""
