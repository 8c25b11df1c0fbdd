/* The AVX2 variant: AVX2 + FMA + F16C (most x86-64 CPUs people own: Intel Haswell to 14th
 * generation, AMD Zen 1 to 3). Built twice by levante/kernels/build.py: "avx2", and
 * "avx2-vnni" with LV_AVX_VNNI and -mavxvnni for CPUs with AVX-VNNI (Alder Lake on), where
 * the int8 dot products are vpdpbusd on 256-bit registers.
 *
 * Same layouts as the AVX-512 variant (levante.h) and the same arithmetic: every integer
 * dot product is exact, and every float operation is the AVX-512 variant's, lane for lane, in
 * the same order (its 16-lane vectors are pairs of 8-lane ones here, V16; its horizontal
 * reductions are done in the order GCC's _mm512_reduce_* use), so the matrix products and the
 * small ops give the AVX-512 variant's bits. Attention (avx2_attention.c) sums in another order.
 *
 * Int8 products without VNNI, as ggml does them: vpmaddubsw multiplies unsigned by signed
 * bytes and adds pairs into saturating int16, so the weight (signed: the stored code + 128,
 * xor 0x80) takes the activation's sign (vpsignb) and the activation its magnitude: |x| w
 * sgn(x) pairs stay within 2 * 127 * 127 < 2^15; vpmaddwd then sums pairs into int32. The
 * AVX-512 variant's integer is sum (w + 128) x: the block's 128 * sum(x) is added back.
 * 4-bit and 5-bit codes are unsigned and small: vpmaddubsw takes them as they are, and their
 * int16 sums last a whole block (4-bit: 8 x 2 x 15 x 127 < 2^15) or half of one (5-bit).
 *
 * Rows of x: any number per call; they are quantised once, then each range of weight tiles
 * is read by every group of MAX_M rows while it is in cache (a prefill's products are this
 * kernel too, not a dequantisation and a float matmul: AVX2 has no fast bfloat16 matmul).
 */
#include <immintrin.h>

#include "runtime.h"

#define MAX_M 4        /* rows of x per register pass */
#define MAX_ROWS 4096  /* rows of x per call (levante.h: lv_max_rows) */
#ifndef PREFETCH
#define PREFETCH 2048
#endif

/* -- 16-lane float vectors as two halves -------------------------------------------------------- */

typedef struct { __m256 lo, hi; } V16;

static inline __m256 load8(const void *x, int bf16, int64_t i) {
    if (bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i))), 16));
    return _mm256_loadu_ps((const float *)x + i);
}

static inline __m128i bf16x8(__m256 v) { /* round to nearest even, as the AVX-512 variant's stores */
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}

static inline void store8(void *out, int bf16, int64_t i, __m256 v) {
    if (bf16) _mm_storeu_si128((__m128i *)((uint16_t *)out + i), bf16x8(v));
    else _mm256_storeu_ps((float *)out + i, v);
}

/* 16 values from x[i] on, lanes n.. zero (n may be <= 0). */
static inline V16 load16(const void *x, int bf16, int64_t i, int n) {
    if (n >= 16) return (V16){load8(x, bf16, i), load8(x, bf16, i + 8)};
    uint32_t tmp[16] = {0};
    if (n > 0) memcpy(tmp, (const char *)x + i * (bf16 ? 2 : 4), (size_t)n * (bf16 ? 2 : 4));
    return (V16){load8(tmp, bf16, 0), load8(tmp, bf16, 8)};
}

static inline void store16(void *out, int bf16, int64_t i, V16 v, int n) {
    if (n >= 16) {
        store8(out, bf16, i, v.lo);
        store8(out, bf16, i + 8, v.hi);
        return;
    }
    uint32_t tmp[16];
    store8(tmp, bf16, 0, v.lo);
    store8(tmp, bf16, 8, v.hi);
    memcpy((char *)out + i * (bf16 ? 2 : 4), tmp, (size_t)n * (bf16 ? 2 : 4));
}

static inline V16 v16_set1(float f) { return (V16){_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
static inline V16 v16_add(V16 a, V16 b) { return (V16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
static inline V16 v16_sub(V16 a, V16 b) { return (V16){_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
static inline V16 v16_mul(V16 a, V16 b) { return (V16){_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
static inline V16 v16_div(V16 a, V16 b) { return (V16){_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
static inline V16 v16_fmadd(V16 a, V16 b, V16 c) {
    return (V16){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}

static inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }

/* The AVX-512 variant's _mm512_reduce_add_ps and _mm512_reduce_max_ps, in GCC's order. */
static inline float reduce_add8x2(__m256 hi, __m256 lo) {
    __m256 t3 = _mm256_add_ps(hi, lo);
    __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
}
static inline float reduce_add16(V16 v) { return reduce_add8x2(v.hi, v.lo); }

static inline float reduce_max8x2(__m256 hi, __m256 lo) {
    __m256 t3 = _mm256_max_ps(hi, lo);
    __m128 t6 = _mm_max_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    __m128 t8 = _mm_max_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
    __m128 t10 = _mm_max_ps(t8, _mm_shuffle_ps(t8, t8, _MM_SHUFFLE(0, 1, 0, 1)));
    return _mm_cvtss_f32(t10);
}

static inline int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

static inline V16 round_bf16(V16 v) { /* to the nearest bfloat16 and back */
    __m256i u[2] = {_mm256_castps_si256(v.lo), _mm256_castps_si256(v.hi)};
    for (int h = 0; h < 2; h++) {
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u[h], 16), _mm256_set1_epi32(1));
        u[h] = _mm256_add_epi32(_mm256_add_epi32(u[h], _mm256_set1_epi32(0x7FFF)), lsb);
        u[h] = _mm256_and_si256(u[h], _mm256_set1_epi32((int)0xFFFF0000));
    }
    return (V16){_mm256_castsi256_ps(u[0]), _mm256_castsi256_ps(u[1])};
}

/* -- activations ---------------------------------------------------------------------------------- */

/* One row of x -> int8 codes (Kp of them, zero past K), block scales d, block sums s (float and
 * integer); returns sum_b d_b * s_b. The AVX-512 variant's arithmetic. */
static float quantize_row(const void *x, int bf16, int64_t K, int64_t Kp, int8_t *xq, float *d, float *s,
                          int32_t *si) {
    float total = 0.f;
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b * QB < Kp; b++) {
        int64_t k = b * QB;
        V16 v0 = load16(x, bf16, k, (int)(K - k)), v1 = load16(x, bf16, k + 16, (int)(K - k - 16));
        float amax = reduce_max8x2(_mm256_max_ps(abs8(v0.hi), abs8(v1.hi)), _mm256_max_ps(abs8(v0.lo), abs8(v1.lo)));
        float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        const __m256 vinv = _mm256_set1_ps(inv);
        __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0.lo, vinv)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v0.hi, vinv));
        __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(v1.lo, vinv)), q3 = _mm256_cvtps_epi32(_mm256_mul_ps(v1.hi, vinv));
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
        _mm256_storeu_si256((__m256i *)(xq + k), _mm256_permutevar8x32_epi32(packed, order));
        int sum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(q0, q2), _mm256_add_epi32(q1, q3)));
        d[b] = scale;
        s[b] = (float)sum;
        si[b] = sum;
        total += scale * s[b];
    }
    return total;
}

typedef struct {
    int64_t Kp, nb;         /* padded columns, activation blocks */
    int M;                  /* rows of quantised activations (2 per row of x when split) */
    int split;              /* each row of x is two: its int8 rounding and the rounding's residual */
    const int8_t *xq;       /* [M][Kp] */
    const float *d, *s;     /* [M][nb] */
    const int32_t *si;      /* [M][nb]: s as integers */
    const float *corr;      /* [M]: 128 * sum_b d_b s_b */
} Act;

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

/* As the AVX-512 variant's: PREFETCH bytes on in a tile's stream, in the stream's next tile past its end. */
static inline __attribute__((always_inline)) int64_t ahead(int64_t off, int64_t tstride, const int T) {
    int64_t at = off + PREFETCH;
    return at >= tstride ? at + (T - 1) * tstride : at;
}

static inline int32_t x4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* acc[t][r][h]: tile t's rows 8h .. 8h + 7 for activation row r0 + r. */
typedef __m256 Acc[MAX_M][2];

static inline __attribute__((always_inline)) void zero_acc(Acc *acc, const int T, const int R) {
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) acc[t][r][0] = acc[t][r][1] = _mm256_setzero_ps();
}

/* T tiles x R rows of x from r0, int8 weights: sum_b d_b * (sum over the block of (w + 128) * xq). */
static inline __attribute__((always_inline)) void w8_tiles(const uint8_t *w, int64_t tstride, const Act *a, int r0,
                                                           const int T, const int R, Acc *acc) {
    zero_acc(acc, T, R);
#ifndef LV_AVX_VNNI
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
#endif
    for (int64_t b = 0; b < a->nb; b++) {
        __m256i iacc[2][MAX_M][2];
        for (int t = 0; t < T; t++)
            for (int r = 0; r < R; r++) iacc[t][r][0] = iacc[t][r][1] = _mm256_setzero_si256();
        const uint8_t *wb = w + b * 512;
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            __m256i xv[MAX_M];
#ifndef LV_AVX_VNNI
            __m256i xa[MAX_M];
#endif
            for (int r = 0; r < R; r++) {
                xv[r] = _mm256_set1_epi32(x4(a->xq + (r0 + r) * a->Kp + b * QB + g * 4));
#ifndef LV_AVX_VNNI
                xa[r] = _mm256_sign_epi8(xv[r], xv[r]);
#endif
            }
            for (int t = 0; t < T; t++) {
                _mm_prefetch((const char *)(w + t * tstride + ahead(b * 512 + g * 64, tstride, T)), _MM_HINT_T0);
                for (int h = 0; h < 2; h++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(wb + t * tstride + g * 64 + h * 32));
#ifdef LV_AVX_VNNI
                    for (int r = 0; r < R; r++) iacc[t][r][h] = _mm256_dpbusd_avx_epi32(iacc[t][r][h], wv, xv[r]);
#else
                    wv = _mm256_xor_si256(wv, flip);
                    for (int r = 0; r < R; r++)
                        iacc[t][r][h] = _mm256_add_epi32(iacc[t][r][h], _mm256_madd_epi16(
                            _mm256_maddubs_epi16(xa[r], _mm256_sign_epi8(wv, xv[r])), ones));
#endif
                }
            }
        }
        for (int r = 0; r < R; r++) {
            const __m256 dx = _mm256_set1_ps(a->d[(r0 + r) * a->nb + b]);
#ifndef LV_AVX_VNNI
            const __m256i bias = _mm256_set1_epi32(128 * a->si[(r0 + r) * a->nb + b]);
#endif
            for (int t = 0; t < T; t++)
                for (int h = 0; h < 2; h++) {
                    __m256i sum = iacc[t][r][h];
#ifndef LV_AVX_VNNI
                    sum = _mm256_add_epi32(sum, bias);
#endif
                    acc[t][r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), dx, acc[t][r][h]);
                }
        }
    }
}

/* 4-bit, per group of 32 columns (one activation block), T tiles x R rows of x from r0. */
static inline __attribute__((always_inline)) void q4_tiles(const Weight *wt, int64_t tile, const Act *a, int r0,
                                                           const int T, const int R, Acc *acc) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    zero_acc(acc, T, R);
    const int64_t nb = a->nb;
    for (int64_t b = 0; b < nb; b++) {
        __m256i iacc[2][MAX_M][2]; /* int16 pairs: at most 8 x 2 x 15 x 127 */
        for (int t = 0; t < T; t++)
            for (int r = 0; r < R; r++) iacc[t][r][0] = iacc[t][r][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int g = 0; g < 4; g++) {
            __m256i x0[MAX_M], x1[MAX_M];
            for (int r = 0; r < R; r++) {
                const int8_t *xb = a->xq + (r0 + r) * a->Kp + b * QB + g * 8;
                x0[r] = _mm256_set1_epi32(x4(xb));
                x1[r] = _mm256_set1_epi32(x4(xb + 4));
            }
            for (int t = 0; t < T; t++) {
                const uint8_t *base = wt->w + (tile + t) * wt->tstride;
                const int64_t off = b * 256 + g * 64;
                _mm_prefetch((const char *)(base + ahead(off, wt->tstride, T)), _MM_HINT_T0);
                for (int h = 0; h < 2; h++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(base + off + h * 32));
                    __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    for (int r = 0; r < R; r++)
                        iacc[t][r][h] = _mm256_add_epi16(iacc[t][r][h], _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, x0[r]), _mm256_maddubs_epi16(hi, x1[r])));
                }
            }
        }
        for (int t = 0; t < T; t++) {
            int64_t at = ((tile + t) * nb + b) * 16;
            __m256 scale[2], offset[2];
            for (int h = 0; h < 2; h++) {
                if (wt->qscale_f32) {
                    scale[h] = _mm256_loadu_ps((const float *)wt->qscale + at + 8 * h);
                    offset[h] = _mm256_loadu_ps((const float *)wt->qoffset + at + 8 * h);
                } else {
                    scale[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)wt->qscale + at + 8 * h)));
                    offset[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)wt->qoffset + at + 8 * h)));
                }
            }
            for (int r = 0; r < R; r++) {
                const float dx = a->d[(r0 + r) * nb + b];
                const __m256 ds = _mm256_set1_ps(dx * a->s[(r0 + r) * nb + b]);
                for (int h = 0; h < 2; h++) {
                    __m256 dot = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(iacc[t][r][h], ones)),
                                               _mm256_set1_ps(dx));
                    acc[t][r][h] = _mm256_fmadd_ps(dot, scale[h], acc[t][r][h]);
                    acc[t][r][h] = _mm256_fmadd_ps(offset[h], ds, acc[t][r][h]);
                }
            }
        }
    }
}

/* Bit i of `bits` -> byte i all ones or zero (32 bytes). */
static inline __m256i bits_to_bytes(uint32_t bits) {
    const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
    v = _mm256_or_si256(v, _mm256_set1_epi64x((long long)0x7fbfdfeff7fbfdfeULL));
    return _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1));
}

/* 5-bit (q5t16, see the AVX-512 variant): T tiles x R rows of x from r0. */
static inline __attribute__((always_inline)) void q5_tiles(const Weight *wt, int64_t tile, const Act *a, int r0,
                                                           const int T, const int R, Acc *acc) {
    const __m256i low = _mm256_set1_epi8(0x0F), sixteen = _mm256_set1_epi8(16), ones = _mm256_set1_epi16(1);
    zero_acc(acc, T, R);
    const int64_t nb = a->nb;
    for (int64_t b = 0; b < nb; b++) {
        __m256i iacc[2][MAX_M][2], i16[2][MAX_M][2]; /* int16 pairs for two groups: at most 4 x 2 x 31 x 127 */
        for (int t = 0; t < T; t++)
            for (int r = 0; r < R; r++)
                iacc[t][r][0] = iacc[t][r][1] = i16[t][r][0] = i16[t][r][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int g = 0; g < 4; g++) {
            __m256i x0[MAX_M], x1[MAX_M];
            for (int r = 0; r < R; r++) {
                const int8_t *xb = a->xq + (r0 + r) * a->Kp + b * QB + g * 8;
                x0[r] = _mm256_set1_epi32(x4(xb));
                x1[r] = _mm256_set1_epi32(x4(xb + 4));
            }
            for (int t = 0; t < T; t++) {
                const uint8_t *blk = wt->w + (tile + t) * wt->tstride + b * Q5_BLOCK;
                const uint8_t *tile0 = blk - b * Q5_BLOCK;
                _mm_prefetch((const char *)(tile0 + ahead(b * Q5_BLOCK + g * 64, wt->tstride, T)), _MM_HINT_T0);
                if (g < 2)
                    _mm_prefetch((const char *)(tile0 + ahead(b * Q5_BLOCK + 256 + g * 64, wt->tstride, T)),
                                 _MM_HINT_T0);
                uint32_t bits[4]; /* low-nibble vector's mask (rows 0..7, 8..15), then the high one's */
                memcpy(bits, blk + 256 + g * 16, 16);
                for (int h = 0; h < 2; h++) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(blk + g * 64 + h * 32));
                    __m256i lo = _mm256_or_si256(_mm256_and_si256(v, low),
                                                 _mm256_and_si256(bits_to_bytes(bits[h]), sixteen));
                    __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low),
                                                 _mm256_and_si256(bits_to_bytes(bits[2 + h]), sixteen));
                    for (int r = 0; r < R; r++)
                        i16[t][r][h] = _mm256_add_epi16(i16[t][r][h], _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, x0[r]), _mm256_maddubs_epi16(hi, x1[r])));
                }
            }
            if (g & 1)
                for (int t = 0; t < T; t++)
                    for (int r = 0; r < R; r++)
                        for (int h = 0; h < 2; h++) {
                            iacc[t][r][h] = _mm256_add_epi32(iacc[t][r][h], _mm256_madd_epi16(i16[t][r][h], ones));
                            i16[t][r][h] = _mm256_setzero_si256();
                        }
        }
        for (int t = 0; t < T; t++) {
            const uint8_t *blk = wt->w + (tile + t) * wt->tstride + b * Q5_BLOCK;
            const __m256 d[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 320))),
                                 _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 336)))};
            for (int r = 0; r < R; r++) {
                const __m256 s16 = _mm256_set1_ps(16.f * a->s[(r0 + r) * nb + b]);
                const __m256 dx = _mm256_set1_ps(a->d[(r0 + r) * nb + b]);
                for (int h = 0; h < 2; h++) {
                    __m256 dot = _mm256_sub_ps(_mm256_cvtepi32_ps(iacc[t][r][h]), s16);
                    acc[t][r][h] = _mm256_fmadd_ps(_mm256_mul_ps(dot, dx), d[h], acc[t][r][h]);
                }
            }
        }
    }
}

/* The tile's results for rows r0 .. r0 + R - 1 of the quantised activations: as the AVX-512
 * variant's store_tile (less the correction, the split rows' two parts added, times the scale). */
static inline void store_tile(const Weight *wt, const Act *a, int64_t tile, int r0, int R, Acc acc) {
    int64_t n0 = tile * 16;
    int n = (int)(wt->N - n0 < 16 ? wt->N - n0 : 16);
    __m256 scale[2] = {_mm256_set1_ps(1.f), _mm256_set1_ps(1.f)};
    if (wt->scale) {
        float buf[16] = {0};
        memcpy(buf, wt->scale + n0, sizeof(float) * n);
        scale[0] = _mm256_loadu_ps(buf);
        scale[1] = _mm256_loadu_ps(buf + 8);
    }
    for (int r = 0; r < R; r += 1 + a->split) {
        const int m = r0 + r;
        V16 v;
        __m256 out[2];
        for (int h = 0; h < 2; h++) {
            __m256 x = _mm256_sub_ps(acc[r][h], _mm256_set1_ps(wt->scale ? a->corr[m] : 0.f));
            if (a->split)
                x = _mm256_add_ps(x, _mm256_sub_ps(acc[r + 1][h], _mm256_set1_ps(wt->scale ? a->corr[m + 1] : 0.f)));
            if (wt->scale) x = _mm256_mul_ps(x, scale[h]);
            out[h] = x;
        }
        v.lo = out[0];
        v.hi = out[1];
        store16(wt->out, wt->out_bf16, (m >> a->split) * wt->ldo + n0, v, n);
    }
}

/* Tiles t .. t1 - 1 for R rows from r0: T tiles at a time (the activations stay in registers
 * across them), then one at a time; CALL(tile, T, R, acc) runs a kind's tile kernel. */
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

/* 5-bit weights for many rows of x (a prefill): each tile's codes are decoded once into bytes (per
 * block and group of 4 columns, 64 bytes = 16 rows x 4 columns, as t16 without the +128), then every
 * group of MAX_M rows multiplies them with vpmaddubsw alone (int16 sums of four groups stay below
 * 4 x 2 x 31 x 127 < 2^15): the decoding, most of q5_tiles' work, is paid once per tile, not per
 * four rows. The integers and the float arithmetic are q5_tiles', so the results are its bits. */
static void q5_decode_tile(const uint8_t *tile, int64_t nb, uint8_t *codes) {
    const __m256i low = _mm256_set1_epi8(0x0F), sixteen = _mm256_set1_epi8(16);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = tile + b * Q5_BLOCK;
        for (int g = 0; g < 4; g++) {
            uint32_t bits[4];
            memcpy(bits, blk + 256 + g * 16, 16);
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(blk + g * 64 + h * 32));
                __m256i lo = _mm256_or_si256(_mm256_and_si256(v, low), _mm256_and_si256(bits_to_bytes(bits[h]), sixteen));
                __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low),
                                             _mm256_and_si256(bits_to_bytes(bits[2 + h]), sixteen));
                _mm256_storeu_si256((__m256i *)(codes + b * 512 + (2 * g) * 64 + h * 32), lo);
                _mm256_storeu_si256((__m256i *)(codes + b * 512 + (2 * g + 1) * 64 + h * 32), hi);
            }
        }
    }
}

/* Rows r0 .. r0 + R - 1 of x times one decoded 5-bit tile (codes) of the q5t16 tile `tile`; the
 * activations come broadcast already (xb: per row, block and group of 4 columns, 32 bytes), so each
 * product is one vpmaddubsw with a memory operand and one add. */
static inline __attribute__((always_inline)) void q5_decoded(const uint8_t *tile, const uint8_t *codes, const Act *a,
                                                             const uint8_t *xb, int r0, const int R, Acc acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++) { /* one half of the tile's rows at a time: fewer registers live */
        __m256 sum[MAX_M];
        for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < a->nb; b++) {
            __m256i i16[MAX_M], i32[MAX_M];
            for (int r = 0; r < R; r++) i16[r] = i32[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(codes + b * 512 + g * 64 + h * 32));
                for (int r = 0; r < R; r++)
                    i16[r] = _mm256_add_epi16(i16[r], _mm256_maddubs_epi16(
                        w, _mm256_loadu_si256((const __m256i *)(xb + (((r0 + r) * a->nb + b) * 8 + g) * 32))));
                if ((g & 3) == 3)
                    for (int r = 0; r < R; r++) {
                        i32[r] = _mm256_add_epi32(i32[r], _mm256_madd_epi16(i16[r], ones));
                        i16[r] = _mm256_setzero_si256();
                    }
            }
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tile + b * Q5_BLOCK + 320 + 16 * h)));
            for (int r = 0; r < R; r++) {
                const __m256 s16 = _mm256_set1_ps(16.f * a->s[(r0 + r) * a->nb + b]);
                const __m256 dx = _mm256_set1_ps(a->d[(r0 + r) * a->nb + b]);
                __m256 dot = _mm256_sub_ps(_mm256_cvtepi32_ps(i32[r]), s16);
                sum[r] = _mm256_fmadd_ps(_mm256_mul_ps(dot, dx), d, sum[r]);
            }
        }
        for (int r = 0; r < R; r++) acc[r][h] = sum[r];
    }
}

#define Q5_MANY_TILES 8 /* tiles decoded at a time: 8 x 14 KiB at K = 896, in L2 while every row reads them */

/* Tiles t0 .. t1 - 1 for all rows: Q5_MANY_TILES tiles decoded, then each group of MAX_M rows (its
 * broadcast activations in L1) through all of them. */
static void q5_many(const Weight *wt, const Act *a, const uint8_t *xb, int64_t t0, int64_t t1, uint8_t *codes) {
    const int64_t nb = a->nb;
    for (int64_t s = t0; s < t1; s += Q5_MANY_TILES) {
        const int64_t e = s + Q5_MANY_TILES < t1 ? s + Q5_MANY_TILES : t1;
        for (int64_t t = s; t < e; t++) q5_decode_tile(wt->w + t * wt->tstride, nb, codes + (t - s) * nb * 512);
        for (int r0 = 0; r0 < a->M; r0 += MAX_M) {
            const int rows = a->M - r0 < MAX_M ? a->M - r0 : MAX_M;
            for (int64_t t = s; t < e; t++) {
                const uint8_t *tile = wt->w + t * wt->tstride, *decoded = codes + (t - s) * nb * 512;
                Acc acc;
                switch (rows) {
                case 1: q5_decoded(tile, decoded, a, xb, r0, 1, acc); break;
                case 2: q5_decoded(tile, decoded, a, xb, r0, 2, acc); break;
                case 3: q5_decoded(tile, decoded, a, xb, r0, 3, acc); break;
                default: q5_decoded(tile, decoded, a, xb, r0, 4, acc);
                }
                store_tile(wt, a, t, r0, rows, acc);
            }
        }
    }
}

enum { W8 = 0, Q4 = 1, Q5 = 2 };
typedef struct { const Weight *wt; const Act *a; int kind; int64_t tiles, chunk; const uint8_t *xb; } Task;

/* A chunk of tiles for every row: with many rows, a few tiles at a time, which every group of
 * MAX_M rows then reads from the cache. */
static void run_chunk(const void *ctx, int64_t c) {
    const Task *task = ctx;
    const Act *a = task->a;
    int64_t t0 = c * task->chunk, t1 = t0 + task->chunk < task->tiles ? t0 + task->chunk : task->tiles;
    if (task->xb) { /* 5-bit weights, many rows */
        uint8_t *codes = malloc((size_t)Q5_MANY_TILES * a->nb * 512);
        if (codes) {
            q5_many(task->wt, a, task->xb, t0, t1, codes);
            free(codes);
            return;
        }
    }
    const int64_t step = a->M > MAX_M ? 4 : t1 - t0;
    for (int64_t s = t0; s < t1; s += step) {
        const int64_t e = s + step < t1 ? s + step : t1;
        for (int r0 = 0; r0 < a->M; r0 += MAX_M) {
            const int rows = a->M - r0 < MAX_M ? a->M - r0 : MAX_M; /* even when split: M and MAX_M are */
            if (task->kind == Q4) q4_range(task->wt, a, r0, rows, s, e);
            else if (task->kind == Q5) q5_range(task->wt, a, r0, rows, s, e);
            else w8_range(task->wt, a, r0, rows, s, e);
        }
    }
}

typedef struct { const void *x; int64_t ldx; int x_bf16; int64_t K; Act *a; float *scratch; } Quantize;

static void quantize_rows(const Quantize *q, int r) {
    Act *a = q->a;
    const void *row = (const char *)q->x + r * q->ldx * (q->x_bf16 ? 2 : 4);
    const int m = r << a->split;
    const int64_t Kp = a->Kp, nb = a->nb;
    int8_t *xq = (int8_t *)a->xq;
    float *d = (float *)a->d, *s = (float *)a->s, *corr = (float *)a->corr;
    int32_t *si = (int32_t *)a->si;
    corr[m] = 128.f * quantize_row(row, q->x_bf16, q->K, Kp, xq + m * Kp, d + m * nb, s + m * nb, si + m * nb);
    if (a->split) { /* the residual x - d * q, quantised the same way */
        float *scratch = q->scratch;
        for (int64_t k = 0; k < Kp; k++) {
            float v = k >= q->K ? 0.f : value_at(row, q->x_bf16, k);
            scratch[k] = v - d[m * nb + k / QB] * (float)xq[m * Kp + k];
        }
        corr[m + 1] = 128.f * quantize_row(scratch, 0, Kp, Kp, xq + (m + 1) * Kp, d + (m + 1) * nb, s + (m + 1) * nb,
                                           si + (m + 1) * nb);
    }
}

static void quantize_chunk(const void *ctx, int64_t chunk) { /* rows 16c .. 16c + 15 (no split) */
    const Quantize *q = ctx;
    for (int r = (int)chunk * 16; r < (int)chunk * 16 + 16 && r < q->a->M; r++) quantize_rows(q, r);
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
    a.xq = xq;
    a.d = fl;
    a.s = fl + (size_t)M * a.nb;
    a.corr = fl + (size_t)2 * M * a.nb;
    a.si = si;
    Quantize q = {x, ldx, x_bf16, K, &a, scratch};
    if (split || rows < 16) {
        for (int r = 0; r < rows; r++) quantize_rows(&q, r);
    } else {
        parallel(quantize_chunk, &q, (rows + 15) / 16, nthreads, 0);
    }
    free(scratch);
    uint8_t *xb = NULL; /* 5-bit weights and many rows: the activations broadcast for q5_decoded */
    if (kind == Q5 && M > MAX_M && (xb = malloc((size_t)M * a.nb * 8 * 32))) {
        for (int64_t i = 0; i < (int64_t)M * a.nb * 8; i++)
            _mm256_storeu_si256((__m256i *)(xb + i * 32), _mm256_set1_epi32(x4(xq + i * 4)));
    }
    int64_t tiles = (wt->N + 15) / 16;
    int64_t chunk = tiles / (8 * nthreads) / 4 * 4; /* ~8 chunks per thread, whole 4-tile groups */
    chunk = chunk < 4 ? 4 : chunk > 64 ? 64 : chunk;
    int64_t chunks = nthreads > 1 && tiles >= 8 ? (tiles + chunk - 1) / chunk : 1;
    Task task = {wt, &a, kind, tiles, chunks == 1 ? tiles : chunk, xb};
    parallel(run_chunk, &task, chunks, nthreads, atomic_load(&kernel_spin_ns));
    free(xq);
    free(fl);
    free(si);
    free(xb);
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

/* -- unpacking (dequantisation; plain C: the products above do not need it) ------------------------- */

typedef struct { const uint8_t *w; int64_t K, Kp, row0, row1; void *out; int out_bf16; } Unpack;

static void q5_unpack_tile(const void *ctx, int64_t tile) {
    const Unpack *u = ctx;
    const int64_t K = u->K, nb = K / QB;
    tile += u->row0 / 16;
    const uint8_t *base = u->w + tile * nb * Q5_BLOCK;
    const int rows = (int)(u->row1 - tile * 16 < 16 ? u->row1 - tile * 16 : 16);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = base + b * Q5_BLOCK;
        float d[16];
        _mm256_storeu_ps(d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 320))));
        _mm256_storeu_ps(d + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 336))));
        uint64_t masks[8];
        memcpy(masks, blk + 256, 64);
        for (int r = 0; r < rows; r++) {
            const int64_t at = (tile * 16 + r - u->row0) * K + b * QB;
            for (int g = 0; g < 4; g++)
                for (int half = 0; half < 2; half++)
                    for (int c = 0; c < 4; c++) {
                        const int byte = r * 4 + c;
                        int q = half ? blk[g * 64 + byte] >> 4 : blk[g * 64 + byte] & 0x0F;
                        q |= (int)((masks[2 * g + half] >> byte) & 1) << 4;
                        value_put(u->out, u->out_bf16, at + g * 8 + half * 4 + c, ((float)q - 16.f) * d[r]);
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

/* p * 2^k for integral k in [-126, 128] with one rounding, as _mm512_scalef_ps gives it: two
 * exact powers of two, the first product exact. */
static inline __m256 scale2(__m256 p, __m256 k) {
    __m256i ki = _mm256_cvtps_epi32(k);
    __m256i k1 = _mm256_srai_epi32(ki, 1), k2 = _mm256_sub_epi32(ki, k1);
    __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, _mm256_set1_epi32(127)), 23));
    __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}

/* The AVX-512 variant's exp512, 8 lanes. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447504f));
    __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    return scale2(p, k);
}

int lv_silu_mul(const void *x, void *out, int64_t rows, int64_t n, int bf16) {
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < n; i += 16) {
            int m = tail16(n - i);
            V16 g = load16(x, bf16, r * 2 * n + i, m), u = load16(x, bf16, r * 2 * n + n + i, m);
            V16 e = {exp256(_mm256_sub_ps(_mm256_setzero_ps(), g.lo)), exp256(_mm256_sub_ps(_mm256_setzero_ps(), g.hi))};
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
                a.lo = _mm256_fnmadd_ps(x2.lo, sv.lo, _mm256_mul_ps(x1.lo, cv.lo));
                a.hi = _mm256_fnmadd_ps(x2.hi, sv.hi, _mm256_mul_ps(x1.hi, cv.hi));
                b.lo = _mm256_fmadd_ps(x1.lo, sv.lo, _mm256_mul_ps(x2.lo, cv.lo));
                b.hi = _mm256_fmadd_ps(x1.hi, sv.hi, _mm256_mul_ps(x2.hi, cv.hi));
                store16(out, bf16, to + i, a, m);
                store16(out, bf16, to + half + i, b, m);
            }
        }
    }
    return 0;
}

/* -- paged attention (decode) ------------------------------------------------------------------ */
#include "avx2_attention.c"

/* -- a whole decode token through the blocks (one call) ----------------------------------------- */
#include "decode_step.c"

/* -- identity ------------------------------------------------------------------------------------ */
#ifdef LV_AVX_VNNI
LV_API const char *lv_variant(void) { return "avx2-vnni"; }
#else
LV_API const char *lv_variant(void) { return "avx2"; }
#endif
LV_API int lv_max_rows(void) { return MAX_ROWS; }
LV_API int lv_bf16_dot(void) { return 0; }
