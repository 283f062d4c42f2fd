"""Triton kernels of the block-sparse linear layer. Imported lazily (by launchers.py) so that
`import sparse_nlp.kernels` works where triton is missing.

Both kernels accumulate in float32 with tl.dot. UPCAST turns fp16/bf16 tiles into fp32 right after tl.load: the
launcher sets it under TRITON_INTERPRET=1 only, because the interpreter's bf16 arithmetic is wrong; on a GPU the
tiles go to tl.dot in their own dtype (tensor cores).
"""
import triton
import triton.language as tl


@triton.jit
def dds_kernel(
    a_ptr, v_ptr, out_ptr, bias_ptr,
    offsets_ptr, inner_idx_ptr, perm_ptr,
    M,
    stride_am, stride_ak,
    stride_vp, stride_vk, stride_vn,
    stride_om, stride_on,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, NUM_N: tl.constexpr,
):
    """out[:, n-block] = sum over live blocks q of output block-column n: a[:, k_q-block] @ tile_q (+ bias).

    Forward (Y = X W^T): n is a block-row of W, q walks the row-major order, tile = W block transposed (the
    launcher swaps the value strides). dX (= dY W): n is a block-column of W, q walks the column-major order and
    p = perm[q] finds the block in `values`. inner_idx[q] is the block index along a's columns.
    """
    pid = tl.program_id(0)  # one flat axis (launchers.dds_grid): no 65,535 limit on the M tiles
    pid_n = pid % NUM_N  # output blocks fastest: neighbouring programs share the same rows of `a` (L2 reuse)
    pid_m = pid // NUM_N
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_b = tl.arange(0, BLOCK)
    mask_m = offs_m < M
    start = tl.load(offsets_ptr + pid_n).to(tl.int64)  # int64 loop counter: p * stride_vp cannot overflow
    end = tl.load(offsets_ptr + pid_n + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    a_rows = a_ptr + offs_m[:, None] * stride_am
    v_tile = offs_b[:, None] * stride_vk + offs_b[None, :] * stride_vn
    for q in range(start, end):
        k = tl.load(inner_idx_ptr + q).to(tl.int64)
        if HAS_PERM:
            p = tl.load(perm_ptr + q).to(tl.int64)
        else:
            p = q
        a = tl.load(a_rows + (k * BLOCK + offs_b)[None, :] * stride_ak, mask=mask_m[:, None], other=0.0)
        v = tl.load(v_ptr + p * stride_vp + v_tile)
        if UPCAST:
            a = a.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(a, v, acc, input_precision=INPUT_PRECISION)
    offs_n = pid_n * BLOCK + offs_b
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.jit
def sdd_kernel(
    a_ptr, b_ptr, out_ptr,
    row_idx_ptr, col_idx_ptr,
    M, m_per_split,
    stride_an, stride_am,
    stride_bm, stride_bk,
    stride_os, stride_op, stride_or, stride_oc,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out[split, p] = a[i-block rows, m-range] @ b[m-range, j-block cols] for live block p = (i, j).

    a is [N, M] (dY^T as a strided view), b is [M, K] (X); the reduction runs over M, cut into `num_splits`
    ranges of `m_per_split` rows (program axis 1) so that few live blocks still fill the GPU; the launcher sums
    the fp32 partials when there is more than one.
    """
    p = tl.program_id(0).to(tl.int64)  # int64: split * stride_os + p * stride_op passes 2^31 on big layers
    split = tl.program_id(1).to(tl.int64)
    i = tl.load(row_idx_ptr + p).to(tl.int64)
    j = tl.load(col_idx_ptr + p).to(tl.int64)
    offs_b = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_M)
    a_rows = a_ptr + (i * BLOCK + offs_b)[:, None] * stride_an
    b_cols = b_ptr + (j * BLOCK + offs_b)[None, :] * stride_bk
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    m_start = split * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = (m0 + offs_k).to(tl.int64)
        mask = offs_m < m_end
        a = tl.load(a_rows + offs_m[None, :] * stride_am, mask=mask[None, :], other=0.0)  # [BLOCK, BLOCK_M]
        b = tl.load(b_cols + offs_m[:, None] * stride_bm, mask=mask[:, None], other=0.0)  # [BLOCK_M, BLOCK]
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out = out_ptr + split * stride_os + p * stride_op + offs_b[:, None] * stride_or + offs_b[None, :] * stride_oc
    tl.store(out, acc.to(out_ptr.dtype.element_ty))
