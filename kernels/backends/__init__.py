"""One module per backend, each with the same three products, and the table that names them.

    dds(a, values, layout, transpose_b, bias=None) -> Tensor     a @ W (W^T when transpose_b) (+ bias); W = values
                                                                 [num_blocks, b, b] over layout, [N, K]
    sdd(a, b, layout) -> Tensor                                  the live blocks of a @ b, [num_blocks, b, b]
    linear_backward(grad_y, x, values, layout, need_x, need_w)   (dX or None, dW or None) of y = x W^T

No checks here: ops.py checks the operands and resolves the backend, library.py runs the products.
"""
from . import dense, torch_blocked
from .native import products as native_products
from .triton import launchers as triton_launchers

# name -> module: what `backend=` names, and the one place a new backend is added.
BACKENDS = {"triton": triton_launchers, "native": native_products, "torch": torch_blocked, "dense": dense}
