"""Several instances on one Redis: leases, fencing tokens, takeover, webhook routing."""
