/* The NEON variant: aarch64 with the dot-product extension (ARMv8.2 asimddp: Apple M, Graviton 2
 * on, Ampere, Cortex-A76 on, the Raspberry Pi 5). Built by levante/kernels/build.py with
 * -march=armv8.2-a+dotprod+fp16 (tests: tests/test_kernel_harness.py, under qemu-aarch64 on x86).
 *
 * Same layouts as the other variants (levante.h), read with 128-bit registers: a 64-byte group of
 * a tile is four registers of 4 rows x 4 columns, and sdot (vdotq_laneq_s32) multiplies one of
 * them by 4 activation bytes picked from a register by lane, four products into each 32-bit lane.
 * Weights are signed for sdot (the stored int8 code + 128, xor 0x80; 4- and 5-bit codes are small
 * and non-negative already); the AVX-512 variant's integer, sum (w + 128) x for int8, is had by
 * adding the block's 128 * sum(x). The float arithmetic is the AVX-512 variant's, lane for lane
 * and in the same order (its 16-lane vectors are four 4-lane ones here, V16; reductions in GCC's
 * _mm512_reduce_* order), so products and small ops give its bits; attention sums in another
 * order (neon_attention.c).
 */
#include <arm_neon.h>

#include "runtime.h"

#define MAX_M 4        /* rows of x per register pass */
#define MAX_ROWS 4096  /* rows of x per call (levante.h: lv_max_rows) */
#ifndef PREFETCH
#define PREFETCH 2048
#endif

static inline void prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

/* -- 16-lane float vectors as four quarters ------------------------------------------------------- */

typedef struct { float32x4_t v[4]; } V16;

static inline float32x4_t load4(const void *x, int bf16, int64_t i) {
    if (bf16) return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *)x + i), 16));
    return vld1q_f32((const float *)x + i);
}

static inline uint16x4_t bf16x4(float32x4_t v) { /* round to nearest even, as the AVX-512 variant's stores */
    uint32x4_t u = vreinterpretq_u32_f32(v);
    uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    return vshrn_n_u32(vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7FFF)), lsb), 16);
}

static inline void store4(void *out, int bf16, int64_t i, float32x4_t v) {
    if (bf16) vst1_u16((uint16_t *)out + i, bf16x4(v));
    else vst1q_f32((float *)out + i, v);
}

static inline V16 load16(const void *x, int bf16, int64_t i, int n) {
    V16 r;
    if (n >= 16) {
        for (int q = 0; q < 4; q++) r.v[q] = load4(x, bf16, i + 4 * q);
        return r;
    }
    uint32_t tmp[16] = {0};
    if (n > 0) memcpy(tmp, (const char *)x + i * (bf16 ? 2 : 4), (size_t)n * (bf16 ? 2 : 4));
    for (int q = 0; q < 4; q++) r.v[q] = load4(tmp, bf16, 4 * q);
    return r;
}

static inline void store16(void *out, int bf16, int64_t i, V16 v, int n) {
    if (n >= 16) {
        for (int q = 0; q < 4; q++) store4(out, bf16, i + 4 * q, v.v[q]);
        return;
    }
    uint32_t tmp[16];
    for (int q = 0; q < 4; q++) store4(tmp, bf16, 4 * q, v.v[q]);
    memcpy((char *)out + i * (bf16 ? 2 : 4), tmp, (size_t)n * (bf16 ? 2 : 4));
}

static inline V16 v16_set1(float f) { return (V16){{vdupq_n_f32(f), vdupq_n_f32(f), vdupq_n_f32(f), vdupq_n_f32(f)}}; }
#define V16_MAP2(NAME, OP)                                                         \
    static inline V16 NAME(V16 a, V16 b) {                                         \
        V16 r;                                                                     \
        for (int q = 0; q < 4; q++) r.v[q] = OP(a.v[q], b.v[q]);                   \
        return r;                                                                  \
    }
V16_MAP2(v16_add, vaddq_f32)
V16_MAP2(v16_sub, vsubq_f32)
V16_MAP2(v16_mul, vmulq_f32)
V16_MAP2(v16_div, vdivq_f32)
static inline V16 v16_fmadd(V16 a, V16 b, V16 c) { /* a * b + c, fused */
    V16 r;
    for (int q = 0; q < 4; q++) r.v[q] = vfmaq_f32(c.v[q], a.v[q], b.v[q]);
    return r;
}

/* GCC's _mm512_reduce_add_ps / _max_ps order over lanes 0..15 held as v0..v3. */
static inline float reduce_add16(V16 x) {
    float32x4_t t3lo = vaddq_f32(x.v[2], x.v[0]), t3hi = vaddq_f32(x.v[3], x.v[1]);
    float32x4_t t6 = vaddq_f32(t3hi, t3lo);
    float32x4_t t8 = vaddq_f32(t6, vextq_f32(t6, t6, 2));
    return vgetq_lane_f32(t8, 0) + vgetq_lane_f32(t8, 1);
}

static inline float reduce_max4x4(float32x4_t v0, float32x4_t v1, float32x4_t v2, float32x4_t v3) {
    float32x4_t t6 = vmaxq_f32(vmaxq_f32(v3, v1), vmaxq_f32(v2, v0));
    float32x4_t t8 = vmaxq_f32(t6, vextq_f32(t6, t6, 2));
    return fmaxf(vgetq_lane_f32(t8, 0), vgetq_lane_f32(t8, 1));
}

static inline V16 round_bf16(V16 x) { /* to the nearest bfloat16 and back */
    for (int q = 0; q < 4; q++) {
        uint32x4_t u = vreinterpretq_u32_f32(x.v[q]);
        uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
        u = vandq_u32(vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7FFF)), lsb), vdupq_n_u32(0xFFFF0000u));
        x.v[q] = vreinterpretq_f32_u32(u);
    }
    return x;
}

/* -- activations ---------------------------------------------------------------------------------- */

static float quantize_row(const void *x, int bf16, int64_t K, int64_t Kp, int8_t *xq, float *d, float *s,
                          int32_t *si) {
    float total = 0.f;
    for (int64_t b = 0; b * QB < Kp; b++) {
        int64_t k = b * QB;
        V16 v0 = load16(x, bf16, k, (int)(K - k)), v1 = load16(x, bf16, k + 16, (int)(K - k - 16));
        float32x4_t m[4];
        for (int q = 0; q < 4; q++) m[q] = vmaxq_f32(vabsq_f32(v0.v[q]), vabsq_f32(v1.v[q]));
        float amax = reduce_max4x4(m[0], m[1], m[2], m[3]);
        float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int32x4_t q[8];
        for (int i = 0; i < 4; i++) {
            q[i] = vcvtnq_s32_f32(vmulq_n_f32(v0.v[i], inv));
            q[4 + i] = vcvtnq_s32_f32(vmulq_n_f32(v1.v[i], inv));
        }
        for (int i = 0; i < 4; i++) {
            int16x8_t h = vcombine_s16(vqmovn_s32(q[2 * i]), vqmovn_s32(q[2 * i + 1]));
            vst1_s8(xq + k + 8 * i, vqmovn_s16(h));
        }
        int32x4_t total4 = vdupq_n_s32(0);
        for (int i = 0; i < 8; i++) total4 = vaddq_s32(total4, q[i]);
        int sum = vaddvq_s32(total4);
        d[b] = scale;
        s[b] = (float)sum;
        si[b] = sum;
        total += scale * s[b];
    }
    return total;
}

typedef struct {
    int64_t Kp, nb;
    int M;
    int split;
    const int8_t *xq;
    const float *d, *s;
    const int32_t *si;
    const float *corr;
} Act;

typedef struct {
    const uint8_t *w;
    const float *scale;
    const void *qscale, *qoffset;
    int qscale_f32;
    int64_t N, tstride;
    void *out;
    int64_t ldo;
    int out_bf16;
} Weight;

static inline __attribute__((always_inline)) int64_t ahead(int64_t off, int64_t tstride, const int T) {
    int64_t at = off + PREFETCH;
    return at >= tstride ? at + (T - 1) * tstride : at;
}

/* acc[t][r][q]: tile t's rows 4q .. 4q + 3 for activation row r0 + r. */
typedef float32x4_t Acc[MAX_M][4];

static inline __attribute__((always_inline)) void zero_acc(Acc *acc, const int T, const int R) {
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++)
            for (int q = 0; q < 4; q++) acc[t][r][q] = vdupq_n_f32(0.f);
}

/* sdot with the activation bytes of 32-bit lane `lane` (0..7) of a block's x0 (lanes 0..3) and x1. */
#define DOT_LANE(acc, w, x0, x1, lane)                                                         \
    ((lane) < 4 ? vdotq_laneq_s32(acc, w, x0, (lane) & 3) : vdotq_laneq_s32(acc, w, x1, (lane) & 3))

static inline __attribute__((always_inline)) void w8_tiles(const uint8_t *w, int64_t tstride, const Act *a, int r0,
                                                           const int T, const int R, Acc *acc) {
    zero_acc(acc, T, R);
    const uint8x16_t flip = vdupq_n_u8(0x80);
    for (int64_t b = 0; b < a->nb; b++) {
        int32x4_t iacc[2][MAX_M][4];
        for (int t = 0; t < T; t++)
            for (int r = 0; r < R; r++)
                for (int q = 0; q < 4; q++) iacc[t][r][q] = vdupq_n_s32(0);
        int8x16_t x0[MAX_M], x1[MAX_M];
        for (int r = 0; r < R; r++) {
            x0[r] = vld1q_s8(a->xq + (r0 + r) * a->Kp + b * QB);
            x1[r] = vld1q_s8(a->xq + (r0 + r) * a->Kp + b * QB + 16);
        }
        const uint8_t *wb = w + b * 512;
#define W8_GROUP(g)                                                                                         \
        for (int t = 0; t < T; t++) {                                                                       \
            prefetch(w + t * tstride + ahead(b * 512 + (g) * 64, tstride, T));                              \
            for (int q = 0; q < 4; q++) {                                                                   \
                int8x16_t wv = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wb + t * tstride + (g) * 64 + q * 16), flip)); \
                for (int r = 0; r < R; r++) iacc[t][r][q] = DOT_LANE(iacc[t][r][q], wv, x0[r], x1[r], g);   \
            }                                                                                               \
        }
        W8_GROUP(0) W8_GROUP(1) W8_GROUP(2) W8_GROUP(3) W8_GROUP(4) W8_GROUP(5) W8_GROUP(6) W8_GROUP(7)
#undef W8_GROUP
        for (int r = 0; r < R; r++) {
            const float dx = a->d[(r0 + r) * a->nb + b];
            const int32x4_t bias = vdupq_n_s32(128 * a->si[(r0 + r) * a->nb + b]);
            for (int t = 0; t < T; t++)
                for (int q = 0; q < 4; q++)
                    acc[t][r][q] = vfmaq_n_f32(acc[t][r][q], vcvtq_f32_s32(vaddq_s32(iacc[t][r][q], bias)), dx);
        }
    }
}

static inline __attribute__((always_inline)) void q4_tiles(const Weight *wt, int64_t tile, const Act *a, int r0,
                                                           const int T, const int R, Acc *acc) {
    const uint8x16_t low = vdupq_n_u8(0x0F);
    zero_acc(acc, T, R);
    const int64_t nb = a->nb;
    for (int64_t b = 0; b < nb; b++) {
        int32x4_t iacc[2][MAX_M][4];
        for (int t = 0; t < T; t++)
            for (int r = 0; r < R; r++)
                for (int q = 0; q < 4; q++) iacc[t][r][q] = vdupq_n_s32(0);
        int8x16_t x0[MAX_M], x1[MAX_M];
        for (int r = 0; r < R; r++) {
            x0[r] = vld1q_s8(a->xq + (r0 + r) * a->Kp + b * QB);
            x1[r] = vld1q_s8(a->xq + (r0 + r) * a->Kp + b * QB + 16);
        }
#define Q4_GROUP(g)                                                                                         \
        for (int t = 0; t < T; t++) {                                                                       \
            const uint8_t *base = wt->w + (tile + t) * wt->tstride;                                         \
            const int64_t off = b * 256 + (g) * 64;                                                         \
            prefetch(base + ahead(off, wt->tstride, T));                                                    \
            for (int q = 0; q < 4; q++) {                                                                   \
                uint8x16_t v = vld1q_u8(base + off + q * 16);                                               \
                int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, low)), hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4)); \
                for (int r = 0; r < R; r++) {                                                               \
                    iacc[t][r][q] = DOT_LANE(iacc[t][r][q], lo, x0[r], x1[r], 2 * (g));                     \
                    iacc[t][r][q] = DOT_LANE(iacc[t][r][q], hi, x0[r], x1[r], 2 * (g) + 1);                 \
                }                                                                                           \
            }                                                                                               \
        }
        Q4_GROUP(0) Q4_GROUP(1) Q4_GROUP(2) Q4_GROUP(3)
#undef Q4_GROUP
        for (int t = 0; t < T; t++) {
            int64_t at = ((tile + t) * nb + b) * 16;
            float32x4_t scale[4], offset[4];
            for (int q = 0; q < 4; q++) {
                if (wt->qscale_f32) {
                    scale[q] = vld1q_f32((const float *)wt->qscale + at + 4 * q);
                    offset[q] = vld1q_f32((const float *)wt->qoffset + at + 4 * q);
                } else {
                    scale[q] = vcvt_f32_f16(vld1_f16((const float16_t *)wt->qscale + at + 4 * q));
                    offset[q] = vcvt_f32_f16(vld1_f16((const float16_t *)wt->qoffset + at + 4 * q));
                }
            }
            for (int r = 0; r < R; r++) {
                const float dx = a->d[(r0 + r) * nb + b];
                const float ds = dx * a->s[(r0 + r) * nb + b];
                for (int q = 0; q < 4; q++) {
                    float32x4_t dot = vmulq_n_f32(vcvtq_f32_s32(iacc[t][r][q]), dx);
                    acc[t][r][q] = vfmaq_f32(acc[t][r][q], dot, scale[q]);
                    acc[t][r][q] = vfmaq_n_f32(acc[t][r][q], offset[q], ds);
                }
            }
        }
    }
}

/* 16 bits -> 16 bytes, 16 where the bit is set (bit i: byte i). */
static inline uint8x16_t bits16(uint16_t bits) {
    static const uint8_t weights[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    uint8x16_t v = vcombine_u8(vdup_n_u8((uint8_t)bits), vdup_n_u8((uint8_t)(bits >> 8)));
    return vandq_u8(vtstq_u8(v, vld1q_u8(weights)), vdupq_n_u8(16));
}

static inline __attribute__((always_inline)) void q5_tiles(const Weight *wt, int64_t tile, const Act *a, int r0,
                                                           const int T, const int R, Acc *acc) {
    const uint8x16_t low = vdupq_n_u8(0x0F);
    zero_acc(acc, T, R);
    const int64_t nb = a->nb;
    for (int64_t b = 0; b < nb; b++) {
        int32x4_t iacc[2][MAX_M][4];
        for (int t = 0; t < T; t++)
            for (int r = 0; r < R; r++)
                for (int q = 0; q < 4; q++) iacc[t][r][q] = vdupq_n_s32(0);
        int8x16_t x0[MAX_M], x1[MAX_M];
        for (int r = 0; r < R; r++) {
            x0[r] = vld1q_s8(a->xq + (r0 + r) * a->Kp + b * QB);
            x1[r] = vld1q_s8(a->xq + (r0 + r) * a->Kp + b * QB + 16);
        }
#define Q5_GROUP(g)                                                                                         \
        for (int t = 0; t < T; t++) {                                                                       \
            const uint8_t *blk = wt->w + (tile + t) * wt->tstride + b * Q5_BLOCK;                           \
            const uint8_t *tile0 = blk - b * Q5_BLOCK;                                                      \
            prefetch(tile0 + ahead(b * Q5_BLOCK + (g) * 64, wt->tstride, T));                               \
            if ((g) < 2) prefetch(tile0 + ahead(b * Q5_BLOCK + 256 + (g) * 64, wt->tstride, T));            \
            uint16_t bits[8]; /* the low nibbles' mask by 16 bytes, then the high nibbles' */              \
            memcpy(bits, blk + 256 + (g) * 16, 16);                                                         \
            for (int q = 0; q < 4; q++) {                                                                   \
                uint8x16_t v = vld1q_u8(blk + (g) * 64 + q * 16);                                           \
                int8x16_t lo = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(v, low), bits16(bits[q])));            \
                int8x16_t hi = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(v, 4), bits16(bits[4 + q])));        \
                for (int r = 0; r < R; r++) {                                                               \
                    iacc[t][r][q] = DOT_LANE(iacc[t][r][q], lo, x0[r], x1[r], 2 * (g));                     \
                    iacc[t][r][q] = DOT_LANE(iacc[t][r][q], hi, x0[r], x1[r], 2 * (g) + 1);                 \
                }                                                                                           \
            }                                                                                               \
        }
        Q5_GROUP(0) Q5_GROUP(1) Q5_GROUP(2) Q5_GROUP(3)
#undef Q5_GROUP
        for (int t = 0; t < T; t++) {
            const uint8_t *blk = wt->w + (tile + t) * wt->tstride + b * Q5_BLOCK;
            float32x4_t d[4];
            for (int q = 0; q < 4; q++) d[q] = vcvt_f32_f16(vld1_f16((const float16_t *)(blk + 320) + 4 * q));
            for (int r = 0; r < R; r++) {
                const float s16 = 16.f * a->s[(r0 + r) * nb + b], dx = a->d[(r0 + r) * nb + b];
                for (int q = 0; q < 4; q++) {
                    float32x4_t dot = vsubq_f32(vcvtq_f32_s32(iacc[t][r][q]), vdupq_n_f32(s16));
                    acc[t][r][q] = vfmaq_f32(acc[t][r][q], vmulq_n_f32(dot, dx), d[q]);
                }
            }
        }
    }
}

static inline void store_tile(const Weight *wt, const Act *a, int64_t tile, int r0, int R, Acc acc) {
    int64_t n0 = tile * 16;
    int n = (int)(wt->N - n0 < 16 ? wt->N - n0 : 16);
    float32x4_t scale[4];
    float buf[16] = {0};
    if (wt->scale) memcpy(buf, wt->scale + n0, sizeof(float) * n);
    for (int q = 0; q < 4; q++) scale[q] = wt->scale ? vld1q_f32(buf + 4 * q) : vdupq_n_f32(1.f);
    for (int r = 0; r < R; r += 1 + a->split) {
        const int m = r0 + r;
        V16 v;
        for (int q = 0; q < 4; q++) {
            float32x4_t x = vsubq_f32(acc[r][q], vdupq_n_f32(wt->scale ? a->corr[m] : 0.f));
            if (a->split) x = vaddq_f32(x, vsubq_f32(acc[r + 1][q], vdupq_n_f32(wt->scale ? a->corr[m + 1] : 0.f)));
            if (wt->scale) x = vmulq_f32(x, scale[q]);
            v.v[q] = x;
        }
        store16(wt->out, wt->out_bf16, (m >> a->split) * wt->ldo + n0, v, n);
    }
}

#define TILE_RUN(CALL, T, R)                                                       \
    case R: {                                                                      \
        Acc acc[T];                                                                \
        for (; t + T <= t1; t += T) {                                              \
            CALL(t, T, R, acc);                                                    \
            for (int i = 0; i < T; i++) store_tile(wt, a, t + i, r0, R, acc[i]);   \
        }                                                                          \
        for (; t < t1; t++) {                                                      \
            CALL(t, 1, R, acc);                                                    \
            store_tile(wt, a, t, r0, R, acc[0]);                                   \
        }                                                                          \
        break;                                                                     \
    }

#define TILE_RANGE(NAME, CALL)                                                     \
    static void NAME(const Weight *wt, const Act *a, int r0, int rows, int64_t t, int64_t t1) { \
        switch (rows) {                                                            \
            TILE_RUN(CALL, 2, 1)                                                   \
            TILE_RUN(CALL, 1, 2)                                                   \
            TILE_RUN(CALL, 1, 3)                                                   \
            TILE_RUN(CALL, 1, 4)                                                   \
        }                                                                          \
    }

#define W8_CALL(tile, T, R, acc) w8_tiles(wt->w + (tile) * wt->tstride, wt->tstride, a, r0, T, R, acc)
TILE_RANGE(w8_range, W8_CALL)
#define Q4_CALL(tile, T, R, acc) q4_tiles(wt, tile, a, r0, T, R, acc)
TILE_RANGE(q4_range, Q4_CALL)
#define Q5_CALL(tile, T, R, acc) q5_tiles(wt, tile, a, r0, T, R, acc)
TILE_RANGE(q5_range, Q5_CALL)

enum { W8 = 0, Q4 = 1, Q5 = 2 };
typedef struct { const Weight *wt; const Act *a; int kind; int64_t tiles, chunk; } Task;

static void run_chunk(const void *ctx, int64_t c) {
    const Task *task = ctx;
    const Act *a = task->a;
    int64_t t0 = c * task->chunk, t1 = t0 + task->chunk < task->tiles ? t0 + task->chunk : task->tiles;
    const int64_t step = a->M > MAX_M ? 4 : t1 - t0;
    for (int64_t s = t0; s < t1; s += step) {
        const int64_t e = s + step < t1 ? s + step : t1;
        for (int r0 = 0; r0 < a->M; r0 += MAX_M) {
            const int rows = a->M - r0 < MAX_M ? a->M - r0 : MAX_M;
            if (task->kind == Q4) q4_range(task->wt, a, r0, rows, s, e);
            else if (task->kind == Q5) q5_range(task->wt, a, r0, rows, s, e);
            else w8_range(task->wt, a, r0, rows, s, e);
        }
    }
}

static int run(const Weight *wt, int kind, const void *x, int64_t ldx, int x_bf16, int rows, int64_t K, int64_t Kp,
               int nthreads, int split) {
    if (rows < 1 || rows > MAX_ROWS || Kp % QB || K > Kp) return -1;
    const int M = rows << (split != 0);
    Act a;
    a.Kp = Kp;
    a.nb = Kp / QB;
    a.M = M;
    a.split = split != 0;
    int8_t *xq = malloc((size_t)M * Kp);
    float *fl = malloc(sizeof(float) * ((size_t)2 * M * a.nb + M));
    int32_t *si = malloc(sizeof(int32_t) * (size_t)M * a.nb);
    float *scratch = split ? malloc(sizeof(float) * (size_t)Kp) : NULL;
    if (!xq || !fl || !si || (split && !scratch)) {
        free(xq); free(fl); free(si); free(scratch);
        return -2;
    }
    float *d = fl, *s = fl + (size_t)M * a.nb, *corr = fl + (size_t)2 * M * a.nb;
    for (int r = 0; r < rows; r++) {
        const void *row = (const char *)x + r * ldx * (x_bf16 ? 2 : 4);
        const int m = r << a.split;
        corr[m] = 128.f * quantize_row(row, x_bf16, K, Kp, xq + m * Kp, d + m * a.nb, s + m * a.nb, si + m * a.nb);
        if (split) {
            for (int64_t k = 0; k < Kp; k++) {
                float v = k >= K ? 0.f : value_at(row, x_bf16, k);
                scratch[k] = v - d[m * a.nb + k / QB] * (float)xq[m * Kp + k];
            }
            corr[m + 1] = 128.f * quantize_row(scratch, 0, Kp, Kp, xq + (m + 1) * Kp, d + (m + 1) * a.nb,
                                               s + (m + 1) * a.nb, si + (m + 1) * a.nb);
        }
    }
    free(scratch);
    a.xq = xq;
    a.d = d;
    a.s = s;
    a.si = si;
    a.corr = corr;
    int64_t tiles = (wt->N + 15) / 16;
    int64_t chunk = tiles / (8 * nthreads) / 4 * 4;
    chunk = chunk < 4 ? 4 : chunk > 64 ? 64 : chunk;
    int64_t chunks = nthreads > 1 && tiles >= 8 ? (tiles + chunk - 1) / chunk : 1;
    Task task = {wt, &a, kind, tiles, chunks == 1 ? tiles : chunk};
    parallel(run_chunk, &task, chunks, nthreads, atomic_load(&kernel_spin_ns));
    free(xq);
    free(fl);
    free(si);
    return 0;
}

int lv_w8a8(const uint8_t *w, const float *scale, int64_t N, int64_t K, int64_t Kp, const void *x, int64_t ldx,
            int x_bf16, int M, void *out, int64_t ldo, int out_bf16, int nthreads) {
    Weight wt = {w, scale, NULL, NULL, 0, N, 16 * Kp, out, ldo, out_bf16};
    return run(&wt, W8, x, ldx, x_bf16, M, K, Kp, nthreads, 0);
}

int lv_w8a16(const uint8_t *w, const float *scale, int64_t N, int64_t K, int64_t Kp, const void *x, int64_t ldx,
             int x_bf16, int M, void *out, int64_t ldo, int out_bf16, int nthreads) {
    Weight wt = {w, scale, NULL, NULL, 0, N, 16 * Kp, out, ldo, out_bf16};
    return run(&wt, W8, x, ldx, x_bf16, M, K, Kp, nthreads, 1);
}

int lv_q4a8(const uint8_t *w, const void *qscale, const void *qoffset, int qscale_f32, int64_t N, int64_t K,
            const void *x, int64_t ldx, int x_bf16, int M, void *out, int64_t ldo, int out_bf16, int nthreads,
            int split) {
    Weight wt = {w, NULL, qscale, qoffset, qscale_f32, N, 8 * K, out, ldo, out_bf16};
    if (K % QB) return -1;
    return run(&wt, Q4, x, ldx, x_bf16, M, K, K, nthreads, split);
}

int lv_q5a8(const uint8_t *w, int64_t N, int64_t K, const void *x, int64_t ldx, int x_bf16, int M, void *out,
            int64_t ldo, int out_bf16, int nthreads, int split) {
    Weight wt = {w, NULL, NULL, NULL, 0, N, K / QB * Q5_BLOCK, out, ldo, out_bf16};
    if (K % QB) return -1;
    return run(&wt, Q5, x, ldx, x_bf16, M, K, K, nthreads, split);
}

/* -- unpacking (plain C, as the AVX2 variant's) ----------------------------------------------------- */

typedef struct { const uint8_t *w; int64_t K, Kp, row0, row1; void *out; int out_bf16; } Unpack;

static void q5_unpack_tile(const void *ctx, int64_t tile) {
    const Unpack *u = ctx;
    const int64_t K = u->K, nb = K / QB;
    tile += u->row0 / 16;
    const uint8_t *base = u->w + tile * nb * Q5_BLOCK;
    const int rows = (int)(u->row1 - tile * 16 < 16 ? u->row1 - tile * 16 : 16);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = base + b * Q5_BLOCK;
        uint64_t masks[8];
        memcpy(masks, blk + 256, 64);
        for (int r = 0; r < rows; r++) {
            __fp16 half;
            memcpy(&half, blk + 320 + 2 * r, 2);
            const float d = (float)half;
            const int64_t at = (tile * 16 + r - u->row0) * K + b * QB;
            for (int g = 0; g < 4; g++)
                for (int h = 0; h < 2; h++)
                    for (int c = 0; c < 4; c++) {
                        const int byte = r * 4 + c;
                        int q = h ? blk[g * 64 + byte] >> 4 : blk[g * 64 + byte] & 0x0F;
                        q |= (int)((masks[2 * g + h] >> byte) & 1) << 4;
                        value_put(u->out, u->out_bf16, at + g * 8 + h * 4 + c, ((float)q - 16.f) * d);
                    }
        }
    }
}

int lv_q5_unpack(const uint8_t *w, int64_t N, int64_t K, int64_t row0, int64_t row1, void *out, int out_bf16,
                 int nthreads) {
    if (row0 % 16 || row1 > N || row0 > row1 || K % QB) return -1;
    Unpack u = {w, K, K, row0, row1, out, out_bf16};
    parallel(q5_unpack_tile, &u, (row1 - row0 + 15) / 16, nthreads, 0);
    return 0;
}

static void unpack_tile(const void *ctx, int64_t tile) {
    const Unpack *u = ctx;
    tile += u->row0 / 16;
    const uint8_t *base = u->w + tile * 16 * u->Kp;
    for (int lane = 0; lane < 16; lane++) {
        const int64_t r = tile * 16 + lane;
        if (r >= u->row1) break;
        for (int64_t k = 0; k < u->K; k++)
            value_put(u->out, u->out_bf16, (r - u->row0) * u->K + k,
                      (float)(int8_t)(base[(k / 4) * 64 + lane * 4 + k % 4] ^ 0x80));
    }
}

int lv_w8_unpack(const uint8_t *w, int64_t N, int64_t K, int64_t Kp, int64_t row0, int64_t row1, void *out,
                 int out_bf16, int nthreads) {
    if (row0 % 16 || row1 > N || row0 > row1) return -1;
    Unpack u = {w, K, Kp, row0, row1, out, out_bf16};
    parallel(unpack_tile, &u, (row1 - row0 + 15) / 16, nthreads, 0);
    return 0;
}

/* -- small decode-step ops (the AVX-512 variant's arithmetic) ----------------------------------------- */

static inline int tail16(int64_t left) { return left < 16 ? (int)left : 16; }

int lv_rms_norm(const void *x, const void *weight, void *out, int64_t rows, int64_t n, float eps, int bf16,
                int unit_offset) {
    for (int64_t r = 0; r < rows; r++) {
        V16 sum = v16_set1(0.f);
        for (int64_t i = 0; i < n; i += 16) {
            V16 v = load16(x, bf16, r * n + i, tail16(n - i));
            sum = v16_fmadd(v, v, sum);
        }
        float scale = 1.f / sqrtf(reduce_add16(sum) / (float)n + eps);
        for (int64_t i = 0; i < n; i += 16) {
            int m = tail16(n - i);
            V16 v = v16_mul(load16(x, bf16, r * n + i, m), v16_set1(scale));
            V16 w = load16(weight, bf16, i, m);
            if (unit_offset) {
                v = v16_mul(v, v16_add(w, v16_set1(1.f)));
            } else {
                if (bf16) v = round_bf16(v);
                v = v16_mul(w, v);
            }
            store16(out, bf16, r * n + i, v, m);
        }
    }
    return 0;
}

/* The AVX-512 variant's exp512, 4 lanes (its scalef as two exact powers of two, see avx2.c). */
static inline float32x4_t exp128(float32x4_t x) {
    x = vmaxq_f32(vminq_f32(x, vdupq_n_f32(88.3762626647949f)), vdupq_n_f32(-87.3365447504f));
    float32x4_t k = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    float32x4_t r = vfmsq_f32(x, k, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, k, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500E-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507E-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073E-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894E-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459E-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201E-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.f)), p, vmulq_f32(r, r));
    int32x4_t ki = vcvtq_s32_f32(k);
    int32x4_t k1 = vshrq_n_s32(ki, 1), k2 = vsubq_s32(ki, k1);
    float32x4_t f1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(k1, vdupq_n_s32(127)), 23));
    float32x4_t f2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(k2, vdupq_n_s32(127)), 23));
    return vmulq_f32(vmulq_f32(p, f1), f2);
}

int lv_silu_mul(const void *x, void *out, int64_t rows, int64_t n, int bf16) {
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < n; i += 16) {
            int m = tail16(n - i);
            V16 g = load16(x, bf16, r * 2 * n + i, m), u = load16(x, bf16, r * 2 * n + n + i, m), e;
            for (int q = 0; q < 4; q++) e.v[q] = exp128(vsubq_f32(vdupq_n_f32(0.f), g.v[q]));
            V16 s = v16_div(g, v16_add(v16_set1(1.f), e));
            if (bf16) s = round_bf16(s);
            store16(out, bf16, r * n + i, v16_mul(s, u), m);
        }
    }
    return 0;
}

int lv_rope(const void *x, void *out, const float *cos_sin, int64_t tokens, int64_t heads, int64_t dim,
            int64_t stride, int bf16) {
    int64_t half = dim / 2;
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos_sin + t * dim, *s = c + half;
        for (int64_t h = 0; h < heads; h++) {
            int64_t base = t * stride + h * dim, to = (t * heads + h) * dim;
            for (int64_t i = 0; i < half; i += 16) {
                int m = tail16(half - i);
                V16 x1 = load16(x, bf16, base + i, m), x2 = load16(x, bf16, base + half + i, m);
                V16 cv = load16(c, 0, i, m), sv = load16(s, 0, i, m);
                V16 a, b; /* fused as GCC fuses the AVX-512 variant's: x1 c - x2 s with x1 c rounded first */
                for (int q = 0; q < 4; q++) {
                    a.v[q] = vfmsq_f32(vmulq_f32(x1.v[q], cv.v[q]), x2.v[q], sv.v[q]);
                    b.v[q] = vfmaq_f32(vmulq_f32(x2.v[q], cv.v[q]), x1.v[q], sv.v[q]);
                }
                store16(out, bf16, to + i, a, m);
                store16(out, bf16, to + half + i, b, m);
            }
        }
    }
    return 0;
}

/* -- paged attention (decode) ------------------------------------------------------------------ */
#include "neon_attention.c"

/* -- a whole decode token through the blocks (one call) ----------------------------------------- */
#include "decode_step.c"

/* -- identity ------------------------------------------------------------------------------------ */
LV_API const char *lv_variant(void) { return "neon"; }
LV_API int lv_max_rows(void) { return MAX_ROWS; }
LV_API int lv_bf16_dot(void) { return 0; }
