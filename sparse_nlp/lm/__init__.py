"""The language-modelling side of sparse_nlp: corpus, data, tokenizer, perplexity, results tables.

The sparsity core (sparse_nlp.*) never imports this subpackage; recipes and the study build on it.
"""
