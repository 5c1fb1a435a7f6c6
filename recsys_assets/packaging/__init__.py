"""Packaging: the production model as an OCI artifact (the ``promoted_image`` asset)."""
