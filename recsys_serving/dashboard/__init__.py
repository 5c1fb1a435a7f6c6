"""The live service dashboard: figures computed from the server's own metrics, and the
page that charts them (``static/``, drawn by Vega-Lite served from ``vl-convert``).

The HTTP side lives in :mod:`recsys_serving.api.dashboard`; this package holds what can
be tested without a server: parsing a ``/metrics`` exposition into a :class:`Snapshot`,
windowed rates and latency quantiles between two snapshots, and the promotion/rollback
history as the page shows it.
"""
