"""The sparse layers: one interface (base.py), two kinds (masked.py: fine-grained masks; block.py: live blocks)."""
