"""The model runtime: bundle format, feature assembly, retrieval and ranking at request time."""
