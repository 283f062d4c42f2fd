"""The language-modelling side of sparse_nlp: corpus, data, tokenizer, perplexity, results tables, and the recipes'
flags (``arguments``) and the function that trains and reports one model (``training.train_one``).

The sparsity core (sparse_nlp.*) never imports this subpackage; the recipes (recipes/, the study's included) build on it.
"""
