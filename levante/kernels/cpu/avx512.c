/* The AVX-512 variant (AVX-512 F/BW/VL/VNNI, F16C, FMA; AVX512-BF16 where the CPU has it, for the
 * bfloat16 attention path): matrix-vector kernels for levante's packed CPU weights, the small
 * decode-step ops, paged attention (avx512_attention.c) and the one-call decode step
 * (decode_step.c). Built by levante/kernels/build.py; the interface is levante.h.
 *
 * W8A8, as ggml does it: each row of x is quantised to int8 in blocks of 32 values (one
 * float scale per block, like llama.cpp's Q8_0 activations), then multiplied by the int8
 * weight with AVX-512 VNNI (vpdpbusd: u8 x s8 -> s32, four products per 32-bit lane).
 *
 * Weight layout "t16": rows in tiles of 16; in a tile, for each group of 4 input columns,
 * 64 bytes = 16 rows x 4 columns, so one 64-byte load is a vpdpbusd operand covering 16
 * rows and the activation's 4 values are a broadcast. Bytes are the signed codes + 128
 * (vpdpbusd wants the unsigned operand in a register); the +128 adds 128 * sum(xq) to
 * every row, the same for all rows, and is taken off once per row of x. Rows are padded to
 * a multiple of 16 (code 0), columns to a multiple of 32 (code 0, activations 0).
 *
 * Weight layout "q4t16" (4-bit codes q in 0..15, value = scale * q + offset per group of
 * 32 columns): in a tile, for each group of 8 columns, 64 bytes = 16 rows x 4 bytes, the
 * low nibbles holding columns 0..3 of the group and the high nibbles columns 4..7. Scales
 * and offsets are float16 or float32, [tile][group][16] each.
 */
#include <immintrin.h>

#include "runtime.h"

#define MAX_M 8
#ifndef PREFETCH
#define PREFETCH 2048 /* bytes ahead in each tile's stream (the hardware prefetchers stop at 4 KiB pages) */
#endif

static inline __m512 load16(const void *x, int bf16, int64_t i, int n) {
    __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n > 0 ? n : 0)) - 1);
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)x + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)x + i);
}

static inline void store16(void *out, int bf16, int64_t i, __m512 v, int n) {
    __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    if (bf16) { /* round to nearest even (values here are finite) */
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
        _mm256_mask_storeu_epi16((uint16_t *)out + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    } else {
        _mm512_mask_storeu_ps((float *)out + i, m, v);
    }
}


static inline __m512 round_bf16_(__m512 v) { /* to the nearest bfloat16 (as float32 bits) */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000)));
}

/* One row of x -> int8 codes (Kp of them, zero past K), block scales d, block sums s;
 * returns sum_b d_b * s_b. */
static float quantize_row(const void *x, int bf16, int64_t K, int64_t Kp, int8_t *xq, float *d, float *s) {
    float total = 0.f;
    for (int64_t b = 0; b * QB < Kp; b++) {
        int64_t k = b * QB;
        __m512 v0 = load16(x, bf16, k, (int)(K - k)), v1 = load16(x, bf16, k + 16, (int)(K - k - 16));
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i *)(xq + k), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + k + 16), _mm512_cvtsepi32_epi8(q1));
        float sum = (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        d[b] = scale;
        s[b] = sum;
        total += scale * sum;
    }
    return total;
}

typedef struct {
    int64_t Kp, nb;         /* padded columns, activation blocks */
    int M;                  /* rows of quantised activations (2 per row of x when split) */
    int split;              /* each row of x is two: its int8 rounding and the rounding's residual */
    const int8_t *xq;       /* [M][Kp] */
    const float *d, *s;     /* [M][nb] */
    float corr[MAX_M];      /* 128 * sum_b d_b s_b per row of x */
} Act;

/* Where a tile stream prefetches from offset `off` of its tile: PREFETCH bytes on, except that past
 * the tile's end (tiles are `tstride` bytes, one after another) it goes on in the tile this stream
 * reads next, T tiles on, not in the neighbour another stream of the group is already reading. With
 * short rows (K = 896: 14 KiB int8 tiles) a group's tiles otherwise start unprefetched: measured
 * interleaved on one core, the 9728 x 896 Q5_0 gate/up 8-19% and the 151936 x 896 int8 head 7-18%
 * more bytes/s, K = 4864 unchanged within noise. */
static inline __attribute__((always_inline)) int64_t ahead(int64_t off, int64_t tstride, const int T) {
    int64_t at = off + PREFETCH;
    return at >= tstride ? at + (T - 1) * tstride : at;
}

/* Zero the float accumulators of T tiles x M rows (the tile kernels' start). */
static inline __attribute__((always_inline)) void zero_acc(__m512 acc[][MAX_M], const int T, const int M) {
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) acc[t][m] = _mm512_setzero_ps();
}

/* Zero the integer (one activation block's) accumulators of T tiles x M rows. */
static inline __attribute__((always_inline)) void zero_iacc(__m512i iacc[][MAX_M], const int T, const int M) {
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) iacc[t][m] = _mm512_setzero_si512();
}

/* T tiles (16 rows each) x M rows of x, int8 weights: per tile and row of x the 16 dot
 * products sum_b d_b * (sum over the block of (w + 128) * xq), before the correction. */
static inline __attribute__((always_inline)) void w8_tiles(const uint8_t *w, int64_t tstride, const Act *a,
                                                           const int T, const int M, __m512 acc[][MAX_M]) {
    zero_acc(acc, T, M);
    for (int64_t b = 0; b < a->nb; b++) {
        __m512i iacc[4][MAX_M];
        zero_iacc(iacc, T, M);
        const uint8_t *wb = w + b * 512;
        const int8_t *xb = a->xq + b * QB;
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                __m512i wv = _mm512_loadu_si512(wb + t * tstride + g * 64);
                _mm_prefetch((const char *)(w + t * tstride + ahead(b * 512 + g * 64, tstride, T)), _MM_HINT_T0);
#pragma GCC unroll 8
                for (int m = 0; m < M; m++) {
                    int32_t xv;
                    memcpy(&xv, xb + m * a->Kp + g * 4, 4);
                    iacc[t][m] = _mm512_dpbusd_epi32(iacc[t][m], wv, _mm512_set1_epi32(xv));
                }
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < T; t++)
#pragma GCC unroll 8
            for (int m = 0; m < M; m++)
                acc[t][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[t][m]), _mm512_set1_ps(a->d[m * a->nb + b]),
                                            acc[t][m]);
    }
}

typedef struct {
    const uint8_t *w;
    const float *scale;     /* [N] per-row scales (int8) */
    const void *qscale, *qoffset; /* float16 or float32 [tiles][groups][16] (4-bit) */
    int qscale_f32;
    int64_t N, tstride;
    void *out;
    int64_t ldo;
    int out_bf16;
} Weight;

static inline void store_tile(const Weight *wt, const Act *a, int64_t tile, int M, __m512 *acc) {
    int64_t n0 = tile * 16;
    int n = (int)(wt->N - n0 < 16 ? wt->N - n0 : 16);
    __mmask16 mask = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    __m512 scale = wt->scale ? _mm512_maskz_loadu_ps(mask, wt->scale + n0) : _mm512_set1_ps(1.f);
    for (int m = 0; m < M; m += 1 + a->split) {
        __m512 v = _mm512_sub_ps(acc[m], _mm512_set1_ps(wt->scale ? a->corr[m] : 0.f));
        if (a->split) v = _mm512_add_ps(v, _mm512_sub_ps(acc[m + 1], _mm512_set1_ps(wt->scale ? a->corr[m + 1] : 0.f)));
        if (wt->scale) v = _mm512_mul_ps(v, scale);
        store16(wt->out, wt->out_bf16, (m >> a->split) * wt->ldo + n0, v, n);
    }
}

/* One range of tiles for M rows of x: T tiles at a time (the activations stay in registers across
 * them), then one at a time; CALL(tile, T, M, acc) runs a kind's tile kernel. */
#define TILE_RUN(CALL, T, M)                                                      \
    case M: {                                                                      \
        __m512 acc[T][MAX_M];                                                      \
        for (; t + T <= t1; t += T) {                                              \
            CALL(t, T, M, acc);                                                    \
            for (int i = 0; i < T; i++) store_tile(wt, a, t + i, M, acc[i]);       \
        }                                                                          \
        for (; t < t1; t++) {                                                      \
            CALL(t, 1, M, acc);                                                    \
            store_tile(wt, a, t, M, acc[0]);                                       \
        }                                                                          \
        break;                                                                     \
    }

/* NAME(wt, a, t, t1): tiles t .. t1-1; T2 tiles at a time for two rows of x. */
#define TILE_RANGE(NAME, CALL, T2)                                                 \
    static void NAME(const Weight *wt, const Act *a, int64_t t, int64_t t1) {     \
        switch (a->M) {                                                            \
            TILE_RUN(CALL, 4, 1)                                                   \
            TILE_RUN(CALL, T2, 2)                                                  \
            TILE_RUN(CALL, 2, 3)                                                   \
            TILE_RUN(CALL, 2, 4)                                                   \
            TILE_RUN(CALL, 1, 5)                                                   \
            TILE_RUN(CALL, 1, 6)                                                   \
            TILE_RUN(CALL, 1, 7)                                                   \
            TILE_RUN(CALL, 1, 8)                                                   \
        }                                                                          \
    }

#define W8_CALL(tile, T, M, acc) w8_tiles(wt->w + (tile) * wt->tstride, wt->tstride, a, T, M, acc)
TILE_RANGE(w8_range, W8_CALL, 4)

/* 4-bit: per group of 32 columns (one activation block), T tiles x M rows of x. */
static inline __attribute__((always_inline)) void q4_tiles(const Weight *wt, int64_t tile, const Act *a,
                                                           const int T, const int M, __m512 acc[][MAX_M]) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    zero_acc(acc, T, M);
    const int64_t nb = a->nb;
    for (int64_t b = 0; b < nb; b++) {
        __m512i iacc[4][MAX_M];
        zero_iacc(iacc, T, M);
        const int8_t *xb = a->xq + b * QB;
#pragma GCC unroll 4
        for (int g = 0; g < 4; g++) {
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                const uint8_t *base = wt->w + (tile + t) * wt->tstride;
                const int64_t off = b * 256 + g * 64;
                __m512i v = _mm512_loadu_si512(base + off);
                _mm_prefetch((const char *)(base + ahead(off, wt->tstride, T)), _MM_HINT_T0);
                __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
#pragma GCC unroll 8
                for (int m = 0; m < M; m++) {
                    int32_t x0, x1;
                    memcpy(&x0, xb + m * a->Kp + g * 8, 4);
                    memcpy(&x1, xb + m * a->Kp + g * 8 + 4, 4);
                    iacc[t][m] = _mm512_dpbusd_epi32(iacc[t][m], lo, _mm512_set1_epi32(x0));
                    iacc[t][m] = _mm512_dpbusd_epi32(iacc[t][m], hi, _mm512_set1_epi32(x1));
                }
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            int64_t at = ((tile + t) * nb + b) * 16;
            __m512 scale, offset;
            if (wt->qscale_f32) {
                scale = _mm512_loadu_ps((const float *)wt->qscale + at);
                offset = _mm512_loadu_ps((const float *)wt->qoffset + at);
            } else {
                scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)wt->qscale + at)));
                offset = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)wt->qoffset + at)));
            }
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                float dx = a->d[m * nb + b];
                __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(iacc[t][m]), _mm512_set1_ps(dx));
                acc[t][m] = _mm512_fmadd_ps(dot, scale, acc[t][m]);
                acc[t][m] = _mm512_fmadd_ps(offset, _mm512_set1_ps(dx * a->s[m * nb + b]), acc[t][m]);
            }
        }
    }
}

#define Q4_CALL(tile, T, M, acc) q4_tiles(wt, tile, a, T, M, acc)
TILE_RANGE(q4_range, Q4_CALL, 2)


/* 5-bit (Q5_0: value = d * (q - 16), q in 0..31, d float16 per row and block of 32): per
 * tile and block, 352 bytes = the low nibbles as in q4t16 (256), then per group of 8 columns
 * two 64-bit masks of fifth bits in the order of the low- and high-nibble vectors (64), then
 * the 16 rows' d (32). */

static inline __attribute__((always_inline)) void q5_tiles(const Weight *wt, int64_t tile, const Act *a,
                                                           const int T, const int M, __m512 acc[][MAX_M]) {
    const __m512i low = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
    zero_acc(acc, T, M);
    const int64_t nb = a->nb;
    for (int64_t b = 0; b < nb; b++) {
        __m512i iacc[4][MAX_M];
        zero_iacc(iacc, T, M);
        const int8_t *xb = a->xq + b * QB;
#pragma GCC unroll 4
        for (int g = 0; g < 4; g++) {
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) {
                const uint8_t *blk = wt->w + (tile + t) * wt->tstride + b * Q5_BLOCK;
                __m512i v = _mm512_loadu_si512(blk + g * 64);
                const uint8_t *tile0 = blk - b * Q5_BLOCK;
                _mm_prefetch((const char *)(tile0 + ahead(b * Q5_BLOCK + g * 64, wt->tstride, T)), _MM_HINT_T0);
                if (g < 2)
                    _mm_prefetch((const char *)(tile0 + ahead(b * Q5_BLOCK + 256 + g * 64, wt->tstride, T)),
                                 _MM_HINT_T0);
                uint64_t bits_lo, bits_hi;
                memcpy(&bits_lo, blk + 256 + g * 16, 8);
                memcpy(&bits_hi, blk + 256 + g * 16 + 8, 8);
                __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64(bits_lo), lo, sixteen);
                hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64(bits_hi), hi, sixteen);
#pragma GCC unroll 8
                for (int m = 0; m < M; m++) {
                    int32_t x0, x1;
                    memcpy(&x0, xb + m * a->Kp + g * 8, 4);
                    memcpy(&x1, xb + m * a->Kp + g * 8 + 4, 4);
                    iacc[t][m] = _mm512_dpbusd_epi32(iacc[t][m], lo, _mm512_set1_epi32(x0));
                    iacc[t][m] = _mm512_dpbusd_epi32(iacc[t][m], hi, _mm512_set1_epi32(x1));
                }
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            const uint8_t *blk = wt->w + (tile + t) * wt->tstride + b * Q5_BLOCK;
            __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 320)));
#pragma GCC unroll 8
            for (int m = 0; m < M; m++) {
                __m512 dot = _mm512_sub_ps(_mm512_cvtepi32_ps(iacc[t][m]), _mm512_set1_ps(16.f * a->s[m * nb + b]));
                acc[t][m] = _mm512_fmadd_ps(_mm512_mul_ps(dot, _mm512_set1_ps(a->d[m * nb + b])), d, acc[t][m]);
            }
        }
    }
}

#define Q5_CALL(tile, T, M, acc) q5_tiles(wt, tile, a, T, M, acc)
TILE_RANGE(q5_range, Q5_CALL, 2)

enum { W8 = 0, Q4 = 1, Q5 = 2 };
typedef struct { const Weight *wt; const Act *a; int kind; int64_t tiles, chunk; } Task;

static void run_chunk(const void *ctx, int64_t c) {
    const Task *task = ctx;
    int64_t t0 = c * task->chunk, t1 = t0 + task->chunk < task->tiles ? t0 + task->chunk : task->tiles;
    if (task->kind == Q4) q4_range(task->wt, task->a, t0, t1);
    else if (task->kind == Q5) q5_range(task->wt, task->a, t0, t1);
    else w8_range(task->wt, task->a, t0, t1);
}

static int run(const Weight *wt, int kind, const void *x, int64_t ldx, int x_bf16, int rows, int64_t K, int64_t Kp,
               int nthreads, int split) {
    int M = rows << (split != 0);
    if (rows < 1 || M > MAX_M || Kp % QB || K > Kp) return -1;
    Act a;
    a.Kp = Kp;
    a.nb = Kp / QB;
    a.M = M;
    a.split = split != 0;
    int8_t *xq = malloc((size_t)(M * Kp));
    float *ds = malloc(sizeof(float) * 2 * M * a.nb);
    float *scratch = split ? malloc(sizeof(float) * (size_t)Kp) : NULL;
    if (!xq || !ds || (split && !scratch)) { free(xq); free(ds); free(scratch); return -2; }
    for (int r = 0; r < rows; r++) {
        const void *row = (const char *)x + r * ldx * (x_bf16 ? 2 : 4);
        int m = r << a.split;
        a.corr[m] = 128.f * quantize_row(row, x_bf16, K, Kp, xq + m * Kp, ds + m * a.nb, ds + (M + m) * a.nb);
        if (split) { /* the residual x - d * q, quantised the same way */
            for (int64_t k = 0; k < Kp; k++) {
                float v = k >= K ? 0.f : x_bf16 ? bf16_value(((const uint16_t *)row)[k]) : ((const float *)row)[k];
                scratch[k] = v - ds[m * a.nb + k / QB] * (float)xq[m * Kp + k];
            }
            a.corr[m + 1] = 128.f * quantize_row(scratch, 0, Kp, Kp, xq + (m + 1) * Kp, ds + (m + 1) * a.nb,
                                                 ds + (M + m + 1) * a.nb);
        }
    }
    free(scratch);
    a.xq = xq;
    a.d = ds;
    a.s = ds + M * a.nb;
    int64_t tiles = (wt->N + 15) / 16;
    int64_t chunk = tiles / (8 * nthreads) / 4 * 4; /* ~8 chunks per thread, whole 4-tile groups */
    chunk = chunk < 4 ? 4 : chunk > 64 ? 64 : chunk;
    int64_t chunks = nthreads > 1 && tiles >= 8 ? (tiles + chunk - 1) / chunk : 1;
    Task task = {wt, &a, kind, tiles, chunks == 1 ? tiles : chunk};
    parallel(run_chunk, &task, chunks, nthreads, atomic_load(&kernel_spin_ns));
    free(xq);
    free(ds);
    return 0;
}

/* out[m, n] = sum_k W[n, k] x[m, k] for m < M <= 8, W int8 in layout t16 times per-row scale. */
int lv_w8a8(const uint8_t *w, const float *scale, int64_t N, int64_t K, int64_t Kp, const void *x, int64_t ldx,
            int x_bf16, int M, void *out, int64_t ldo, int out_bf16, int nthreads) {
    Weight wt = {w, scale, NULL, NULL, 0, N, 16 * Kp, out, ldo, out_bf16};
    return run(&wt, W8, x, ldx, x_bf16, M, K, Kp, nthreads, 0);
}

/* lv_w8a8 with each row of x taken as two int8 roundings (the value's and its residual's):
 * ~15 bits of activation precision for twice the integer work, which a matrix-vector
 * product has to spare (memory is the bound): for a head, whose logits pick the tokens. */
int lv_w8a16(const uint8_t *w, const float *scale, int64_t N, int64_t K, int64_t Kp, const void *x, int64_t ldx,
             int x_bf16, int M, void *out, int64_t ldo, int out_bf16, int nthreads) {
    Weight wt = {w, scale, NULL, NULL, 0, N, 16 * Kp, out, ldo, out_bf16};
    return run(&wt, W8, x, ldx, x_bf16, M, K, Kp, nthreads, 1);
}

/* The same for 4-bit weights in layout q4t16 (groups of 32 columns; K a multiple of 32). */
int lv_q4a8(const uint8_t *w, const void *qscale, const void *qoffset, int qscale_f32, int64_t N, int64_t K,
            const void *x, int64_t ldx, int x_bf16, int M, void *out, int64_t ldo, int out_bf16, int nthreads,
            int split) {
    Weight wt = {w, NULL, qscale, qoffset, qscale_f32, N, 8 * K, out, ldo, out_bf16};
    if (K % QB) return -1;
    return run(&wt, Q4, x, ldx, x_bf16, M, K, K, nthreads, split);
}

/* The same for 5-bit weights in layout q5t16 (K a multiple of 32). */
int lv_q5a8(const uint8_t *w, int64_t N, int64_t K, const void *x, int64_t ldx, int x_bf16, int M, void *out,
            int64_t ldo, int out_bf16, int nthreads, int split) {
    Weight wt = {w, NULL, NULL, NULL, 0, N, K / QB * Q5_BLOCK, out, ldo, out_bf16};
    if (K % QB) return -1;
    return run(&wt, Q5, x, ldx, x_bf16, M, K, K, nthreads, split);
}

/* Rows [row0, row1) of a q5t16 weight as values d * (q - 16), row-major float32 or
 * bfloat16 (row0 a multiple of 16). */
typedef struct { const uint8_t *w; int64_t K, row0, row1; void *out; int out_bf16; } Q5Unpack;

static void q5_unpack_tile(const void *ctx, int64_t tile) {
    const Q5Unpack *u = ctx;
    int64_t K = u->K, nb = K / QB;
    tile += u->row0 / 16;
    const uint8_t *base = u->w + tile * nb * Q5_BLOCK;
    const __m512i low = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
    float stage[16][QB] __attribute__((aligned(64))); /* one block of the tile's 16 rows */
    int rows = (int)(u->row1 - tile * 16 < 16 ? u->row1 - tile * 16 : 16);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = base + b * Q5_BLOCK;
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 320)));
        for (int g = 0; g < 4; g++) {
            __m512i v = _mm512_loadu_si512(blk + g * 64);
            uint64_t bits[2];
            memcpy(bits, blk + 256 + g * 16, 16);
            __m512i half[2] = {_mm512_and_si512(v, low), _mm512_and_si512(_mm512_srli_epi16(v, 4), low)};
            for (int h = 0; h < 2; h++) {
                __m512i q = _mm512_mask_add_epi8(half[h], _cvtu64_mask64(bits[h]), half[h], sixteen);
                __m128i lanes[4] = {_mm512_extracti32x4_epi32(q, 0), _mm512_extracti32x4_epi32(q, 1),
                                    _mm512_extracti32x4_epi32(q, 2), _mm512_extracti32x4_epi32(q, 3)};
                for (int l = 0; l < 4; l++) { /* rows 4l .. 4l + 3, 4 columns each */
                    __m512 f = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lanes[l])), _mm512_set1_ps(16.f));
                    __m512i which = _mm512_setr_epi32(4 * l, 4 * l, 4 * l, 4 * l, 4 * l + 1, 4 * l + 1, 4 * l + 1,
                                                      4 * l + 1, 4 * l + 2, 4 * l + 2, 4 * l + 2, 4 * l + 2,
                                                      4 * l + 3, 4 * l + 3, 4 * l + 3, 4 * l + 3);
                    f = _mm512_mul_ps(f, _mm512_permutexvar_ps(which, d));
                    int col = g * 8 + h * 4;
                    _mm_store_ps(&stage[4 * l][col], _mm512_extractf32x4_ps(f, 0));
                    _mm_store_ps(&stage[4 * l + 1][col], _mm512_extractf32x4_ps(f, 1));
                    _mm_store_ps(&stage[4 * l + 2][col], _mm512_extractf32x4_ps(f, 2));
                    _mm_store_ps(&stage[4 * l + 3][col], _mm512_extractf32x4_ps(f, 3));
                }
            }
        }
        for (int r = 0; r < rows; r++) {
            int64_t at = (tile * 16 + r - u->row0) * K + b * QB;
            store16(u->out, u->out_bf16, at, _mm512_load_ps(&stage[r][0]), 16);
            store16(u->out, u->out_bf16, at + 16, _mm512_load_ps(&stage[r][16]), 16);
        }
    }
}

int lv_q5_unpack(const uint8_t *w, int64_t N, int64_t K, int64_t row0, int64_t row1, void *out, int out_bf16,
                 int nthreads) {
    if (row0 % 16 || row1 > N || row0 > row1 || K % QB) return -1;
    Q5Unpack u = {w, K, row0, row1, out, out_bf16};
    parallel(q5_unpack_tile, &u, (row1 - row0 + 15) / 16, nthreads, 0);
    return 0;
}

/* Rows [row0, row1) of a t16 weight as their signed codes, row-major [row1 - row0][K]
 * float32 or bfloat16 (row0 a multiple of 16). */
typedef struct { const uint8_t *w; int64_t K, Kp, row0, row1; void *out; int out_bf16; } Unpack;

static void unpack_tile(const void *ctx, int64_t tile) {
    const Unpack *u = ctx;
    const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(64));
    int64_t K = u->K, Kp = u->Kp;
    tile += u->row0 / 16;
    const uint8_t *base = u->w + tile * 16 * Kp;
    for (int lane = 0; lane < 16; lane++) {
        int64_t r = tile * 16 + lane;
        if (r >= u->row1) break;
        for (int64_t k = 0; k < K; k += 64) { /* 16 groups of 4 columns per gather */
            int64_t groups = (Kp - k) / 4; /* groups of 4 columns left in the tile */
            __mmask16 inside = groups >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << groups) - 1);
            __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), inside, index,
                                                    (const void *)(base + (k / 4) * 64 + lane * 4), 1);
            v = _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
            __m128i parts[4] = {_mm512_extracti32x4_epi32(v, 0), _mm512_extracti32x4_epi32(v, 1),
                                _mm512_extracti32x4_epi32(v, 2), _mm512_extracti32x4_epi32(v, 3)};
            for (int j = 0; j < 4; j++) {
                int64_t kk = k + 16 * j;
                if (kk >= K) break;
                __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(parts[j]));
                int n = (int)(K - kk < 16 ? K - kk : 16);
                store16(u->out, u->out_bf16, (r - u->row0) * K + kk, f, n);
            }
        }
    }
}

int lv_w8_unpack(const uint8_t *w, int64_t N, int64_t K, int64_t Kp, int64_t row0, int64_t row1, void *out,
                 int out_bf16, int nthreads) {
    if (row0 % 16 || row1 > N || row0 > row1) return -1;
    Unpack u = {w, K, Kp, row0, row1, out, out_bf16};
    parallel(unpack_tile, &u, (row1 - row0 + 15) / 16, nthreads, 0);
    return 0;
}

/* -- small decode-step ops --------------------------------------------------------------------
 * One call each instead of several PyTorch ops on a few thousand values (their per-op cost,
 * not the arithmetic, is what a decode step pays). Same float32 arithmetic and bfloat16
 * roundings as the PyTorch code they replace (layers/norms.py, activation.py, rotary.py). */

static inline __m512 round_bf16(__m512 v) { /* to the nearest bfloat16 and back */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000)));
}

static inline int tail16(int64_t left) { return left < 16 ? (int)left : 16; }

/* rows x n: y = weight * bf16?(x * rsqrt(mean(x^2) + eps)); with unit_offset, y = x_normed * (1 + weight)
 * rounded once. weight in the same dtype as x. */
int lv_rms_norm(const void *x, const void *weight, void *out, int64_t rows, int64_t n, float eps, int bf16,
                int unit_offset) {
    for (int64_t r = 0; r < rows; r++) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            __m512 v = load16(x, bf16, r * n + i, tail16(n - i));
            sum = _mm512_fmadd_ps(v, v, sum);
        }
        float scale = 1.f / sqrtf(_mm512_reduce_add_ps(sum) / (float)n + eps);
        for (int64_t i = 0; i < n; i += 16) {
            int m = tail16(n - i);
            __m512 v = _mm512_mul_ps(load16(x, bf16, r * n + i, m), _mm512_set1_ps(scale));
            __m512 w = load16(weight, bf16, i, m);
            if (unit_offset) {
                v = _mm512_mul_ps(v, _mm512_add_ps(w, _mm512_set1_ps(1.f)));
            } else {
                if (bf16) v = round_bf16(v);
                v = _mm512_mul_ps(w, v);
            }
            store16(out, bf16, r * n + i, v, m);
        }
    }
    return 0;
}

/* exp(x) for x <= 0 .. moderate, float32, ~1 ulp (Cephes-style range reduction + polynomial). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365447504f));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, k);
}

/* rows x [gate | up] (2n each) -> rows x n: bf16?(silu(gate)) * up. */
int lv_silu_mul(const void *x, void *out, int64_t rows, int64_t n, int bf16) {
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < n; i += 16) {
            int m = tail16(n - i);
            __m512 g = load16(x, bf16, r * 2 * n + i, m), u = load16(x, bf16, r * 2 * n + n + i, m);
            __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
            if (bf16) s = round_bf16(s);
            store16(out, bf16, r * n + i, _mm512_mul_ps(s, u), m);
        }
    }
    return 0;
}

/* Neox rotary: x [tokens, heads, dim] (`stride` values from one token to the next) -> out
 * [tokens, heads, dim] contiguous; cos_sin [tokens, dim] float32 (cos half, then sin half):
 * x1, x2 = halves; x1' = x1 cos - x2 sin; x2' = x2 cos + x1 sin. */
int lv_rope(const void *x, void *out, const float *cos_sin, int64_t tokens, int64_t heads, int64_t dim,
            int64_t stride, int bf16) {
    int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos_sin + t * dim, *s = c + half;
        for (int64_t h = 0; h < heads; h++) {
            int64_t base = t * stride + h * dim, to = (t * heads + h) * dim;
            for (int64_t i = 0; i < half; i += 16) {
                int m = tail16(half - i);
                __m512 x1 = load16(x, bf16, base + i, m), x2 = load16(x, bf16, base + half + i, m);
                __m512 cv = _mm512_maskz_loadu_ps((__mmask16)((1u << m) - 1), c + i);
                __m512 sv = _mm512_maskz_loadu_ps((__mmask16)((1u << m) - 1), s + i);
                __m512 a = _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv));
                __m512 b = _mm512_add_ps(_mm512_mul_ps(x2, cv), _mm512_mul_ps(x1, sv));
                store16(out, bf16, to + i, a, m);
                store16(out, bf16, to + half + i, b, m);
            }
        }
    }
    return 0;
}

/* -- paged attention (decode) ------------------------------------------------------------------ */
#include "avx512_attention.c"

/* -- a whole decode token through the blocks (one call) ----------------------------------------- */
#include "decode_step.c"

/* -- identity ------------------------------------------------------------------------------------ */
LV_API const char *lv_variant(void) { return "avx512"; }
LV_API int lv_max_rows(void) { return MAX_M; }
LV_API int lv_bf16_dot(void) { return bf16_dot_supported(); }
