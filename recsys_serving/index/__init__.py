"""Candidate retrieval: a broad first selection of items for the ranker to order."""
