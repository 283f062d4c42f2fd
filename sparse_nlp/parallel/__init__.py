"""Several processes: DDP (ddp.py), FSDP2 (fsdp.py) and gradient clipping over both (clipping.py)."""
