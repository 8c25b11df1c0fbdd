/* Paged attention over the KV cache on the CPU, NEON (included by neon.c, whose threads it uses).
 *
 * The interface and the division of work of the other variants (avx512_attention.c): items of
 * (sequence, KV head, a few query rows, a range of keys), flash-decoding ranges merged at the end,
 * an online softmax in float32 per query vector. Keys go 16 at a time, converted to float32 as
 * they are read (bfloat16: shifted; float16: fcvtl; int8 rows: codes times their float16 scale per
 * 16); a score is a dot product of 4-lane FMAs and one horizontal add (faddp). Float sums run in
 * another order than the AVX-512 variant's.
 */

#define ATTN_MAX_D 512
#define ATTN_MIN_SPLIT 256
#define ATTN_QVECS 32
#ifndef ATTN_PREFETCH
#define ATTN_PREFETCH 64
#endif

/* n <= D values of a row at p[i] (dtype KV_*; not int8) -> float32 dst[0 .. Dp), zeros past n. */
static inline void row_to_f32(const void *p, int dtype, int64_t i, int n, int Dp, float *dst) {
    int c = 0;
    for (; c + 4 <= n; c += 4) {
        float32x4_t v = dtype == KV_F16 ? vcvt_f32_f16(vld1_f16((const float16_t *)p + i + c))
                                        : load4(p, dtype == KV_BF16, i + c);
        vst1q_f32(dst + c, v);
    }
    for (; c < n; c++) {
        const uint16_t *h = (const uint16_t *)p + i + c;
        __fp16 half;
        memcpy(&half, h, 2);
        dst[c] = dtype == KV_F16 ? (float)half : dtype == KV_BF16 ? bf16_value(*h) : ((const float *)p)[i + c];
    }
    for (; c < Dp; c++) dst[c] = 0.f;
}

static inline float f16_at(const int8_t *p) {
    __fp16 half;
    memcpy(&half, p, 2);
    return (float)half;
}

/* An int8 row (D codes, then a float16 scale per 16 of them) -> float32 dst[0 .. Dp). */
static inline void i8_row_to_f32(const int8_t *row, int D, int Dp, float *dst) {
    int c = 0;
    for (; c + 8 <= D; c += 8) {
        const float scale = f16_at(row + D + 2 * (c / 16));
        int16x8_t w = vmovl_s8(vld1_s8(row + c));
        vst1q_f32(dst + c, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))), scale));
        vst1q_f32(dst + c + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(w))), scale));
    }
    for (; c < D; c++) dst[c] = (float)row[c] * f16_at(row + D + 2 * (c / 16));
    for (; c < Dp; c++) dst[c] = 0.f;
}

static inline void store_out(void *p, int dtype, int64_t i, const float *v, int n) {
    for (int c = 0; c < n; c++) {
        if (dtype == KV_F16) {
            __fp16 half = (__fp16)v[c];
            memcpy((uint16_t *)p + i + c, &half, 2);
        } else if (dtype == KV_BF16) {
            ((uint16_t *)p)[i + c] = bf16_round(v[c]);
        } else {
            ((float *)p)[i + c] = v[c];
        }
    }
}

typedef struct { int32_t b, kvh, row0, rows; int64_t k0, k1; } AttnItem;

typedef struct {
    const void *q, *k, *v;
    void *out;
    const int32_t *tables, *cu, *lens;
    int64_t width;
    int H, KVH, D, Dp, G, bs, window, dtype; /* Dp: D rounded up to 4 */
    int kv;
    int row;
    int size;
    float scale;
    const AttnItem *items;
    float *partial;
    int64_t per_item;
} Attn;

static inline __attribute__((always_inline)) void prefetch_row(const Attn *a, const int32_t *table, int64_t ahead,
                                                               int64_t end, int64_t row_stride, int64_t head_at) {
    if (ahead >= end) return;
    const int64_t at = (((int64_t)table[ahead / a->bs] * a->bs + ahead % a->bs) * row_stride + head_at) * a->size;
    for (int64_t byte = 0; byte < (int64_t)a->row * a->size; byte += 64) {
        __builtin_prefetch((const char *)a->k + at + byte, 0, 2);
        __builtin_prefetch((const char *)a->v + at + byte, 0, 2);
    }
}

static inline __attribute__((always_inline)) void attn_item_c(const Attn *a, int64_t index, const int C) {
    const AttnItem *it = a->items + index;
    const int D = a->D, Dp = C * 4, G = a->G;
    float *part = a->partial + index * a->per_item;
    const int64_t q_len = a->cu[it->b + 1] - a->cu[it->b], n = a->lens[it->b];
    const int64_t first_row = a->cu[it->b] + it->row0, first_pos = n - q_len + it->row0;
    float *qf = part + it->rows * G * (2 + Dp);
    for (int r = 0; r < it->rows; r++)
        for (int g = 0; g < G; g++) {
            float *qv = part + (r * G + g) * (2 + Dp), *dst = qf + (r * G + g) * Dp;
            qv[0] = -INFINITY;
            qv[1] = 0.f;
            memset(qv + 2, 0, sizeof(float) * Dp);
            row_to_f32(a->q, a->dtype, ((first_row + r) * a->H + it->kvh * G + g) * (int64_t)D, D, Dp, dst);
            for (int c = 0; c < C; c++) vst1q_f32(dst + c * 4, vmulq_n_f32(vld1q_f32(dst + c * 4), a->scale));
        }
    float kf[16 * Dp] __attribute__((aligned(16))), vf[16 * Dp] __attribute__((aligned(16)));
    const int32_t *table = a->tables + it->b * a->width;
    const int64_t row_stride = (int64_t)a->KVH * a->row, head_at = (int64_t)it->kvh * a->row;
    for (int64_t t0 = it->k0; t0 < it->k1; t0 += 16) {
        const int nk = (int)(it->k1 - t0 < 16 ? it->k1 - t0 : 16);
        int64_t block = t0 / a->bs, offset = t0 % a->bs;
        for (int j = 0; j < nk; j++) {
            const int64_t at = ((int64_t)table[block] * a->bs + offset) * row_stride + head_at;
            if (++offset == a->bs) offset = 0, block++;
            prefetch_row(a, table, t0 + ATTN_PREFETCH + j, it->k1, row_stride, head_at);
            if (a->kv == KV_I8) {
                i8_row_to_f32((const int8_t *)a->k + at, D, Dp, kf + j * Dp);
                i8_row_to_f32((const int8_t *)a->v + at, D, Dp, vf + j * Dp);
            } else {
                row_to_f32(a->k, a->kv, at, D, Dp, kf + j * Dp);
                row_to_f32(a->v, a->kv, at, D, Dp, vf + j * Dp);
            }
        }
        for (int r = 0; r < it->rows; r++) {
            const int64_t pos = first_pos + r;
            const int64_t lo = a->window > 0 && pos - a->window + 1 > 0 ? pos - a->window + 1 : 0;
            int64_t from = lo - t0, to = pos + 1 - t0;
            if (from < 0) from = 0;
            if (to > nk) to = nk;
            if (from >= to) continue;
            for (int g = 0; g < G; g++) {
                const float *q = qf + (r * G + g) * Dp;
                float s[16];
                float m_tile = -INFINITY;
                for (int j = (int)from; j < (int)to; j++) {
                    float32x4_t d0 = vdupq_n_f32(0.f), d1 = vdupq_n_f32(0.f);
                    int c = 0;
                    for (; c + 1 < C; c += 2) {
                        d0 = vfmaq_f32(d0, vld1q_f32(q + c * 4), vld1q_f32(kf + j * Dp + c * 4));
                        d1 = vfmaq_f32(d1, vld1q_f32(q + c * 4 + 4), vld1q_f32(kf + j * Dp + c * 4 + 4));
                    }
                    if (c < C) d0 = vfmaq_f32(d0, vld1q_f32(q + c * 4), vld1q_f32(kf + j * Dp + c * 4));
                    s[j] = vaddvq_f32(vaddq_f32(d0, d1));
                    m_tile = fmaxf(m_tile, s[j]);
                }
                float *qv = part + (r * G + g) * (2 + Dp), *acc = qv + 2;
                if (m_tile > qv[0]) {
                    const float alpha = expf(qv[0] - m_tile);
                    qv[1] *= alpha;
                    for (int c = 0; c < C; c++) vst1q_f32(acc + c * 4, vmulq_n_f32(vld1q_f32(acc + c * 4), alpha));
                    qv[0] = m_tile;
                }
                float p[16] __attribute__((aligned(16))) = {0};
                for (int j = (int)from; j < (int)to; j++) p[j] = s[j] - qv[0];
                float sum = 0.f;
                for (int j4 = 0; j4 < 16; j4 += 4) {
                    float32x4_t e = exp128(vld1q_f32(p + j4));
                    vst1q_f32(p + j4, e);
                }
                for (int j = (int)from; j < (int)to; j++) sum += p[j];
                qv[1] += sum;
                for (int c = 0; c < C; c++) {
                    float32x4_t ar = vld1q_f32(acc + c * 4);
                    for (int j = (int)from; j < (int)to; j++) ar = vfmaq_n_f32(ar, vld1q_f32(vf + j * Dp + c * 4), p[j]);
                    vst1q_f32(acc + c * 4, ar);
                }
            }
        }
    }
}

static void attn_item(const void *ctx, int64_t index) {
    const Attn *a = ctx;
    switch (a->Dp / 4) {
    case 16: attn_item_c(a, index, 16); break;
    case 32: attn_item_c(a, index, 32); break;
    default: attn_item_c(a, index, a->Dp / 4);
    }
}

static void attn_merge(const Attn *a, int64_t first, int64_t count) {
    const AttnItem *it = a->items + first;
    const int D = a->D, Dp = a->Dp, C = Dp / 4, G = a->G;
    const int64_t first_row = a->cu[it->b] + it->row0;
    for (int v = 0; v < it->rows * G; v++) {
        float m = -INFINITY, l = 0.f;
        for (int64_t i = 0; i < count; i++) {
            const float *qv = a->partial + (first + i) * a->per_item + v * (2 + Dp);
            if (qv[0] > m) m = qv[0];
        }
        float row[ATTN_MAX_D] = {0};
        for (int64_t i = 0; i < count && m > -INFINITY; i++) {
            const float *qv = a->partial + (first + i) * a->per_item + v * (2 + Dp);
            if (qv[1] == 0.f) continue;
            const float w = expf(qv[0] - m);
            l += w * qv[1];
            for (int c = 0; c < C; c++)
                vst1q_f32(row + c * 4, vfmaq_n_f32(vld1q_f32(row + c * 4), vld1q_f32(qv + 2 + c * 4), w));
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
        for (int c = 0; c < C; c++) vst1q_f32(row + c * 4, vmulq_n_f32(vld1q_f32(row + c * 4), inv));
        const int r = v / G, g = v % G;
        store_out(a->out, a->dtype, ((first_row + r) * a->H + it->kvh * G + g) * (int64_t)D, row, D);
    }
}

static void attn_span(const Attn *a, int b, int row0, int rows, int64_t *lo, int64_t *hi) {
    const int64_t q_len = a->cu[b + 1] - a->cu[b], first = a->lens[b] - q_len + row0;
    *hi = first + rows;
    *lo = a->window > 0 && first - a->window + 1 > 0 ? first - a->window + 1 : 0;
}

int lv_paged_attention(const void *q, const void *k_cache, const void *v_cache, void *out, const int32_t *tables,
                       int64_t width, const int32_t *cu, const int32_t *lens, int B, int H, int KVH, int D,
                       int block_size, int window, float scale, int dtype, int kv, int nthreads) {
    if (D < 1 || D > ATTN_MAX_D || KVH < 1 || H % KVH || block_size < 1 || dtype == KV_I8) return -1;
    Attn a = {q, k_cache, v_cache, out, tables, cu, lens, width, H, KVH, D, (D + 3) / 4 * 4, H / KVH,
              block_size, window, dtype, kv, kv == KV_I8 ? D + 2 * ((D + 15) / 16) : D,
              kv == KV_F32 ? 4 : kv == KV_I8 ? 1 : 2, scale, NULL, NULL, 0};
    const int rows_per_item = ATTN_QVECS / a.G > 1 ? ATTN_QVECS / a.G : 1;
    int64_t keys = 0, groups = 0;
    for (int b = 0; b < B; b++)
        for (int r = 0; r < cu[b + 1] - cu[b]; r += rows_per_item) {
            int64_t lo, hi;
            attn_span(&a, b, r, rows_per_item < cu[b + 1] - cu[b] - r ? rows_per_item : cu[b + 1] - cu[b] - r, &lo, &hi);
            keys += hi - lo;
            groups++;
        }
    if (!groups) return 0;
    int64_t split = nthreads > 1 ? keys * KVH / (4 * nthreads) : keys;
    split = (split < ATTN_MIN_SPLIT ? ATTN_MIN_SPLIT : split + 15) / 16 * 16;
    int64_t count = 0;
    for (int pass = 0; pass < 2; pass++) {
        int64_t i = 0;
        for (int b = 0; b < B; b++) {
            const int q_len = cu[b + 1] - cu[b];
            for (int r = 0; r < q_len; r += rows_per_item) {
                const int rows = rows_per_item < q_len - r ? rows_per_item : q_len - r;
                int64_t lo, hi;
                attn_span(&a, b, r, rows, &lo, &hi);
                for (int h = 0; h < KVH; h++)
                    for (int64_t k0 = lo; k0 < hi || k0 == lo; k0 += split, i++)
                        if (pass) ((AttnItem *)a.items)[i] = (AttnItem){b, h, r, rows, k0, k0 + split < hi ? k0 + split : hi};
            }
        }
        if (!pass) {
            count = i;
            a.items = malloc(sizeof(AttnItem) * count);
            a.per_item = (int64_t)rows_per_item * a.G * (2 + 2 * a.Dp);
            a.partial = malloc(sizeof(float) * count * a.per_item);
            if (!a.items || !a.partial) { free((void *)a.items); free(a.partial); return -2; }
        }
    }
    parallel(attn_item, &a, count, nthreads, atomic_load(&kernel_spin_ns));
    for (int64_t i = 0, first = 0; i < count; i++)
        if (i + 1 == count || a.items[i + 1].b != a.items[first].b || a.items[i + 1].kvh != a.items[first].kvh ||
            a.items[i + 1].row0 != a.items[first].row0) {
            attn_merge(&a, first, i + 1 - first);
            first = i + 1;
        }
    free((void *)a.items);
    free(a.partial);
    return 0;
}

/* The int8 cache's write (the AVX-512 variant's, lane for lane: the same bytes as quant/kv_int8.py's
 * `quantize`). */
int lv_kv_int8_store(const void *x, int dtype, int64_t stride, const float *offset, int8_t *cache,
                     const int64_t *slots, int64_t T, int KVH, int D) {
    if (D < 1 || D > ATTN_MAX_D || dtype == KV_I8) return -1;
    const int C = (D + 15) / 16, R = D + 2 * C;
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < KVH; h++) {
            int8_t *row = cache + (slots[t] * KVH + h) * (int64_t)R;
            for (int c = 0; c < C; c++) {
                const int n = D - c * 16 < 16 ? D - c * 16 : 16;
                float v[16] __attribute__((aligned(16))), o[16] = {0};
                row_to_f32(x, dtype, t * stride + (int64_t)h * D + c * 16, n, 16, v);
                if (offset) memcpy(o, offset + h * D + c * 16, sizeof(float) * n);
                float32x4_t x4[4], m[4];
                for (int q = 0; q < 4; q++) {
                    x4[q] = vsubq_f32(vld1q_f32(v + 4 * q), vld1q_f32(o + 4 * q));
                    m[q] = vabsq_f32(x4[q]);
                }
                const float absmax = reduce_max4x4(m[0], m[1], m[2], m[3]);
                const __fp16 half = (__fp16)fminf(absmax / 127.f, 65504.f);
                const float scale = fmaxf((float)half, 1.17549435e-38f);
                int16_t q16[16];
                for (int q = 0; q < 4; q++) {
                    float32x4_t r = vrndnq_f32(vdivq_f32(x4[q], vdupq_n_f32(scale)));
                    r = vminq_f32(vmaxq_f32(r, vdupq_n_f32(-127.f)), vdupq_n_f32(127.f));
                    vst1_s16(q16 + 4 * q, vqmovn_s32(vcvtnq_s32_f32(r)));
                }
                for (int i = 0; i < n; i++) row[c * 16 + i] = (int8_t)q16[i];
                memcpy(row + D + 2 * c, &half, sizeof half);
            }
        }
    return 0;
}
