/* Block-sparse products on the CPU, fp32: the compiled path behind backend="native" (cpu_native.py).
 *
 * Built at first use by native_build.py with the machine's C compiler (-O3 -march=native) and loaded with ctypes;
 * every function is called with the GIL released, one call per task of cpu.py's thread pool.
 *
 * Why a kernel of our own: the "torch" path gathers each output block's live inputs side by side and calls one
 * thin GEMM per block; BLAS then packs the gathered operand again, so every input is copied twice before a
 * multiply, and the thin GEMMs run at ~60% of the machine's peak. Here the register-blocked micro-kernels read
 * the live input blocks in place (through the block index), so nothing is gathered:
 *   - dds (Y = X W^T, dX = dY W): a tile of RMAX rows x STRIP output columns stays in registers while it sums over
 *     every live block of its output block-column and the b inputs of each;
 *   - sdd (dW = dY^T X on live blocks): a tile of RMAX rows x STRIP columns of one block sums over M.
 * Rows of A (and of dY, X for sdd) are first copied a chunk at a time into a buffer whose row stride is padded by
 * 16 floats: activations have rows of 3 or 12 KiB, a multiple of 4 KiB, so a tile's rows would otherwise all fall
 * into the same L1 cache set. That copy reads each input once per call.
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
#define SDD_ROWS 256   /* rows of dY and X copied per chunk (cpu_native.py splits dW between threads on these) */
#define SDD_SUB 64     /* rows one sdd tile sums before moving on: its slices of dY and X stay in L1 */

typedef float vf __attribute__((vector_size(VEC * 4), aligned(4)));  /* aligned(4): unaligned loads are fine */
#define LOAD(p) (*(const vf*)(p))
#define STORE(p, v) (*(vf*)(p) = (v))

/* Per-thread scratch buffers, grown on demand and kept for the thread's life (the pool's threads are reused). */
static __thread float* scratch_buf[2];
static __thread int64_t scratch_cap[2];

static float* scratch(int slot, int64_t floats) {
    if (scratch_cap[slot] < floats) {
        free(scratch_buf[slot]);
        size_t bytes = (size_t)(((floats * 4 + 63) / 64) * 64);
        scratch_buf[slot] = aligned_alloc(64, bytes);
        scratch_cap[slot] = scratch_buf[slot] ? floats : 0;
    }
    return scratch_buf[slot];
}

/* C[r, 0:NV*VEC] = init + sum_{t in [t0, t1)} sum_k A[r, idx[t]*b + k] * B[t][k][0:NV*VEC], r < R.
 * B points at the strip's first column inside block 0; blocks are b x b, row-major. */
#define DDS_TILE(R, NV)                                                                                            \
    static void dds_tile_##R##_##NV(const float* A, int64_t lda, const float* B, const int32_t* idx, int32_t t0,   \
                                    int32_t t1, int64_t b, const float* init, float* C, int64_t ldc) {             \
        vf acc[R][NV];                                                                                             \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)  \
            acc[r][v] = init ? LOAD(init + v * VEC) : (vf){0};                                                     \
        for (int32_t t = t0; t < t1; t++) {                                                                        \
            const float* a = A + (int64_t)idx[t] * b;                                                              \
            const float* bt = B + (int64_t)t * b * b;                                                              \
            for (int64_t k = 0; k < b; k++) {                                                                      \
                vf bv[NV];                                                                                         \
                _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) bv[v] = LOAD(bt + k * b + v * VEC);           \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                              \
                    float s = a[r * lda + k];                                                                      \
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

typedef void (*dds_tile_fn)(const float*, int64_t, const float*, const int32_t*, int32_t, int32_t, int64_t,
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

/* Returns 0, or -1 when a scratch buffer could not be allocated (nothing is written then). */
#define CHECK_ALLOC(p) do { if (!(p)) return -1; } while (0)

/* C[m, n-block] = bias[n-block] + sum_{t in [offsets[n], offsets[n+1])} A[m, idx[t]-block] @ B[t]
 * for m < rows and every output block n < nout. A: rows with stride lda (unit column stride);
 * B: [nnz, b, b] row-major; C: rows with stride ldc; bias may be NULL.
 * The forward Y = X W^T takes B = W's blocks transposed (row-major order, idx = block-columns); dX = dY W takes
 * W's blocks as they are, in column-major order (idx = block-rows). */
int sparse_nlp_dds_f32(const float* A, int64_t lda, int64_t rows, const float* B, const int32_t* offsets,
                       const int32_t* idx, int64_t nout, int64_t b, const float* bias, float* C, int64_t ldc) {
    int64_t strip = strip_of(b), width = 0;
    for (int64_t t = 0; t < offsets[nout]; t++)
        if ((idx[t] + 1) * b > width) width = (idx[t] + 1) * b;
    int64_t ldp = width + 16;
    float* P = scratch(0, DDS_ROWS * ldp);
    CHECK_ALLOC(P);
    const dds_tile_fn* tiles = DDS_TILES[nv_slot(strip)];
    for (int64_t s0 = 0; s0 < rows; s0 += DDS_ROWS) {
        int64_t sr = rows - s0 < DDS_ROWS ? rows - s0 : DDS_ROWS;
        if (width > 0)
            for (int64_t m = 0; m < sr; m++) memcpy(P + m * ldp, A + (s0 + m) * lda, (size_t)width * 4);
        for (int64_t n = 0; n < nout; n++)
            for (int64_t c0 = 0; c0 < b; c0 += strip) {
                const float* init = bias ? bias + n * b + c0 : 0;
                for (int64_t m = 0; m < sr; m += RMAX) {
                    int R = sr - m < RMAX ? (int)(sr - m) : RMAX;
                    tiles[R](P + m * ldp, ldp, B + c0, idx, offsets[n], offsets[n + 1], b, init,
                             C + (s0 + m) * ldc + n * b + c0, ldc);
                }
            }
    }
    return 0;
}

/* V[t] = (accumulate ? V[t] : 0) + G[:rows, i-block]^T @ X[:rows, cols[t]-block] for every live block t of
 * block-row i (t in [row_offsets[i], row_offsets[i+1]), i < nrow_blocks). G: [rows, N] with stride ldg,
 * X: [rows, K] with stride ldx (unit column strides); V: [nnz, b, b]. dW = dY^T X takes G = dY. */
int sparse_nlp_sdd_f32(const float* G, int64_t ldg, const float* X, int64_t ldx, int64_t rows,
                       const int32_t* row_offsets, const int32_t* cols, int64_t nrow_blocks, int64_t b, float* V,
                       int accumulate) {
    int64_t nnz = row_offsets[nrow_blocks];
    if (rows <= 0) {
        if (!accumulate) memset(V, 0, (size_t)(nnz * b * b) * 4);
        return 0;
    }
    int64_t width = 0;
    for (int64_t t = 0; t < nnz; t++)
        if ((cols[t] + 1) * b > width) width = (cols[t] + 1) * b;
    int64_t height = nrow_blocks * b, ldgp = height + 16, ldxp = width + 16, strip = strip_of(b);
    float* gp = scratch(0, SDD_ROWS * ldgp);
    float* xp = scratch(1, SDD_ROWS * ldxp);
    CHECK_ALLOC(gp);
    CHECK_ALLOC(xp);
    const sdd_tile_fn* tiles = SDD_TILES[nv_slot(strip)];
    for (int64_t m0 = 0; m0 < rows; m0 += SDD_ROWS) {
        int64_t mc = rows - m0 < SDD_ROWS ? rows - m0 : SDD_ROWS;
        for (int64_t m = 0; m < mc; m++) {
            memcpy(gp + m * ldgp, G + (m0 + m) * ldg, (size_t)height * 4);
            memcpy(xp + m * ldxp, X + (m0 + m) * ldx, (size_t)width * 4);
        }
        for (int64_t i = 0; i < nrow_blocks; i++)
            for (int32_t t = row_offsets[i]; t < row_offsets[i + 1]; t++) {
                float* v = V + (int64_t)t * b * b;
                for (int64_t s0 = 0; s0 < mc; s0 += SDD_SUB) {
                    int64_t sr = mc - s0 < SDD_SUB ? mc - s0 : SDD_SUB;
                    int add = accumulate || m0 > 0 || s0 > 0;
                    const float* gb = gp + s0 * ldgp + i * b;
                    const float* xb = xp + s0 * ldxp + (int64_t)cols[t] * b;
                    for (int64_t r0 = 0; r0 < b; r0 += RMAX) {
                        int R = b - r0 < RMAX ? (int)(b - r0) : RMAX;
                        for (int64_t c0 = 0; c0 < b; c0 += strip)
                            tiles[R](gb + r0, ldgp, xb + c0, ldxp, sr, v + r0 * b + c0, b, add);
                    }
                }
            }
    }
    return 0;
}
