"""HTTP API: the event collector now, the recommendation service as it grows."""
