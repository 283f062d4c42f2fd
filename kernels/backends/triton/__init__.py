"""Backend "triton": launchers.py (tiles, grids, launches) over kernels.py (the @triton.jit kernels)."""
