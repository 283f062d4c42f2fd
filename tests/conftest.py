"""Test setup shared by the whole suite.

Triton kernels run on the CPU under the interpreter; the variable must be set before any module
with an ``@triton.jit`` function is imported, which is why it is set here, at collection start.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub: tiny models come from configs
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
