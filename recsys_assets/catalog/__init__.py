"""The catalog assets: Parquet snapshots of the document store's items and users."""
