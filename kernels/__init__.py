"""Block-sparse linear kernels (imports as sparse_nlp.kernels)."""
