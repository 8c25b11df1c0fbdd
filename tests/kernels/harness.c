/* The kernel tests' cases in C, against float64 definitions: a Python-free driver for a variant
 * that cannot run beside this machine's Python (the aarch64 NEON variant under qemu-aarch64 on
 * x86), compiled with one variant's source (tests/test_kernel_harness.py):
 *
 *   cc <variant flags> -I levante/kernels/cpu tests/kernels/harness.c levante/kernels/cpu/<variant>.c
 *
 * Cases mirror tests/test_native_kernels.py, test_native_attention.py and test_kv_int8.py (the
 * same bounds: a product may differ from the exact one by the int8 rounding of x, half a step
 * per value; attention by float32 rounding), plus the one-call decode step against a float64
 * forward of the same block. Prints one line per failure and a summary; exits 1 on any failure.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "levante.h"

static int failures, checks;

#define CHECK(cond, ...)                                                          \
    do {                                                                          \
        checks++;                                                                 \
        if (!(cond)) {                                                            \
            failures++;                                                           \
            if (failures <= 40) {                                                 \
                printf("FAIL %s:%d: ", __func__, __LINE__);                       \
                printf(__VA_ARGS__);                                              \
                printf("\n");                                                     \
            }                                                                     \
        }                                                                         \
    } while (0)

/* -- random numbers and float formats -------------------------------------------------------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static void seed(uint64_t s) { rng_state = s * 0x9E3779B97F4A7C15ull + 1; }
static uint64_t next_u64(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double uniform(void) { return (double)(next_u64() >> 11) / 9007199254740992.0; }
static double gauss(void) { return sqrt(-2.0 * log(uniform() + 1e-300)) * cos(6.283185307179586 * uniform()); }
static int randint(int n) { return (int)(next_u64() % (uint64_t)n); }

static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint16_t to_f16(float f) { /* round to nearest even, normal and subnormal range */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000;
    float a = fabsf(f);
    if (isnan(a)) return 0x7E00;
    if (a >= 65520.f) return (uint16_t)(sign | 0x7C00);
    if (a < 6.103515625e-05f) { /* subnormal: multiples of 2^-24 */
        float q = nearbyintf(a * 16777216.f);
        return (uint16_t)(sign | (uint32_t)q);
    }
    int e;
    float m = frexpf(a, &e); /* a = m 2^e, m in [0.5, 1) */
    float q = nearbyintf(m * 2048.f); /* 11 bits */
    if (q >= 2048.f) { q /= 2; e++; }
    return (uint16_t)(sign | (uint32_t)(e + 14) << 10 | ((uint32_t)q - 1024));
}
static float from_f16(uint16_t h) {
    int e = (h >> 10) & 0x1F, m = h & 0x3FF;
    float v = e == 0 ? ldexpf((float)m, -24) : e == 31 ? INFINITY : ldexpf((float)(m + 1024), e - 25);
    return h & 0x8000 ? -v : v;
}

/* x as the kernels read it: float32, or bfloat16 (`bf16`), into a buffer; returns the values seen. */
static void *activations(const double *x, int64_t n, int bf16, double *seen) {
    void *buf = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) {
        if (bf16) {
            ((uint16_t *)buf)[i] = to_bf16((float)x[i]);
            seen[i] = from_bf16(((uint16_t *)buf)[i]);
        } else {
            ((float *)buf)[i] = (float)x[i];
            seen[i] = (float)x[i];
        }
    }
    return buf;
}
static double out_value(const void *out, int bf16, int64_t i) {
    return bf16 ? from_bf16(((const uint16_t *)out)[i]) : ((const float *)out)[i];
}

/* -- matrix products --------------------------------------------------------------------------------- */

/* Checks out[m, n] against want = x . w (float64, x as the kernel saw it) as the Python tests do:
 * relative Frobenius error < 1%, and each value within the int8 rounding bound of x plus slack. */
static void check_product(const char *what, const double *w, const double *x, int N, int K, int M, const void *out,
                          int out_bf16) {
    double err2 = 0, norm2 = 0;
    int bad = 0;
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            double want = 0, bound = 0;
            for (int k = 0; k < K; k++) want += x[m * K + k] * w[(int64_t)n * K + k];
            for (int b = 0; b * 32 < K; b++) {
                double amax = 0, absw = 0;
                for (int k = b * 32; k < K && k < b * 32 + 32; k++) {
                    amax = fmax(amax, fabs(x[m * K + k]));
                    absw += fabs(w[(int64_t)n * K + k]);
                }
                bound += amax / 127 / 2 * absw;
            }
            double got = out_value(out, out_bf16, (int64_t)m * N + n);
            err2 += (got - want) * (got - want);
            norm2 += want * want;
            double slack = out_bf16 ? 1.0 / 256 : 1e-5;
            if (!(fabs(got - want) <= bound * 1.01 + slack * fabs(want) + 1e-4) && bad++ < 3)
                printf("  %s: [%d, %d] got %.6g want %.6g bound %.3g\n", what, m, n, got, want, bound);
        }
    }
    CHECK(bad == 0, "%s N=%d K=%d M=%d: %d values outside the rounding bound", what, N, K, M, bad);
    CHECK(sqrt(err2 / (norm2 > 0 ? norm2 : 1)) < 0.01, "%s N=%d K=%d M=%d: relative error %.4g", what, N, K, M,
          sqrt(err2 / norm2));
}

static void test_int8(int N, int K, int M, int bf16) {
    const int Kp = (K + 31) / 32 * 32, N16 = (N + 15) / 16 * 16;
    int8_t *codes = malloc((size_t)N * K);
    float *scale = malloc(sizeof(float) * N);
    double *w = malloc(sizeof(double) * N * K), *x = malloc(sizeof(double) * M * K), *seen = malloc(sizeof(double) * M * K);
    for (int n = 0; n < N; n++) {
        double amax = 0, row[8192];
        for (int k = 0; k < K; k++) amax = fmax(amax, fabs(row[k] = gauss()));
        scale[n] = (float)(amax / 127);
        for (int k = 0; k < K; k++) {
            codes[(int64_t)n * K + k] = (int8_t)fmax(-127, fmin(127, nearbyint(row[k] / scale[n])));
            w[(int64_t)n * K + k] = codes[(int64_t)n * K + k] * (double)scale[n];
        }
    }
    for (int i = 0; i < M * K; i++) x[i] = gauss();
    uint8_t *tiles = malloc((size_t)N16 * Kp);
    CHECK(lv_w8_pack(codes, N, K, Kp, tiles, 2) == 0, "lv_w8_pack");
    void *xb = activations(x, (int64_t)M * K, bf16, seen);
    void *out = malloc(sizeof(float) * M * N), *out1 = malloc(sizeof(float) * M * N);
    for (int precise = 0; precise < 2; precise++) {
        int (*fn)(const uint8_t *, const float *, int64_t, int64_t, int64_t, const void *, int64_t, int, int, void *,
                  int64_t, int, int) = precise ? lv_w8a16 : lv_w8a8;
        int step = lv_max_rows() / (precise ? 2 : 1);
        for (int m0 = 0; m0 < M; m0 += step) {
            int rows = M - m0 < step ? M - m0 : step;
            CHECK(fn(tiles, scale, N, K, Kp, (char *)xb + (int64_t)m0 * K * (bf16 ? 2 : 4), K, bf16, rows,
                     (char *)out + (int64_t)m0 * N * (bf16 ? 2 : 4), N, bf16, 2) == 0, "w8 call");
            CHECK(fn(tiles, scale, N, K, Kp, (char *)xb + (int64_t)m0 * K * (bf16 ? 2 : 4), K, bf16, rows,
                     (char *)out1 + (int64_t)m0 * N * (bf16 ? 2 : 4), N, bf16, 1) == 0, "w8 call");
        }
        check_product(precise ? "w8a16" : "w8a8", w, seen, N, K, M, out, bf16);
        CHECK(memcmp(out, out1, (size_t)M * N * (bf16 ? 2 : 4)) == 0, "int8 N=%d K=%d: 1 and 2 threads differ", N, K);
    }
    float *back = malloc(sizeof(float) * N * K);
    CHECK(lv_w8_unpack(tiles, N, K, Kp, 0, N, back, 0, 2) == 0, "lv_w8_unpack");
    int same = 1;
    for (int64_t i = 0; i < (int64_t)N * K; i++) same &= back[i] == (float)codes[i];
    CHECK(same, "lv_w8_unpack N=%d K=%d: codes differ", N, K);
    free(codes); free(scale); free(w); free(x); free(seen); free(tiles); free(xb); free(out); free(out1); free(back);
}

/* q4t16 (levante.h): packed [N16][K / 2], scales and offsets [tile][group][16]. */
static void test_int4(int N, int K, int M, int f32_scales) {
    const int N16 = (N + 15) / 16 * 16, G = K / 32;
    uint8_t *packed = calloc((size_t)N16 * K / 2, 1);
    void *qs = calloc((size_t)N16 * G, 4), *qo = calloc((size_t)N16 * G, 4);
    double *w = malloc(sizeof(double) * N * K), *x = malloc(sizeof(double) * M * K), *seen = malloc(sizeof(double) * M * K);
    for (int n = 0; n < N; n++)
        for (int g = 0; g < G; g++) {
            float s = (float)(uniform() * 0.1), o = (float)(-7.5 * s + gauss() * 0.02); /* about zero mean */
            int64_t at = ((int64_t)(n / 16) * G + g) * 16 + n % 16;
            if (f32_scales) {
                ((float *)qs)[at] = s;
                ((float *)qo)[at] = o;
            } else {
                ((uint16_t *)qs)[at] = to_f16(s);
                ((uint16_t *)qo)[at] = to_f16(o);
                s = from_f16(to_f16(s));
                o = from_f16(to_f16(o));
            }
            for (int k = g * 32; k < g * 32 + 32; k++) {
                int q = randint(16), c = k % 8;
                w[(int64_t)n * K + k] = (double)s * q + o;
                int64_t byte = (((int64_t)(n / 16) * (K / 8) + k / 8) * 16 + n % 16) * 4 + c % 4;
                packed[byte] |= (uint8_t)(c < 4 ? q : q << 4);
            }
        }
    for (int i = 0; i < M * K; i++) x[i] = gauss();
    void *xb = activations(x, (int64_t)M * K, 0, seen);
    float *out = malloc(sizeof(float) * M * N);
    for (int m0 = 0; m0 < M; m0 += lv_max_rows()) {
        int rows = M - m0 < lv_max_rows() ? M - m0 : lv_max_rows();
        CHECK(lv_q4a8(packed, qs, qo, f32_scales, N, K, (float *)xb + (int64_t)m0 * K, K, 0, rows, out + (int64_t)m0 * N,
                      N, 0, 2, 0) == 0, "lv_q4a8");
    }
    check_product("q4a8", w, seen, N, K, M, out, 0);
    free(packed); free(qs); free(qo); free(w); free(x); free(seen); free(xb); free(out);
}

/* GGUF Q5_0 rows -> lv_q5_pack_gguf -> lv_q5a8 and lv_q5_unpack. */
static void test_q5(int N, int K, int M) {
    const int B = K / 32, N16 = (N + 15) / 16 * 16;
    uint8_t *raw = calloc((size_t)N * B * 22, 1), *packed = malloc((size_t)N16 / 16 * B * 352);
    double *w = malloc(sizeof(double) * N * K), *x = malloc(sizeof(double) * M * K), *seen = malloc(sizeof(double) * M * K);
    for (int n = 0; n < N; n++)
        for (int b = 0; b < B; b++) {
            uint8_t *blk = raw + ((int64_t)n * B + b) * 22;
            uint16_t d = to_f16((float)(uniform() * 0.02));
            uint32_t qh = 0;
            memcpy(blk, &d, 2);
            for (int i = 0; i < 32; i++) {
                int q = randint(32);
                w[(int64_t)n * K + b * 32 + i] = (double)from_f16(d) * (q - 16);
                if (q & 16) qh |= 1u << i;
                if (i < 16) blk[6 + i] |= (uint8_t)(q & 15);
                else blk[6 + i - 16] |= (uint8_t)((q & 15) << 4);
            }
            memcpy(blk + 2, &qh, 4);
        }
    CHECK(lv_q5_pack_gguf(raw, N, K, (int64_t)B * 22, packed, 2) == 0, "lv_q5_pack_gguf");
    for (int i = 0; i < M * K; i++) x[i] = gauss();
    void *xb = activations(x, (int64_t)M * K, 0, seen);
    float *out = malloc(sizeof(float) * M * N), *values = malloc(sizeof(float) * N * K);
    for (int m0 = 0; m0 < M; m0 += lv_max_rows()) {
        int rows = M - m0 < lv_max_rows() ? M - m0 : lv_max_rows();
        CHECK(lv_q5a8(packed, N, K, (float *)xb + (int64_t)m0 * K, K, 0, rows, out + (int64_t)m0 * N, N, 0, 2, 0) == 0,
              "lv_q5a8");
    }
    check_product("q5a8", w, seen, N, K, M, out, 0);
    CHECK(lv_q5_unpack(packed, N, K, 0, N, values, 0, 2) == 0, "lv_q5_unpack");
    int same = 1;
    for (int64_t i = 0; i < (int64_t)N * K; i++) same &= values[i] == (float)w[i];
    CHECK(same, "lv_q5_unpack N=%d K=%d: values differ from d * (q - 16)", N, K);
    free(raw); free(packed); free(w); free(x); free(seen); free(xb); free(out); free(values);
}

/* -- small ops ---------------------------------------------------------------------------------------- */

static void test_small_ops(int n, int bf16) {
    const int rows = 3;
    double x[3 * 2 * 320], seen[3 * 2 * 320], wt[320], wseen[320];
    for (int i = 0; i < rows * 2 * n; i++) x[i] = gauss() * 2;
    for (int i = 0; i < n; i++) wt[i] = 1 + gauss() * 0.1;
    void *xb = activations(x, (int64_t)rows * 2 * n, bf16, seen), *wb = activations(wt, n, bf16, wseen);
    void *out = malloc((size_t)rows * 2 * n * 4);
    const double tol = bf16 ? 1e-2 : 1e-5;
    CHECK(lv_rms_norm(xb, wb, out, rows, n, 1e-6f, bf16, 0) == 0, "lv_rms_norm");
    for (int r = 0; r < rows; r++) {
        double ss = 0;
        for (int i = 0; i < n; i++) ss += seen[r * n + i] * seen[r * n + i];
        double inv = 1 / sqrt(ss / n + 1e-6), worst = 0;
        for (int i = 0; i < n; i++) {
            double want = seen[r * n + i] * inv * wseen[i];
            worst = fmax(worst, fabs(out_value(out, bf16, r * n + i) - want) / (fabs(want) + 1e-3));
        }
        CHECK(worst < tol * 2, "rms_norm n=%d bf16=%d: relative error %.3g", n, bf16, worst);
    }
    CHECK(lv_silu_mul(xb, out, rows, n, bf16) == 0, "lv_silu_mul");
    double worst = 0;
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < n; i++) {
            double g = seen[r * 2 * n + i], u = seen[r * 2 * n + n + i], want = g / (1 + exp(-g)) * u;
            worst = fmax(worst, fabs(out_value(out, bf16, r * n + i) - want) / (fabs(want) + 1e-3));
        }
    CHECK(worst < tol * 2, "silu_mul n=%d bf16=%d: relative error %.3g", n, bf16, worst);
    /* rope: tokens = rows, heads = 2, dim = n / 2 (even), stride 2 * n between tokens */
    const int heads = 2, dim = n / 2, half = dim / 2;
    float cos_sin[3 * 320];
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < half; i++) {
            double angle = (t + 1) * pow(10000.0, -2.0 * i / dim);
            cos_sin[t * dim + i] = (float)cos(angle);
            cos_sin[t * dim + half + i] = (float)sin(angle);
        }
    CHECK(lv_rope(xb, out, cos_sin, rows, heads, dim, 2 * n, bf16) == 0, "lv_rope");
    worst = 0;
    for (int t = 0; t < rows; t++)
        for (int h = 0; h < heads; h++)
            for (int i = 0; i < half; i++) {
                double c = cos_sin[t * dim + i], s = cos_sin[t * dim + half + i];
                double x1 = seen[t * 2 * n + h * dim + i], x2 = seen[t * 2 * n + h * dim + half + i];
                double a = x1 * c - x2 * s, b = x2 * c + x1 * s;
                int64_t at = ((int64_t)t * heads + h) * dim;
                worst = fmax(worst, fabs(out_value(out, bf16, at + i) - a) / (fabs(a) + 1e-2));
                worst = fmax(worst, fabs(out_value(out, bf16, at + half + i) - b) / (fabs(b) + 1e-2));
            }
    CHECK(worst < tol * 2, "rope dim=%d bf16=%d: relative error %.3g", dim, bf16, worst);
    free(xb); free(wb); free(out);
}

/* -- int8 KV rows (quant/kv_int8.py's quantize, in float64 where it is exact) ------------------------- */

static void quantize_row8(const float *x, int D, int8_t *row) {
    for (int c = 0; c * 16 < D; c++) {
        double amax = 0; /* NaN in, NaN scale out (torch's amax), so a stray read of an unowned row shows */
        for (int i = c * 16; i < D && i < c * 16 + 16; i++) amax = isnan(x[i]) || isnan(amax) ? NAN : fmax(amax, fabs(x[i]));
        float step = (float)amax / 127.f;
        uint16_t half = to_f16(isnan(step) ? step : fminf(step, 65504.f));
        float scale = fmaxf(from_f16(half), 1.17549435e-38f);
        for (int i = c * 16; i < D && i < c * 16 + 16; i++)
            row[i] = (int8_t)fmaxf(-127.f, fminf(127.f, nearbyintf(x[i] / scale)));
        memcpy(row + D + 2 * c, &half, 2);
    }
}

static double row8_value(const int8_t *row, int D, int i) {
    uint16_t half;
    memcpy(&half, row + D + 2 * (i / 16), 2);
    return row[i] * (double)from_f16(half);
}

static void test_kv_store(int D, int dtype) {
    const int T = 7, KVH = 3, R = D + 2 * ((D + 15) / 16);
    float x[7 * 3 * 96], offset[3 * 96];
    for (int i = 0; i < T * KVH * D; i++) x[i] = (float)(gauss() * pow(10, randint(9) - 6));
    for (int i = 0; i < KVH * D; i++) offset[i] = (float)(gauss() * 50);
    uint16_t xh[7 * 3 * 96];
    for (int i = 0; i < T * KVH * D; i++) {
        if (dtype == KV_BF16) { xh[i] = to_bf16(x[i]); x[i] = from_bf16(xh[i]); }
        if (dtype == KV_F16) { xh[i] = to_f16(x[i]); x[i] = from_f16(xh[i]); }
    }
    int64_t slots[7] = {5, 0, 9, 3, 11, 1, 7};
    for (int with_offset = 0; with_offset < 2; with_offset++) {
        int8_t *cache = calloc((size_t)12 * KVH * R, 1), want[96 + 12];
        CHECK(lv_kv_int8_store(dtype == KV_F32 ? (void *)x : (void *)xh, dtype, (int64_t)KVH * D,
                               with_offset ? offset : NULL, cache, slots, T, KVH, D) == 0, "lv_kv_int8_store");
        int same = 1;
        for (int t = 0; t < T; t++)
            for (int h = 0; h < KVH; h++) {
                float v[96];
                for (int i = 0; i < D; i++) v[i] = x[(t * KVH + h) * D + i] - (with_offset ? offset[h * D + i] : 0.f);
                quantize_row8(v, D, want);
                same &= memcmp(cache + (slots[t] * KVH + h) * R, want, (size_t)R) == 0;
            }
        CHECK(same, "kv_int8_store D=%d dtype=%d offset=%d: bytes differ from quantize", D, dtype, with_offset);
        free(cache);
    }
}

/* -- paged attention --------------------------------------------------------------------------------- */

typedef struct { int B; const int *seq, *qlen; int H, KVH, D, bs, window, shared; } AttnCase;

static void test_attention(AttnCase c, int kv, int qdtype) {
    const int H = c.H, KVH = c.KVH, D = c.D, bs = c.bs, G = H / KVH;
    const int R = kv == KV_I8 ? D + 2 * ((D + 15) / 16) : D, size = kv == KV_F32 ? 4 : kv == KV_I8 ? 1 : 2;
    int counts[8], width = 1, total_blocks = c.shared + 3, rows = 0, cu[9] = {0};
    for (int b = 0; b < c.B; b++) {
        counts[b] = (c.seq[b] + bs - 1) / bs;
        width = counts[b] > width ? counts[b] : width;
        total_blocks += counts[b] > c.shared ? counts[b] - c.shared : 0;
        rows += c.qlen[b];
        cu[b + 1] = rows;
    }
    int *perm = malloc(sizeof(int) * total_blocks), *tables = malloc(sizeof(int) * c.B * width);
    for (int i = 0; i < total_blocks; i++) perm[i] = i;
    for (int i = total_blocks - 1; i > 0; i--) { int j = randint(i + 1), t = perm[i]; perm[i] = perm[j]; perm[j] = t; }
    int next = c.shared;
    for (int b = 0; b < c.B; b++)
        for (int i = 0; i < width; i++)
            tables[b * width + i] = i < counts[b] ? (i < c.shared ? perm[i] : perm[next++]) : total_blocks + 99;
    const int64_t slots = (int64_t)total_blocks * bs;
    double *keys = malloc(sizeof(double) * slots * KVH * D), *vals = malloc(sizeof(double) * slots * KVH * D);
    char *kc = malloc((size_t)slots * KVH * R * size), *vc = malloc((size_t)slots * KVH * R * size);
    for (int64_t s = 0; s < slots; s++) /* unowned slots: NaN (int8: a NaN scale), so a stray read shows */
        for (int h = 0; h < KVH; h++) {
            float k[512], v[512];
            for (int i = 0; i < D; i++) k[i] = v[i] = NAN;
            int owned = 0;
            for (int b = 0; b < c.B && !owned; b++)
                for (int p = 0; p < c.seq[b] && !owned; p++)
                    owned = (int64_t)tables[b * width + p / bs] * bs + p % bs == s;
            if (owned)
                for (int i = 0; i < D; i++) k[i] = (float)gauss(), v[i] = (float)gauss();
            for (int i = 0; i < D; i++) {
                int64_t at = (s * KVH + h) * (int64_t)R + i;
                if (kv == KV_F32) { ((float *)kc)[at] = k[i]; ((float *)vc)[at] = v[i]; }
                if (kv == KV_BF16) { ((uint16_t *)kc)[at] = to_bf16(k[i]); ((uint16_t *)vc)[at] = to_bf16(v[i]); }
                if (kv == KV_F16) { ((uint16_t *)kc)[at] = to_f16(k[i]); ((uint16_t *)vc)[at] = to_f16(v[i]); }
            }
            if (kv == KV_I8) {
                quantize_row8(k, D, (int8_t *)kc + (s * KVH + h) * R);
                quantize_row8(v, D, (int8_t *)vc + (s * KVH + h) * R);
            }
            for (int i = 0; i < D; i++) { /* the values the kernel reads */
                int64_t at = (s * KVH + h) * (int64_t)R + i, to = (s * KVH + h) * (int64_t)D + i;
                if (kv == KV_F32) { keys[to] = ((float *)kc)[at]; vals[to] = ((float *)vc)[at]; }
                if (kv == KV_BF16) { keys[to] = from_bf16(((uint16_t *)kc)[at]); vals[to] = from_bf16(((uint16_t *)vc)[at]); }
                if (kv == KV_F16) { keys[to] = from_f16(((uint16_t *)kc)[at]); vals[to] = from_f16(((uint16_t *)vc)[at]); }
                if (kv == KV_I8) {
                    keys[to] = row8_value((int8_t *)kc + (s * KVH + h) * R, D, i);
                    vals[to] = row8_value((int8_t *)vc + (s * KVH + h) * R, D, i);
                }
            }
        }
    double *qd = malloc(sizeof(double) * rows * H * D), *qseen = malloc(sizeof(double) * rows * H * D);
    for (int i = 0; i < rows * H * D; i++) qd[i] = gauss();
    void *q = activations(qd, (int64_t)rows * H * D, qdtype == KV_BF16, qseen);
    void *out = malloc((size_t)rows * H * D * 4);
    const float scale = 1.f / sqrtf((float)D);
    const double tol = qdtype == KV_BF16 || kv == KV_BF16 ? 1e-2 : kv == KV_F16 ? 2e-3 : 2e-5;
    double *want = malloc(sizeof(double) * rows * H * D); /* the definition, per sequence, row and head */
    for (int b = 0; b < c.B; b++)
        for (int r = 0; r < c.qlen[b]; r++) {
            const int pos = c.seq[b] - c.qlen[b] + r, row = cu[b] + r;
            for (int h = 0; h < H; h++) {
                double m = -INFINITY, l = 0, acc[512] = {0}, sc[4096];
                for (int j = 0; j <= pos; j++) {
                    sc[j] = -INFINITY;
                    if (c.window > 0 && pos - j >= c.window) continue;
                    int64_t s = (int64_t)tables[b * width + j / bs] * bs + j % bs;
                    double dot = 0;
                    for (int i = 0; i < D; i++) dot += qseen[((int64_t)row * H + h) * D + i] * keys[(s * KVH + h / G) * D + i];
                    sc[j] = dot * scale;
                    m = fmax(m, sc[j]);
                }
                for (int j = 0; j <= pos; j++) {
                    if (sc[j] == -INFINITY) continue;
                    int64_t s = (int64_t)tables[b * width + j / bs] * bs + j % bs;
                    double p = exp(sc[j] - m);
                    l += p;
                    for (int i = 0; i < D; i++) acc[i] += p * vals[(s * KVH + h / G) * D + i];
                }
                for (int i = 0; i < D; i++) want[((int64_t)row * H + h) * D + i] = l > 0 ? acc[i] / l : 0;
            }
        }
    for (int threads = 1; threads <= 2; threads++) {
        CHECK(lv_paged_attention(q, kc, vc, out, tables, width, cu, c.seq, c.B, H, KVH, D, bs, c.window, scale, qdtype,
                                 kv, threads) == 0, "lv_paged_attention");
        int bad = 0;
        for (int64_t i = 0; i < (int64_t)rows * H * D; i++) {
            double got = out_value(out, qdtype == KV_BF16, i);
            if (!(fabs(got - want[i]) <= tol + tol * fabs(want[i])) && bad++ < 3)
                printf("  attention: value %lld: got %.6g want %.6g\n", (long long)i, got, want[i]);
        }
        CHECK(bad == 0, "attention H=%d KVH=%d D=%d bs=%d window=%d kv=%d q=%d threads=%d: %d values off", H, KVH, D, bs,
              c.window, kv, qdtype, threads, bad);
    }
    free(want);
    free(perm); free(tables); free(keys); free(vals); free(kc); free(vc); free(qd); free(qseen); free(q); free(out);
}

/* -- the one-call decode step against a float64 forward ------------------------------------------------- */

typedef struct { int kind; int N, K; double *w; uint8_t *packed; float *scale; void *qs, *qo; } Lin;

static Lin make_linear(int kind, int N, int K) {
    Lin l = {kind, N, K, malloc(sizeof(double) * N * K), NULL, NULL, NULL, NULL};
    const int N16 = (N + 15) / 16 * 16;
    if (kind == LIN_W8) {
        int8_t *codes = malloc((size_t)N * K);
        l.scale = malloc(sizeof(float) * N);
        for (int n = 0; n < N; n++) {
            l.scale[n] = (float)((0.8 + 0.4 * uniform()) / (73.0 * sqrt(K))); /* outputs of order one */
            for (int k = 0; k < K; k++) {
                codes[n * K + k] = (int8_t)(randint(255) - 127);
                l.w[n * K + k] = codes[n * K + k] * (double)l.scale[n];
            }
        }
        l.packed = malloc((size_t)N16 * K);
        lv_w8_pack(codes, N, K, K, l.packed, 1);
        free(codes);
    } else if (kind == LIN_Q4) {
        const int G = K / 32;
        l.packed = calloc((size_t)N16 * K / 2, 1);
        l.qs = calloc((size_t)N16 * G, 4);
        l.qo = calloc((size_t)N16 * G, 4);
        for (int n = 0; n < N; n++)
            for (int g = 0; g < G; g++) {
                float s = (float)((0.8 + 0.4 * uniform()) / (4.6 * sqrt(K))), o = -7.5f * s;
                int64_t at = ((int64_t)(n / 16) * G + g) * 16 + n % 16;
                ((float *)l.qs)[at] = s;
                ((float *)l.qo)[at] = o;
                for (int k = g * 32; k < g * 32 + 32; k++) {
                    int q = randint(16), c = k % 8;
                    l.w[n * K + k] = (double)s * q + o;
                    l.packed[(((int64_t)(n / 16) * (K / 8) + k / 8) * 16 + n % 16) * 4 + c % 4] |= (uint8_t)(c < 4 ? q : q << 4);
                }
            }
    } else {
        const int B = K / 32;
        uint8_t *raw = calloc((size_t)N * B * 22, 1);
        for (int n = 0; n < N; n++)
            for (int b = 0; b < B; b++) {
                uint8_t *blk = raw + ((int64_t)n * B + b) * 22;
                uint16_t d = to_f16((float)((0.8 + 0.4 * uniform()) / (9.2 * sqrt(K))));
                uint32_t qh = 0;
                memcpy(blk, &d, 2);
                for (int i = 0; i < 32; i++) {
                    int q = randint(32);
                    l.w[n * K + b * 32 + i] = (double)from_f16(d) * (q - 16);
                    if (q & 16) qh |= 1u << i;
                    blk[6 + i % 16] |= (uint8_t)(i < 16 ? q & 15 : (q & 15) << 4);
                }
                memcpy(blk + 2, &qh, 4);
            }
        l.packed = malloc((size_t)N16 / 16 * B * 352);
        lv_q5_pack_gguf(raw, N, K, (int64_t)B * 22, l.packed, 1);
        free(raw);
    }
    return l;
}

static DecodeLinear describe(const Lin *l) {
    DecodeLinear d = {l->kind, 1, l->packed, l->scale, l->qs, l->qo, NULL, l->N, l->K, l->K};
    return d;
}

static void matvec(const Lin *l, const double *x, double *y) {
    for (int n = 0; n < l->N; n++) {
        double s = 0;
        for (int k = 0; k < l->K; k++) s += l->w[n * l->K + k] * x[k];
        y[n] = s;
    }
}

static void rms(const double *x, int n, double *y) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    for (int i = 0; i < n; i++) y[i] = x[i] / sqrt(ss / n + 1e-6); /* norm weights are 1 */
}

static void test_decode_step(void) {
    enum { HID = 128, HEADS = 4, KVH = 2, HD = 32, INTER = 96, BLOCKS = 2, STEPS = 20, BS = 8 };
    Lin qkv[BLOCKS], o[BLOCKS], gate_up[BLOCKS], down[BLOCKS];
    DecodeBlock blocks[BLOCKS];
    float ones[HID], cos_sin[STEPS * HD];
    for (int i = 0; i < HID; i++) ones[i] = 1.f;
    for (int t = 0; t < STEPS; t++)
        for (int i = 0; i < HD / 2; i++) {
            double angle = t * pow(10000.0, -2.0 * i / HD);
            cos_sin[t * HD + i] = (float)cos(angle);
            cos_sin[t * HD + HD / 2 + i] = (float)sin(angle);
        }
    const int slots = 4 * BS, table[4] = {2, 0, 3, 1};
    float *k_cache = calloc((size_t)BLOCKS * slots * KVH * HD, 4), *v_cache = calloc((size_t)BLOCKS * slots * KVH * HD, 4);
    for (int i = 0; i < BLOCKS; i++) {
        qkv[i] = make_linear(LIN_W8, (HEADS + 2 * KVH) * HD, HID);
        o[i] = make_linear(LIN_Q5, HID, HEADS * HD);
        gate_up[i] = make_linear(LIN_Q4, 2 * INTER, HID);
        down[i] = make_linear(LIN_W8, HID, INTER);
        DecodeBlock b = {ones, ones, NULL, NULL, 1e-6f, 0.f, describe(&qkv[i]), describe(&o[i]), describe(&gate_up[i]),
                         describe(&down[i]), k_cache + (int64_t)i * slots * KVH * HD,
                         v_cache + (int64_t)i * slots * KVH * HD, cos_sin, 0, 1.f / sqrtf(HD), 0, NULL};
        blocks[i] = b;
    }
    double *kref = calloc((size_t)BLOCKS * STEPS * KVH * HD, 8), *vref = calloc((size_t)BLOCKS * STEPS * KVH * HD, 8);
    float *scratch = malloc(sizeof(float) * lv_decode_scratch(HID, HEADS, KVH, HD, INTER));
    double worst = 0;
    for (int pos = 0; pos < STEPS; pos++) {
        double h[HID], normed[HID], proj[(HEADS + 2 * KVH) * HD], attn[HEADS * HD], delta[HID], gu[2 * INTER], act[INTER];
        float hidden[HID];
        for (int i = 0; i < HID; i++) hidden[i] = (float)(h[i] = gauss());
        const int slot = table[pos / BS] * BS + pos % BS;
        CHECK(lv_decode_blocks(blocks, BLOCKS, hidden, HID, HEADS, KVH, HD, INTER, 0, pos, slot, table, 4, BS, scratch,
                               2) == 0, "lv_decode_blocks");
        for (int i = 0; i < BLOCKS; i++) {
            rms(h, HID, normed);
            matvec(&qkv[i], normed, proj);
            const float *cs = cos_sin + pos * HD;
            for (int hd = 0; hd < HEADS + KVH; hd++) /* rope on q and k */
                for (int j = 0; j < HD / 2; j++) {
                    double *x = proj + hd * HD, x1 = x[j], x2 = x[HD / 2 + j];
                    x[j] = x1 * cs[j] - x2 * cs[HD / 2 + j];
                    x[HD / 2 + j] = x2 * cs[j] + x1 * cs[HD / 2 + j];
                }
            for (int j = 0; j < KVH * HD; j++) {
                kref[((int64_t)i * STEPS + pos) * KVH * HD + j] = proj[HEADS * HD + j];
                vref[((int64_t)i * STEPS + pos) * KVH * HD + j] = proj[(HEADS + KVH) * HD + j];
            }
            for (int hd = 0; hd < HEADS; hd++) {
                double sc[STEPS], m = -INFINITY, l = 0;
                const int kvh = hd / (HEADS / KVH);
                for (int j = 0; j <= pos; j++) {
                    double dot = 0;
                    for (int d = 0; d < HD; d++) dot += proj[hd * HD + d] * kref[((int64_t)i * STEPS + j) * KVH * HD + kvh * HD + d];
                    sc[j] = dot / sqrt(HD);
                    m = fmax(m, sc[j]);
                }
                for (int d = 0; d < HD; d++) attn[hd * HD + d] = 0;
                for (int j = 0; j <= pos; j++) {
                    double p = exp(sc[j] - m);
                    l += p;
                    for (int d = 0; d < HD; d++) attn[hd * HD + d] += p * vref[((int64_t)i * STEPS + j) * KVH * HD + kvh * HD + d];
                }
                for (int d = 0; d < HD; d++) attn[hd * HD + d] /= l;
            }
            matvec(&o[i], attn, delta);
            for (int j = 0; j < HID; j++) h[j] += delta[j];
            rms(h, HID, normed);
            matvec(&gate_up[i], normed, gu);
            for (int j = 0; j < INTER; j++) act[j] = gu[j] / (1 + exp(-gu[j])) * gu[INTER + j];
            matvec(&down[i], act, delta);
            for (int j = 0; j < HID; j++) h[j] += delta[j];
        }
        double err2 = 0, norm2 = 0;
        for (int j = 0; j < HID; j++) {
            err2 += (hidden[j] - h[j]) * (hidden[j] - h[j]);
            norm2 += h[j] * h[j];
        }
        worst = fmax(worst, sqrt(err2 / norm2));
    }
    /* int8 activations at every product (~0.5% each), through two blocks */
    CHECK(worst < 0.02, "decode step: relative error %.4g against the float64 forward", worst);
    printf("decode step: worst relative error %.4g over %d steps\n", worst, STEPS);
}

/* -- digests: the bits of fixed cases, which every variant should share -------------------------------- */

static uint64_t fnv(const void *p, size_t n, uint64_t h) {
    for (size_t i = 0; i < n; i++) h = (h ^ ((const uint8_t *)p)[i]) * 0x100000001B3ull;
    return h;
}

static void digests(void) {
    seed(7);
    enum { N = 70, K = 160, M = 6 };
    int8_t codes[N * K];
    float scale[N], x[M * K], out[M * N * 2];
    uint16_t xh[M * K];
    for (int i = 0; i < N * K; i++) codes[i] = (int8_t)(randint(255) - 127);
    for (int n = 0; n < N; n++) scale[n] = (float)(0.01 + 0.01 * uniform());
    for (int i = 0; i < M * K; i++) xh[i] = to_bf16(x[i] = (float)gauss());
    uint8_t tiles[80 * K], q4[80 * K / 2] = {0}, raw[N * (K / 32) * 22] = {0}, q5[5 * (K / 32) * 352];
    float qs[5 * (K / 32) * 16], qo[5 * (K / 32) * 16];
    lv_w8_pack(codes, N, K, K, tiles, 1);
    for (int i = 0; i < 80 * K / 2; i++) q4[i] = (uint8_t)randint(256);
    for (int i = 0; i < 5 * (K / 32) * 16; i++) qs[i] = (float)uniform() * 0.1f, qo[i] = (float)gauss() * 0.1f;
    for (int i = 0; i < N * (K / 32); i++) {
        uint16_t d = to_f16((float)(uniform() * 0.02));
        memcpy(raw + i * 22, &d, 2);
        for (int j = 2; j < 22; j++) raw[i * 22 + j] = (uint8_t)randint(256);
    }
    lv_q5_pack_gguf(raw, N, K, (K / 32) * 22, q5, 1);
    for (int bf16 = 0; bf16 < 2; bf16++) {
        const void *xs = bf16 ? (const void *)xh : (const void *)x;
        const size_t size = (size_t)M * N * (bf16 ? 2 : 4);
        lv_w8a8(tiles, scale, N, K, K, xs, K, bf16, M, out, N, bf16, 2);
        printf("digest w8a8/%d %016llx\n", bf16, (unsigned long long)fnv(out, size, 14695981039346656037ull));
        lv_w8a16(tiles, scale, N, K, K, xs, K, bf16, 3, out, N, bf16, 2);
        printf("digest w8a16/%d %016llx\n", bf16, (unsigned long long)fnv(out, size / 2, 14695981039346656037ull));
        lv_q4a8(q4, qs, qo, 1, N, K, xs, K, bf16, M, out, N, bf16, 2, 0);
        printf("digest q4a8/%d %016llx\n", bf16, (unsigned long long)fnv(out, size, 14695981039346656037ull));
        lv_q5a8(q5, N, K, xs, K, bf16, M, out, N, bf16, 2, 0);
        printf("digest q5a8/%d %016llx\n", bf16, (unsigned long long)fnv(out, size, 14695981039346656037ull));
        lv_rms_norm(xs, xs, out, M, K, 1e-6f, bf16, 0);
        printf("digest rms_norm/%d %016llx\n", bf16, (unsigned long long)fnv(out, (size_t)M * K * (bf16 ? 2 : 4), 14695981039346656037ull));
        lv_silu_mul(xs, out, M, K / 2, bf16);
        printf("digest silu_mul/%d %016llx\n", bf16, (unsigned long long)fnv(out, (size_t)M * K / 2 * (bf16 ? 2 : 4), 14695981039346656037ull));
        lv_rope(xs, out, x, 3, 2, K / 2, K, bf16);
        printf("digest rope/%d %016llx\n", bf16, (unsigned long long)fnv(out, (size_t)3 * K * (bf16 ? 2 : 4), 14695981039346656037ull));
    }
}

int main(int argc, char **argv) {
    printf("variant %s (build %s), %d rows per call\n", lv_variant(), lv_build_id(), lv_max_rows());
    if (argc > 1 && strcmp(argv[1], "digest") == 0) {
        digests();
        return 0;
    }
    seed(1);
    const int shapes8[][2] = {{16, 32}, {37, 50}, {100, 96}, {272, 896}, {40, 4864}};
    const int rows8[] = {1, 2, 3, 5, 8, 11};
    for (int s = 0; s < 5; s++)
        for (int r = 0; r < 6; r++)
            for (int bf16 = 0; bf16 < 2; bf16++) test_int8(shapes8[s][0], shapes8[s][1], rows8[r], bf16);
    const int shapes4[][2] = {{16, 32}, {40, 96}, {144, 896}, {24, 4864}}, rows4[] = {1, 3, 8, 10};
    for (int s = 0; s < 4; s++)
        for (int r = 0; r < 4; r++)
            for (int f32 = 0; f32 < 2; f32++) test_int4(shapes4[s][0], shapes4[s][1], rows4[r], f32);
    const int shapes5[][2] = {{16, 32}, {37, 96}, {272, 896}}, rows5[] = {1, 4, 8, 11};
    for (int s = 0; s < 3; s++)
        for (int r = 0; r < 4; r++) test_q5(shapes5[s][0], shapes5[s][1], rows5[r]);
    const int sizes[] = {16, 40, 128, 320};
    for (int s = 0; s < 4; s++)
        for (int bf16 = 0; bf16 < 2; bf16++) test_small_ops(sizes[s], bf16);
    const int dims[] = {40, 64, 96};
    for (int d = 0; d < 3; d++) {
        test_kv_store(dims[d], KV_F32);
        test_kv_store(dims[d], KV_BF16);
        test_kv_store(dims[d], KV_F16);
    }
    const int seq1[] = {1, 15, 16, 17}, q1[] = {1, 1, 1, 1};
    const int seq2[] = {700, 33, 300}, q2[] = {1, 1, 20};
    const int seq3[] = {1000, 40, 520}, q3[] = {1, 40, 9};
    const int seq4[] = {700, 650, 333, 900}, q4[] = {1, 1, 20, 1};
    const int seq5[] = {300, 1200, 7, 0, 64}, q5[] = {300, 100, 1, 0, 1};
    AttnCase cases[] = {
        {4, seq1, q1, 14, 2, 64, 16, 0, 0},   /* inside one tile, one past it */
        {3, seq2, q2, 8, 2, 64, 5, 0, 0},     /* blocks across tiles, a prefill chunk */
        {3, seq2, q2, 6, 1, 80, 16, 0, 0},    /* a head size with a partial tail */
        {3, seq2, q2, 4, 4, 128, 32, 0, 0},   /* no grouping */
        {3, seq3, q3, 14, 2, 64, 8, 7, 0},    /* a window inside a tile */
        {3, seq3, q3, 14, 2, 64, 8, 300, 0},  /* a window across ranges */
        {4, seq4, q4, 14, 2, 64, 16, 50, 20}, /* prefix-cache sharing */
        {5, seq5, q5, 8, 2, 64, 16, 0, 0},    /* a prompt, a chunk, decode rows, an empty sequence */
    };
    for (int c = 0; c < 8; c++) test_attention(cases[c], KV_F32, KV_F32);
    test_attention(cases[0], KV_BF16, KV_BF16);
    test_attention(cases[2], KV_BF16, KV_BF16);
    test_attention(cases[6], KV_BF16, KV_BF16);
    test_attention(cases[1], KV_F16, KV_F32);
    test_attention(cases[6], KV_I8, KV_F32);
    test_attention(cases[4], KV_I8, KV_BF16);
    test_attention(cases[2], KV_I8, KV_F32);
    test_decode_step();
    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
