"""Job stores: memory and Redis."""
