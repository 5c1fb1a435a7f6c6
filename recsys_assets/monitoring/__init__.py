"""The closed loop: online CTR, the drop test, the canary judge, and the Dagster glue."""
