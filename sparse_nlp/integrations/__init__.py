"""Hugging Face glue: SparseTrainer (trainer.py), SparsityCallback (callback.py), console output (console.py)."""
