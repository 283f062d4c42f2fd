"""`BlockSparseLinear`: a linear layer that keeps only its live weight blocks and computes with them alone.

The weight [out, in] is tiled into ``block_size`` x ``block_size`` blocks; ``values`` holds the live ones
([num_live, b, b], row-major over the block grid) and ``block_mask`` ([out/b, in/b], a buffer updated in place)
says which they are. Weights, gradients and optimizer state therefore cost memory in proportion to density, and
the forward and both backward products run through ``sparse_nlp.kernels`` (Triton on GPU, compiled C kernels or a torch path on CPU).

The ``values`` parameter object never changes, so the optimizer keeps holding it; a topology update swaps in
contents of the new size (surviving blocks copied, new blocks 0) and remaps the optimizer's state the same way
(``sparse_nlp.topology.optimizer_state``).

For the momentum of *absent* blocks the layer can collect the dense weight gradient dY^T X
(``collect_dense_gradients``); the controller decides when (every step: ``exact``; a window before updates:
``fast``), and ``sparse_nlp.layers.dense_grad`` keeps its moments.

Generation right after training runs as fast as a served model's (``block_sparse_for_serving``): the native CPU
path under no_grad keeps its packed copy of the live blocks between calls instead of repacking them per call. For
trainable values it does so only in eval mode, and it repacks when the values may have changed: another tensor,
another version (load_state_dict, copy_, foreach/for-loop optimizers), or another weights revision, a counter this
layer moves at every topology change and at every step of the optimizer a ``SparsityController`` drives (its
step hook calls ``mark_weights_changed``); a train()/eval() switch drops the copy. Fused optimizers (the Trainer's
default AdamW) change parameters without moving their version counter, hence the revision. What stays unseen: an
optimizer no controller knows about, stepped while the model stays in eval mode, between no-grad calls (call
``mark_weights_changed()`` on the layers, or switch modes, after such a step), and writes through ``.data``.

The number of live blocks is a symbolic size under torch.compile (one graph through every update); that needs
dynamo's ``force_parameter_static_shapes`` off, which ``sparse_nlp.compile`` (and ``SparseTrainer`` with
``torch_compile``) turn off: building a layer changes no process-wide setting.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from sparse_nlp import kernels
from sparse_nlp.compile_support import mark_block_dim_dynamic, swap_tensors
from sparse_nlp.layers.base import SparseLayer, stores_in_out
from sparse_nlp.layers.dense_grad import DenseGradientMoments, DenseGradTap, dense_grad_dtype
from sparse_nlp.topology import optimizer_state

if TYPE_CHECKING:
    from sparse_nlp.methods.base import LayerState
    from sparse_nlp.topology.context import UpdateContext

# The layout's index tensors, held as non-persistent buffers "layout_<name>" (checkpoints keep only block_mask).
INDEX_FIELDS = kernels.LayoutIndex._fields
NNZ_SIZED = ("row_indices", "col_indices", "transpose_perm", "transpose_row_indices")  # dim 0 = live blocks
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def block_grid(weight_shape: tuple[int, int], block_size: int) -> tuple[int, int]:
    out_features, in_features = weight_shape
    return out_features // block_size, in_features // block_size


def pool_blocks(dense: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean |x| of each block of a [out, in] tensor -> [out/b, in/b]."""
    rows, cols = block_grid(tuple(dense.shape), block_size)
    return dense.detach().float().abs().view(rows, block_size, cols, block_size).mean(dim=(1, 3))


class BlockSparseLinear(SparseLayer):
    resizable_parameters = ("values",)

    def __init__(
        self,
        values: torch.Tensor,
        block_mask: torch.Tensor,
        bias: Optional[torch.Tensor],
        block_size: int,
        stores_in_out: bool = False,
        *,
        target_units: Optional[int] = None,
        initial_units: Optional[int] = None,
    ):
        super().__init__()
        self.block_size = block_size
        self.out_features = block_mask.shape[0] * block_size
        self.in_features = block_mask.shape[1] * block_size
        self.stores_in_out = stores_in_out  # the layer it replaced stored [in, out] (Conv1D): unsparsify gives one back
        self.values = nn.Parameter(values)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.register_buffer("block_mask", block_mask.to(device=values.device, dtype=torch.bool))
        self.unit_size = block_size**2  # the unit a topology update moves is a block
        self.target_units = int(self.block_mask.sum()) if target_units is None else target_units  # in blocks
        self.initial_units = initial_units  # gradual pruning's start, in blocks (None: every block)
        self._dense_grad_probe: Optional[torch.Tensor] = None  # while collecting: its .grad sums dY^T X
        self._dense_grad_dtype = torch.float32
        self._dense_grad_step: Optional[torch.Tensor] = None  # this optimizer step's dY^T X (micro-batches summed)
        self.dense_grads = DenseGradientMoments()  # their moments over the window (or every step)
        self._layout = None  # kernels.BlockSparseLayout over the layout_* buffers, rebuilt when they change
        self._weights_revision = 0  # moved whenever the values may have changed unseen by their version counter
        self._backends: dict = {}  # compute dtype -> backend on values' device, resolved once per topology
        self._set_layout(kernels.BlockSparseLayout.from_block_mask(self.block_mask, block_size))
        mark_block_dim_dynamic(self.values)

    # ---- construction and export ---------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_dense(cls, layer: nn.Module, block_mask: torch.Tensor, block_size: int, *,
                   target_units: Optional[int] = None, initial_units: Optional[int] = None) -> "BlockSparseLinear":
        in_out = stores_in_out(layer)
        weight = layer.weight.t() if in_out else layer.weight  # always [out, in] here
        layout = kernels.BlockSparseLayout.from_block_mask(block_mask.to(weight.device), block_size)
        values = kernels.BlockSparseMatrix.from_dense(weight.contiguous(), layout).values.detach().clone()
        bias = layer.bias.detach().clone() if layer.bias is not None else None
        return cls(values, block_mask, bias, block_size, in_out, target_units=target_units,
                   initial_units=initial_units)

    def dense_weight(self) -> torch.Tensor:
        """The full [out, in] weight, zeros outside the live blocks."""
        return kernels.BlockSparseMatrix(self.values.detach(), self.layout).to_dense()

    @torch.no_grad()
    def to_base_layer(self) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``, if that is what was sparsified) with the same outputs."""
        weight = self.dense_weight()
        if self.stores_in_out:
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(self.out_features, self.in_features)
            layer.weight = nn.Parameter(weight.t().contiguous())
            layer.bias = nn.Parameter(self.bias.detach().clone()) if self.bias is not None else None
            return layer.to(weight.device)
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                          dtype=weight.dtype)
        layer.weight.copy_(weight)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    # ---- what the rest of the library reads ----------------------------------------------------------------
    @property
    def weight(self) -> nn.Parameter:
        """The trainable tensor of this layer: the live blocks."""
        return self.values

    @property
    def mask(self) -> torch.Tensor:
        """The mask over the units the topology moves: blocks."""
        return self.block_mask

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def active_units(self) -> int:
        """Live blocks."""
        return int(self.block_mask.sum())

    def whole_mask(self) -> torch.Tensor:
        return self.block_mask

    def compute_path(self) -> str:
        return self._backends.get(self.values.dtype, "?")

    @property
    def layout(self) -> kernels.BlockSparseLayout:
        """The layout over this layer's index buffers. Eager: one object per topology, so what the kernels keep on it
        (host plans, packed weights) is kept; under torch.compile a new one over the same buffers, so that a graph
        holds the buffers and never guards on a cached object (one graph through every topology update)."""
        compiling = torch.compiler.is_compiling()
        if compiling or self._layout is None:
            index = kernels.LayoutIndex(*(getattr(self, "layout_" + name) for name in INDEX_FIELDS))
            layout = kernels.BlockSparseLayout(self.weight_shape, self.block_size, index)
            if compiling:
                return layout
            self._layout = layout
        return self._layout

    @torch.no_grad()
    def _set_layout(self, layout: kernels.BlockSparseLayout) -> None:
        """Point the index buffers at `layout`'s tensors in place (set_), so that a compiled graph, which holds the
        buffers, sees a new size on the live-block dimension (dynamic) instead of new tensors; then resolve the
        backend per compute dtype, so that forward reads a dict and never the layout object."""
        layout = layout.to(self.block_mask.device)
        for name in INDEX_FIELDS:
            new, key = getattr(layout.index, name), "layout_" + name
            current = self._buffers.get(key)
            if current is None or current.device != new.device:
                self.register_buffer(key, new, persistent=False)
                if name in NNZ_SIZED:
                    mark_block_dim_dynamic(new)
            else:
                current.set_(new)
        self._layout = None
        self._weights_revision += 1  # new values and layout: nothing kept of the old ones applies
        self._resolve_backends()

    def _resolve_backends(self) -> None:
        layout, device = self.layout, self.values.device
        self._backends.clear()  # in place: compiled code guards on the contents
        self._backends.update({dtype: kernels.resolve_backend(None, device, layout, dtype)
                               for dtype in COMPUTE_DTYPES})

    def __getstate__(self):
        """Copies and pickles leave the layout object behind (what kernels cache on it may hold native pointers);
        the copy rebuilds it from its index buffers at first use."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_layout": None}

    def _apply(self, fn, *args, **kwargs):
        """After .to() / .cuda() / .half(): the buffers are new tensors, resolve the backends for their device."""
        super()._apply(fn, *args, **kwargs)
        self._layout = None
        for name in NNZ_SIZED:
            mark_block_dim_dynamic(getattr(self, "layout_" + name))
        mark_block_dim_dynamic(self.values)
        self._resolve_backends()
        return self

    def apply_mask(self) -> None:
        """Nothing to do: absent blocks are not stored."""

    # ---- compute -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Thin: the layout was checked and the backend resolved at the last topology change; what is left is the
        autocast, two checks on x and one call into the kernels (eager, compiled, or the native inference path:
        kernels.linear picks), all traceable by torch.compile."""
        x2, values, bias = kernels.autocast_operands(x, self.values, self.bias)
        if x2.dim() == 0 or x2.shape[-1] != self.in_features:
            raise ValueError(f"x has shape {tuple(x.shape)} but the layer expects last dim {self.in_features}")
        backend = self._backends.get(x2.dtype)
        if backend is None or x2.device != values.device:
            raise ValueError(f"x is {x2.dtype} on {x2.device} but the weight is {values.dtype} on {values.device}; "
                             "cast/move one to match")
        y = kernels.linear(x2, values, bias, self.layout, backend, weights_revision=self._kept_weights_revision())
        probe = self._dense_grad_probe
        if probe is not None and y.requires_grad:
            y = DenseGradTap.apply(y, x, probe, self._dense_grad_dtype)
        return y

    def _kept_weights_revision(self) -> Optional[int]:
        """What lets the native no-grad path keep its pack of the weights (see the module docstring), or None: pack
        afresh. Static values (requires_grad off, as block_sparse_for_serving leaves them) keep it in any mode;
        trainable ones in eval mode only. Never read while compiling: a graph would guard on the counter."""
        if torch.compiler.is_compiling() or (self.training and self.values.requires_grad):
            return None
        return self._weights_revision

    def mark_weights_changed(self) -> None:
        """The values may have changed without moving their version counter (a fused optimizer's step): the next
        no-grad call repacks them."""
        self._weights_revision += 1

    def train(self, mode: bool = True) -> "BlockSparseLinear":
        """A mode switch frees the pack the native no-grad path kept of the weights: the weights may change on
        either side of it (an optimizer no controller drives, stepped in train mode), and training never reuses
        it, so it holds no memory there."""
        super().train(mode)
        if self._layout is not None:
            kernels.release_kept_weights(self._layout)
        return self

    # ---- the dense gradient, for the momentum of absent blocks (sparse_nlp.layers.dense_grad) ---------------
    @property
    def collect_dense_grad(self) -> bool:
        """Whether backward also computes the dense dW = dY^T X (the controller sets it before each step)."""
        return self._dense_grad_probe is not None

    def collect_dense_gradients(self, collect: bool) -> None:
        """The dense gradient reaches the layer as the gradient of a probe: a [out, in] leaf of one stored element
        (zero strides) whose .grad autograd sums over micro-batches. A tensor gradient rather than a hook that writes
        into the layer, so that compiled graphs carry it like any other gradient."""
        if collect and self._dense_grad_probe is None:
            probe = torch.empty_strided(self.weight_shape, (0, 0), dtype=torch.float32, device=self.values.device)
            self._dense_grad_probe = probe.zero_().requires_grad_()
            self._dense_grad_dtype = dense_grad_dtype(probe.device)  # read here: forward only passes it on
        elif not collect and self._dense_grad_probe is not None:
            self._take_probe_grad()
            self._dense_grad_probe = None

    def dense_gradient_step(self) -> Optional[torch.Tensor]:
        """This optimizer step's dense dW (micro-batches summed), or None."""
        self._take_probe_grad()
        return self._dense_grad_step

    @torch.no_grad()
    def _take_probe_grad(self) -> None:
        probe = self._dense_grad_probe
        if probe is None or probe.grad is None:
            return
        grad, probe.grad = probe.grad, None
        if self._dense_grad_step is None:
            # A copy: under CUDA graphs (torch.compile's reduce-overhead) the gradient lives in the graph's memory,
            # which the next replay overwrites, and these sums outlive the step.
            self._dense_grad_step = grad.clone()
        else:
            self._dense_grad_step.add_(grad)

    @torch.no_grad()
    def end_step(self, ema_beta: Optional[float], squares: bool = True) -> None:
        step = self.dense_gradient_step()
        self._dense_grad_step = None
        if step is not None:
            self.dense_grads.add(step, ema_beta, squares)

    def clear_dense_gradients(self) -> None:
        self._take_probe_grad()
        self._dense_grad_step = None
        self.dense_grads.clear()

    def dense_gradient_state(self) -> Optional[dict]:
        return self.dense_grads.state()

    def load_dense_gradient_state(self, state: Optional[dict]) -> None:
        self._take_probe_grad()
        self._dense_grad_step = None
        self.dense_grads.load_state(state, self.values.device)

    # ---- topology ------------------------------------------------------------------------------------------
    def layer_state(self, name: str, context: "UpdateContext") -> "LayerState":
        from sparse_nlp.topology.block_scores import block_layer_state

        return block_layer_state(name, self, context)

    @torch.no_grad()
    def apply_update(self, state: "LayerState", grown: torch.Tensor, context: "UpdateContext") -> None:
        """Move the blocks to ``state.mask``: survivors keep their values and optimizer state, new blocks start at 0
        with zero state, or with ``regrown_state="fresh"`` their gradient-scale slots filled from the window."""
        context.replicas.agree_on([state.mask])  # rank 0's blocks, before the values move (they must match)
        old_rows = self.values.shape[0]
        source = self.set_block_mask(state.mask)
        optimizer_state.remap_rows(context.optimizer, self.values, source, old_rows)
        new_rows = (source < 0).nonzero().squeeze(1)
        mean_square = self.dense_grads.mean_square() if context.config.regrown_state == "fresh" else None
        if mean_square is not None and new_rows.numel():
            scale = kernels.BlockSparseMatrix.from_dense(mean_square.detach().float(), self.layout).values[new_rows]
            optimizer_state.fill_scale_rows(context.optimizer, self.values, new_rows, scale)

    @torch.no_grad()
    def set_block_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Make ``new_mask`` the live blocks: survivors keep their values, new blocks start at 0.

        Returns, per new live block (row of ``values``), the row it came from, or -1 for a new block: what the
        optimizer's state must follow (``optimizer_state.remap_rows``).
        """
        old_flat = self.block_mask.view(-1)
        new_positions = new_mask.reshape(-1).nonzero().squeeze(1)
        old_index = torch.full((old_flat.numel(),), -1, dtype=torch.long, device=old_flat.device)
        old_index[old_flat.nonzero().squeeze(1)] = torch.arange(int(old_flat.sum()), device=old_flat.device)
        source = old_index[new_positions]
        self._resize_values(optimizer_state.gather_rows(self.values.detach(), source))
        self.block_mask.copy_(new_mask)
        self._set_layout(kernels.BlockSparseLayout.from_block_mask(self.block_mask, self.block_size))
        return source

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints may hold another number of live blocks than this layer: take their size before loading."""
        values, block_mask = state_dict.get(prefix + "values"), state_dict.get(prefix + "block_mask")
        if (
            values is not None
            and block_mask is not None
            and block_mask.shape == self.block_mask.shape
            and values.shape[1:] == self.values.shape[1:]
            and values.shape[0] == int(block_mask.sum())
        ):
            self._resize_values(self.values.detach().new_empty(values.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._set_layout(kernels.BlockSparseLayout.from_block_mask(self.block_mask, self.block_size))

    def _resize_values(self, new_values: torch.Tensor) -> None:
        """Give ``values`` new contents of another size, keeping the Parameter object the optimizer holds.

        ``swap_tensors`` rather than ``.data =``: autograd would keep the old size in a gradient accumulator that a
        still-referenced graph holds, and reject the next gradient.
        """
        fresh = nn.Parameter(new_values, requires_grad=self.values.requires_grad)
        swap_tensors(self.values, fresh)
        self.values.grad = None
        mark_block_dim_dynamic(self.values)  # the marks lived in the swapped-out __dict__

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"density={self.density:.4f}"
        )

