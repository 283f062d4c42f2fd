"""sparse_nlp: train sparse transformers for language."""
