"""Data acquisition: landing files -> processed, partitioned weblogs in the lake."""
