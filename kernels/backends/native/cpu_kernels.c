/* Block-sparse products on the CPU, fp32: the compiled path behind backend="native" (products.py).
 *
 * Built at first use by build.py with the machine's C compiler (-O3 -march=native) and loaded with ctypes;
 * every function is called with the GIL released, one call per task of cpu_threads.py's thread pool.
 *
 * Why a kernel of our own: the "torch" path gathers each output block's live inputs side by side and calls one
 * thin GEMM per block; BLAS then packs the gathered operand again, so every input is copied twice before a
 * multiply, and the thin GEMMs run at ~60% of the machine's peak. Here register-blocked micro-kernels pick the
 * live input blocks through the block index, so nothing is gathered:
 *   - dds (Y = X W^T, dX = dY W): a tile of RMAX rows x STRIP output columns stays in registers while it sums over
 *     every live block of its output block-column and the b inputs of each;
 *   - sdd (dW = dY^T X on live blocks): a tile of RMAX rows x STRIP columns of one block sums over M.
 * Operands are packed first, as BLAS packs them, so that tiles read contiguous runs: the weight blocks as
 * [b / STRIP][b][STRIP] (sparse_nlp_pack_blocks, once per product); for dds, the activations a chunk of rows at a
 * time as panels of RMAX rows, column by column ([col][RMAX]); for sdd, X's live block-columns as [m][STRIP] strips
 * and dY's as rows padded by 16 floats. Read in place instead, the weight's tile columns lie 4 b bytes apart and
 * crowd a few L1 sets, and a tile's rows of an activation are whole rows apart (3 or 12 KiB, multiples of 4 KiB:
 * all in one L1 set). Packing reads each input once per chunk; the weight is small next to the activations.
 *
 * Vector width: 16 floats with AVX-512 (32 registers: tiles of 6 x 64), else 8 (16 registers: tiles of 6 x 16).
 * GCC vector extensions, so any architecture compiles (others get the 8-wide code, split as the target needs).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
#define VEC 16
#define MAX_STRIP 64
#else
#define VEC 8
#define MAX_STRIP 16
#endif
#define RMAX 6
#ifndef DDS_ROWS      /* -DDDS_ROWS=n through $SPARSE_NLP_NATIVE_FLAGS, for tuning on other caches */
#define DDS_ROWS 96    /* rows of A copied per chunk: RMAX-row tiles over all output blocks reuse them from L2 */
#endif
#define SDD_ROWS 256   /* rows of dY and X copied per chunk (products.py splits dW between threads on these) */

typedef float vf __attribute__((vector_size(VEC * 4), aligned(4)));  /* aligned(4): unaligned loads are fine */
#define LOAD(p) (*(const vf*)(p))
#define STORE(p, v) (*(vf*)(p) = (v))

/* Per-thread scratch buffers, grown on demand and kept for the thread's life (the pool's threads are reused). */
static __thread float* scratch_buf[3];
static __thread int64_t scratch_cap[3];

static float* scratch(int slot, int64_t floats) {
    if (floats < 16) floats = 16;  /* never a zero-byte request: NULL would read as out of memory */
    if (scratch_cap[slot] < floats) {
        free(scratch_buf[slot]);
        size_t bytes = (size_t)(((floats * 4 + 63) / 64) * 64);
        scratch_buf[slot] = aligned_alloc(64, bytes);
        scratch_cap[slot] = scratch_buf[slot] ? floats : 0;
    }
    return scratch_buf[slot];
}

/* C[r, 0:NV*VEC] = init + sum_{t in [t0, t1)} sum_k A[r, idx[t]*b + k] * B[t][k][0:NV*VEC], r < R.
 * A is a packed panel (element (r, col) at A[col * RMAX + r]); B points at the strip inside block 0 of the packed
 * weight, whose rows are ldb floats apart (the strip width); blocks are b x b floats apart. */
#define DDS_TILE(R, NV)                                                                                            \
    static void dds_tile_##R##_##NV(const float* A, const float* B, const int32_t* idx, int32_t t0,                \
                                    int32_t t1, int64_t b, int64_t ldb, const float* init, float* C, int64_t ldc) { \
        vf acc[R][NV];                                                                                             \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)  \
            acc[r][v] = init ? LOAD(init + v * VEC) : (vf){0};                                                     \
        for (int32_t t = t0; t < t1; t++) {                                                                        \
            const float* a = A + (int64_t)idx[t] * b * RMAX;                                                       \
            const float* bt = B + (int64_t)t * b * b;                                                              \
            for (int64_t k = 0; k < b; k++) {                                                                      \
                vf bv[NV];                                                                                         \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) bv[v] = LOAD(bt + k * ldb + v * VEC);         \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                              \
                    float s = a[k * RMAX + r];                                                                     \
                    _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[r][v] += s * bv[v];                   \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)  \
            STORE(C + r * ldc + v * VEC, acc[r][v]);                                                               \
    }

/* V[r, 0:NV*VEC] (+)= sum_{m < rows} G[m, r] * X[m, 0:NV*VEC], r < R; V's rows are b apart. */
#define SDD_TILE(R, NV)                                                                                            \
    static void sdd_tile_##R##_##NV(const float* G, int64_t ldg, const float* X, int64_t ldx, int64_t rows,        \
                                    float* V, int64_t b, int accumulate) {                                         \
        vf acc[R][NV];                                                                                             \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)  \
            acc[r][v] = accumulate ? LOAD(V + r * b + v * VEC) : (vf){0};                                          \
        for (int64_t m = 0; m < rows; m++) {                                                                       \
            vf xv[NV];                                                                                             \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) xv[v] = LOAD(X + m * ldx + v * VEC);              \
            const float* g = G + m * ldg;                                                                          \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                                  \
                float s = g[r];                                                                                    \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) acc[r][v] += s * xv[v];                       \
            }                                                                                                      \
        }                                                                                                          \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)  \
            STORE(V + r * b + v * VEC, acc[r][v]);                                                                 \
    }

#define TILES(NV) DDS_TILE(1, NV) DDS_TILE(2, NV) DDS_TILE(3, NV) DDS_TILE(4, NV) DDS_TILE(5, NV) DDS_TILE(6, NV) \
                  SDD_TILE(1, NV) SDD_TILE(2, NV) SDD_TILE(3, NV) SDD_TILE(4, NV) SDD_TILE(5, NV) SDD_TILE(6, NV)
TILES(1)
TILES(2)
#if MAX_STRIP / VEC >= 4
TILES(4)
#endif

typedef void (*dds_tile_fn)(const float*, const float*, const int32_t*, int32_t, int32_t, int64_t, int64_t,
                            const float*, float*, int64_t);
typedef void (*sdd_tile_fn)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int);
#define DDS_ROW(NV) {0, dds_tile_1_##NV, dds_tile_2_##NV, dds_tile_3_##NV, dds_tile_4_##NV, dds_tile_5_##NV, dds_tile_6_##NV}
#define SDD_ROW(NV) {0, sdd_tile_1_##NV, sdd_tile_2_##NV, sdd_tile_3_##NV, sdd_tile_4_##NV, sdd_tile_5_##NV, sdd_tile_6_##NV}
#if MAX_STRIP / VEC >= 4
static const dds_tile_fn DDS_TILES[3][RMAX + 1] = {DDS_ROW(1), DDS_ROW(2), DDS_ROW(4)};
static const sdd_tile_fn SDD_TILES[3][RMAX + 1] = {SDD_ROW(1), SDD_ROW(2), SDD_ROW(4)};
#else
static const dds_tile_fn DDS_TILES[3][RMAX + 1] = {DDS_ROW(1), DDS_ROW(2), DDS_ROW(2)};
static const sdd_tile_fn SDD_TILES[3][RMAX + 1] = {SDD_ROW(1), SDD_ROW(2), SDD_ROW(2)};
#endif

/* Columns per tile for block size b, and the row of the tile tables that computes them. */
static int64_t strip_of(int64_t b) { return b < MAX_STRIP ? b : MAX_STRIP; }
static int nv_slot(int64_t strip) { int nv = (int)(strip / VEC); return nv >= 4 ? 2 : nv - 1; }

int sparse_nlp_vector_width(void) { return VEC; }

/* Packs nnz blocks of b x b for sparse_nlp_dds_f32: out[t] = V[perm ? perm[t] : t], transposed when asked, laid
 * out as [b / strip][b][strip] (strip = strip_of(b)), so a tile reads its columns as one contiguous run. */
void sparse_nlp_pack_blocks(const float* V, const int32_t* perm, int64_t nnz, int64_t b, int transpose, float* out) {
    int64_t strip = strip_of(b);
    for (int64_t t = 0; t < nnz; t++) {
        const float* v = V + (perm ? (int64_t)perm[t] : t) * b * b;
        float* o = out + t * b * b;
        for (int64_t c0 = 0; c0 < b; c0 += strip)
            for (int64_t k = 0; k < b; k++)
                for (int64_t c = 0; c < strip; c++)
                    o[c0 * b + k * strip + c] = transpose ? v[(c0 + c) * b + k] : v[k * b + c0 + c];
    }
}

/* Returns 0, or -1 when a scratch buffer could not be allocated (nothing is written then). */
#define CHECK_ALLOC(p) do { if (!(p)) return -1; } while (0)

/* Write a zero into every 4 KiB page of rows x cols floats at C (row stride ldc) before computing into them: a fresh
 * output's page faults (the kernel zeroes each page, 2 MiB at once with huge pages) then all come first, instead
 * of interrupting the tiles one page at a time and evicting their cached inputs each time (a 100 MB forward output
 * on 2 threads, measured: 64 ms with this, 75 without, 60 into memory already touched). */
static void touch_pages(float* C, int64_t rows, int64_t ldc, int64_t cols) {
    for (int64_t m = 0; m < rows; m++) {
        volatile float* row = C + m * ldc;
        for (int64_t j = 0; j < cols; j += 1024) row[j] = 0.0f;
        if (cols > 0) row[cols - 1] = 0.0f;
    }
}

/* C[m, n-block] = bias[n-block] + sum_{t in [offsets[n], offsets[n+1])} A[m, idx[t]-block] @ B[t]
 * for m < rows and every output block n < nout. A: rows with stride lda (unit column stride);
 * B: [nnz, b, b] as sparse_nlp_pack_blocks lays it out; C: rows with stride ldc; bias may be NULL.
 * The forward Y = X W^T takes B = W's blocks transposed (row-major order, idx = block-columns); dX = dY W takes
 * W's blocks as they are, in column-major order (idx = block-rows). */
int sparse_nlp_dds_f32(const float* A, int64_t lda, int64_t rows, const float* B, const int32_t* offsets,
                       const int32_t* idx, int64_t nout, int64_t b, const float* bias, float* C, int64_t ldc) {
    int64_t strip = strip_of(b), width = 0;
    for (int64_t t = 0; t < offsets[nout]; t++)
        if ((idx[t] + 1) * b > width) width = (idx[t] + 1) * b;
    int64_t panels = (DDS_ROWS + RMAX - 1) / RMAX;
    float* P = scratch(0, panels * RMAX * width);
    float* a_used = scratch(2, width / b);  /* 1 where a live block reads block-column j of A */
    CHECK_ALLOC(P);
    CHECK_ALLOC(a_used);
    for (int64_t j = 0; j < width / b; j++) a_used[j] = 0.0f;
    for (int64_t t = 0; t < offsets[nout]; t++) a_used[idx[t]] = 1.0f;
    const dds_tile_fn* tiles = DDS_TILES[nv_slot(strip)];
    touch_pages(C, rows, ldc, nout * b);
    for (int64_t s0 = 0; s0 < rows; s0 += DDS_ROWS) {
        int64_t sr = rows - s0 < DDS_ROWS ? rows - s0 : DDS_ROWS;
        for (int64_t m = 0; m < sr; m += RMAX) {  /* only the input blocks some live block reads */
            int R = sr - m < RMAX ? (int)(sr - m) : RMAX;
            float* panel = P + m * width;
            const float* a = A + (s0 + m) * lda;
            for (int64_t j = 0; j < width / b; j++) {
                if (a_used[j] == 0.0f) continue;
                if (R == RMAX)
                    for (int64_t c = j * b; c < (j + 1) * b; c++)
                        _Pragma("GCC unroll 8") for (int r = 0; r < RMAX; r++) panel[c * RMAX + r] = a[r * lda + c];
                else
                    for (int64_t c = j * b; c < (j + 1) * b; c++)
                        for (int r = 0; r < R; r++) panel[c * RMAX + r] = a[r * lda + c];
            }
        }
        for (int64_t n = 0; n < nout; n++)
            for (int64_t c0 = 0; c0 < b; c0 += strip) {
                const float* init = bias ? bias + n * b + c0 : 0;
                for (int64_t m = 0; m < sr; m += RMAX) {
                    int R = sr - m < RMAX ? (int)(sr - m) : RMAX;
                    tiles[R](P + m * width, B + c0 * b, idx, offsets[n], offsets[n + 1], b, strip, init,
                             C + (s0 + m) * ldc + n * b + c0, ldc);
                }
            }
    }
    return 0;
}

/* V[t] = (accumulate ? V[t] : 0) + G[:rows, i-block]^T @ X[:rows, cols[t]-block] for every live block t of
 * block-row i (t in [row_offsets[i], row_offsets[i+1]), i < nrow_blocks). G: [rows, N] with stride ldg,
 * X: [rows, K] with stride ldx (unit column strides); V: [nnz, b, b]. dW = dY^T X takes G = dY.
 * Each chunk of SDD_ROWS rows is first packed, the blocks that some live block reads only: G's block-columns as
 * [i][m][b + 16] and X's as strips [j][strip][m][STRIP], so a tile reads one contiguous stream of X. */
int sparse_nlp_sdd_f32(const float* G, int64_t ldg, const float* X, int64_t ldx, int64_t rows,
                       const int32_t* row_offsets, const int32_t* cols, int64_t nrow_blocks, int64_t b, float* V,
                       int accumulate) {
    int64_t nnz = row_offsets[nrow_blocks];
    if (rows <= 0) {
        if (!accumulate) memset(V, 0, (size_t)(nnz * b * b) * 4);
        return 0;
    }
    int64_t ncol_blocks = 0;
    for (int64_t t = 0; t < nnz; t++)
        if (cols[t] + 1 > ncol_blocks) ncol_blocks = cols[t] + 1;
    int64_t strip = strip_of(b), ldgp = b + 16;  /* +16 floats: packed rows never share one L1 set */
    int64_t g_block = SDD_ROWS * ldgp, x_block = b * SDD_ROWS;  /* floats per packed block */
    float* gp = scratch(0, nrow_blocks * g_block);
    float* xp = scratch(1, ncol_blocks * x_block);
    float* x_used = scratch(2, ncol_blocks);  /* 1 where a live block reads block-column j of X */
    CHECK_ALLOC(gp);
    CHECK_ALLOC(xp);
    CHECK_ALLOC(x_used);
    for (int64_t j = 0; j < ncol_blocks; j++) x_used[j] = 0.0f;
    for (int64_t t = 0; t < nnz; t++) x_used[cols[t]] = 1.0f;
    const sdd_tile_fn* tiles = SDD_TILES[nv_slot(strip)];
    for (int64_t m0 = 0; m0 < rows; m0 += SDD_ROWS) {
        int64_t mc = rows - m0 < SDD_ROWS ? rows - m0 : SDD_ROWS;
        for (int64_t m = 0; m < mc; m++) {  /* only the block-rows and block-columns some live block reads */
            const float* g = G + (m0 + m) * ldg;
            const float* x = X + (m0 + m) * ldx;
            for (int64_t i = 0; i < nrow_blocks; i++)
                if (row_offsets[i + 1] > row_offsets[i])
                    for (int64_t v = 0; v < b; v += VEC) STORE(gp + i * g_block + m * ldgp + v, LOAD(g + i * b + v));
            for (int64_t j = 0; j < ncol_blocks; j++)
                if (x_used[j] != 0.0f)
                    for (int64_t c0 = 0; c0 < b; c0 += strip)
                        for (int64_t v = 0; v < strip; v += VEC)
                            STORE(xp + j * x_block + c0 * SDD_ROWS + m * strip + v, LOAD(x + j * b + c0 + v));
        }
        int add = accumulate || m0 > 0;
        for (int64_t i = 0; i < nrow_blocks; i++)
            for (int32_t t = row_offsets[i]; t < row_offsets[i + 1]; t++) {
                float* v = V + (int64_t)t * b * b;
                const float* xb = xp + (int64_t)cols[t] * x_block;
                for (int64_t c0 = 0; c0 < b; c0 += strip)
                    for (int64_t r0 = 0; r0 < b; r0 += RMAX) {
                        int R = b - r0 < RMAX ? (int)(b - r0) : RMAX;
                        tiles[R](gp + i * g_block + r0, ldgp, xb + c0 * SDD_ROWS, strip, mc, v + r0 * b + c0, b, add);
                    }
            }
    }
    return 0;
}
