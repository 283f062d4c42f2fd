"""Backend "native": compiled C kernels on the CPU. products.py calls them; build.py compiles cpu_kernels.c at first
use; output_pool.py recycles their outputs; huge_pages.py puts large CPU buffers on transparent huge pages."""
