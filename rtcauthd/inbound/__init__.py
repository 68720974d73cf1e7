"""Inbound HTTP: the Klein routes, the site and the request models clients talk to."""
