"""Test setup shared by the whole suite.

Without a GPU, Triton kernels run on the CPU under the interpreter; the variable must be set before any module
with an ``@triton.jit`` function is imported (sparse_nlp.kernels imports them lazily), which is why it is set
here, at collection start. With a GPU it stays unset, so the suite runs the compiled kernels
(tests/kernels/test_kernels_cuda.py); TRITON_INTERPRET=1 set by hand still forces the interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub: tiny models come from configs
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
