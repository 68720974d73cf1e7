"""Membership enforcement: who leaves the Matrix room leaves the LiveKit room (docs/membership.md)."""
