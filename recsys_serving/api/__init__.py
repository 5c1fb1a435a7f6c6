"""HTTP API: the recommendation service and the collector (``app.create_app``)."""
