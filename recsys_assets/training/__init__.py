"""Training: interactions, features, retrieval, ranking, evaluation and registration."""
