"""Experiment tracking: training runs and the registry mirrored into MLflow."""
