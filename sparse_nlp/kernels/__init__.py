"""Block-sparse linear kernels (imports as sparse_nlp.kernels).

    layout = BlockSparseLayout.from_block_mask(block_mask, block_size=64)   # [N//64, K//64] bool
    w = BlockSparseMatrix.from_dense(linear.weight.detach(), layout)         # values [num_blocks, 64, 64]
    y = block_sparse_linear(x, w, bias)                                      # x [..., K] -> [..., N]

Triton on CUDA, compiled C kernels (fp32) or a blocked pure-torch path on CPU; see docs/kernels.md. Triton is imported lazily.

The layers, as stk's: layout.py (the format) -> ops.py (checks, the backend choice, one call per op; `linear` is
what a layer's forward calls) -> library.py (the torch.library operators that torch.compile traces, and the eager
autograd Function) -> backends/ (one module per backend: triton/, native/, torch_blocked.py, dense.py; BACKENDS names
them). testing/reference.py is the pure-torch reference the tests hold every backend to.

Where the files live, and why. The kernels' modules sit in the repository's top-level ``kernels/`` folder (the
design fixes that layout), and that folder has no ``__init__.py`` on purpose: Python puts the working directory (or a
script's folder) first on ``sys.path``, so a regular package called ``kernels`` in the checkout's root would shadow
Hugging Face's ``kernels`` package, which transformers imports whenever a model module loads. A folder without
``__init__.py`` is only a PEP 420 namespace portion, and the import system ranks every regular package of the same
name above it, wherever it sits on the path, so an installed ``kernels`` always wins (and transformers reads a
namespace package as "not installed"). No code on the import path is needed for that; a shim in the folder that swapped
``sys.modules`` entries would be the alternative, and it would still break ``import transformers`` wherever
Hugging Face's package is absent.

This ``__init__.py`` is therefore kept here, and ``sparse_nlp.kernels`` is one package in every setting:
- an installed wheel: setuptools copies ``kernels/*.py`` beside this file (pyproject.toml, ``package-dir``);
- a source checkout (editable install, or the repository root on ``sys.path``): the package's ``__path__`` gains the
  top-level folder below, so ``sparse_nlp.kernels.ops`` is ``kernels/ops.py``.
"""
from pathlib import Path as _Path

_HERE = _Path(__file__).resolve().parent
_CHECKOUT_KERNELS = _HERE.parent.parent / "kernels"  # <checkout>/kernels, beside <checkout>/sparse_nlp
if not (_HERE / "ops.py").exists() and (_CHECKOUT_KERNELS / "ops.py").exists():
    __path__.append(str(_CHECKOUT_KERNELS))  # a source checkout: the modules live in the top-level kernels/ folder

from .backends.native.huge_pages import huge_page_status, request_huge_pages
from .backends.native.products import available as native_available
from .backends.native.products import unavailable_reason as native_unavailable_reason
from .layout import BLOCK_SIZES, BlockSparseLayout, BlockSparseMatrix, LayoutIndex
from .ops import (
    BACKENDS,
    DENSE_THRESHOLD,
    NATIVE_DENSE_THRESHOLD,
    autocast_operands,
    block_sparse_linear,
    dds,
    dsd,
    linear,
    release_kept_weights,
    resolve_backend,
    sdd,
)

__all__ = [
    "BLOCK_SIZES",
    "BACKENDS",
    "DENSE_THRESHOLD",
    "NATIVE_DENSE_THRESHOLD",
    "BlockSparseLayout",
    "BlockSparseMatrix",
    "LayoutIndex",
    "autocast_operands",
    "block_sparse_linear",
    "linear",
    "release_kept_weights",
    "dds",
    "dsd",
    "sdd",
    "resolve_backend",
    "native_available",
    "native_unavailable_reason",
    "request_huge_pages",
    "huge_page_status",
]
