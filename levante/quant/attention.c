/* Paged attention over the KV cache on the CPU (included by kernels.c, whose threads it uses).
 *
 * The interface of layers/paged_attention.py: queries q [T][H][D] packed sequence after
 * sequence (cu_seqlens_q), caches [slots][KVH][D] read in place through each sequence's block
 * table (no gather copy), row i of sequence b at position p = seq_lens[b] - q_len + i sees
 * keys j <= p (and p - j < window). No mask tensor: the bounds are computed per tile.
 *
 * Work is split into items of (sequence, KV head, a few query rows, a range of keys): the
 * G = H / KVH query heads of a KV head and the item's rows ("query vectors") share each read
 * of a key and value (grouped-query attention costs one pass over the cache per KV head).
 * Long contexts are cut into key ranges (flash-decoding) so that one sequence keeps all
 * threads busy; each item keeps an online softmax (running max m, sum l, accumulator) in
 * float32 and the ranges of a row are merged at the end. Keys go 16 at a time: the 16 dot
 * products of a query vector come out of one transposed horizontal sum.
 *
 * Queries and output are float32, bfloat16 or float16; the caches one of those or int8
 * (quant/kv_int8.py: a head's row is D int8 codes then a float16 scale per 16 of them, one per
 * 16-lane vector), converted to float32 with their scales as each tile is loaded.
 */

enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2, KV_I8 = 3 };
#define ATTN_MAX_D 512
#define ATTN_MIN_SPLIT 256 /* keys: below this a range is not worth its merge */
#define ATTN_QVECS 32      /* query vectors per item (rows x G), at least one row */
#ifndef ATTN_PREFETCH
#define ATTN_PREFETCH 32   /* keys ahead whose rows are prefetched */
#endif

static inline __m512 load_kv(const void *p, int dtype, int64_t i, __mmask16 m) {
    if (dtype == KV_F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i));
    if (dtype == KV_BF16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)p + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)p + i);
}

/* Block c of an int8 row (D codes, then a float16 scale per 16 codes): 16 values as float32. */
static inline __m512 load_i8(const int8_t *row, int D, int c, __mmask16 m) {
    uint16_t half;
    memcpy(&half, row + D + 2 * c, sizeof half);
    const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, row + c * 16)));
    return _mm512_mul_ps(x, _mm512_set1_ps(_cvtsh_ss(half)));
}

static inline void store_kv(void *p, int dtype, int64_t i, __m512 v, __mmask16 m) {
    if (dtype == KV_F16)
        _mm256_mask_storeu_epi16((uint16_t *)p + i, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    else if (dtype == KV_BF16)
        _mm256_mask_storeu_epi16((uint16_t *)p + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(
            _mm512_castps_si512(round_bf16_(v)), 16)));
    else
        _mm512_mask_storeu_ps((float *)p + i, m, v);
}

/* Lane j of the result = the sum of the 16 lanes of v[j]. */
static inline __m512 hsum16x16(const __m512 v[16]) {
    __m512 w[8], x[4];
    for (int i = 0; i < 8; i++) /* per 128-bit chunk: [a0+a2, b0+b2, a1+a3, b1+b3] */
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per chunk: the chunk's sums of v[4i .. 4i + 3] */
        x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}

typedef struct { int32_t b, kvh, row0, rows; int64_t k0, k1; } AttnItem;

static int bf16_dot_supported(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512bf16") != 0;
    }
    return known;
}

typedef struct {
    const void *q, *k, *v;
    void *out;
    const int32_t *tables, *cu, *lens;
    int64_t width;
    int H, KVH, D, Dp, G, bs, window, dtype; /* dtype: q's and out's */
    int kv;       /* the caches' dtype */
    int row;      /* cache values per (slot, KV head): D, or D + 2 * Dp / 16 for int8 (codes, scales) */
    int bf16_dot; /* bfloat16 queries, bfloat16 or int8 caches, a CPU with AVX512-BF16: scores_bf16 */
    int size;     /* bytes per cache value */
    float scale;
    const AttnItem *items;
    float *partial;  /* per item: m, l, acc[Dp] per query vector, then the query vectors [Dp] */
    int64_t per_item; /* floats of `partial` per item */
} Attn;

/* Scores of the G query vectors of one row (qf: [G][Dp] float32, scaled) against a tile of
 * keys converted to float32 (kf: [16][Dp]): s[g] lane j = q_g . k_j for from <= j < to. */
static inline __attribute__((always_inline)) void scores_f32(const float *qf, const float *kf, const int C, int G,
                                                             int from, int to, __m512 *s) {
    for (int g = 0; g < G; g++) {
        __m512 qr[C], dots[16];
        for (int c = 0; c < C; c++) qr[c] = _mm512_loadu_ps(qf + g * C * 16 + c * 16);
        for (int j = 0; j < 16; j++) {
            __m512 d = _mm512_setzero_ps();
            if (j >= from && j < to)
                for (int c = 0; c < C; c++) d = _mm512_fmadd_ps(qr[c], _mm512_load_ps(kf + j * C * 16 + c * 16), d);
            dots[j] = d;
        }
        s[g] = hsum16x16(dots);
    }
}

/* The same from bfloat16 queries and keys as they are (q: the row's G heads, [G][D]; kp: each
 * key's row in the cache), with vdpbf16ps: products of bfloat16 values are exact in float32, so
 * this differs from scores_f32 only in the order of the float32 sums; times `scale`. D = 32 * C2. */
static inline __attribute__((always_inline, target("avx512bf16"))) void scores_bf16_c(
        const uint16_t *q, const uint16_t *const *kp, const int C2, int G, int from, int to, float scale, __m512 *s) {
    for (int g = 0; g < G; g++) {
        __m512bh qr[C2];
        __m512 dots[16];
        for (int c = 0; c < C2; c++) qr[c] = (__m512bh)_mm512_loadu_si512(q + g * C2 * 32 + c * 32);
        for (int j = 0; j < 16; j++) {
            __m512 d = _mm512_setzero_ps();
            if (j >= from && j < to)
                for (int c = 0; c < C2; c++) d = _mm512_dpbf16_ps(d, qr[c], (__m512bh)_mm512_loadu_si512(kp[j] + c * 32));
            dots[j] = d;
        }
        s[g] = _mm512_mul_ps(hsum16x16(dots), _mm512_set1_ps(scale));
    }
}

__attribute__((target("avx512bf16"))) static void scores_bf16(const uint16_t *q, const uint16_t *const *kp, int C2,
                                                             int G, int from, int to, float scale, __m512 *s) {
    switch (C2) {
    case 2: scores_bf16_c(q, kp, 2, G, from, to, scale, s); break;
    case 4: scores_bf16_c(q, kp, 4, G, from, to, scale, s); break;
    default: scores_bf16_c(q, kp, C2, G, from, to, scale, s);
    }
}

/* One query vector's online-softmax update with a tile's scores `s` (lanes `valid`, from <= j <
 * to): its running max m, sum l and accumulator acc += p_j v_j. C = Dp / 16. */
static inline __attribute__((always_inline)) void softmax_update(float *qv, __m512 s, const float *vf, const int C,
                                                                 int from, int to, __mmask16 valid) {
    float *acc = qv + 2;
    s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, s);
    const float m_tile = _mm512_reduce_max_ps(s);
    __m512 ar[C];
    for (int c = 0; c < C; c++) ar[c] = _mm512_loadu_ps(acc + c * 16);
    if (m_tile > qv[0]) {
        const float alpha = expf(qv[0] - m_tile); /* 0 on the first tile */
        qv[1] *= alpha;
        for (int c = 0; c < C; c++) ar[c] = _mm512_mul_ps(ar[c], _mm512_set1_ps(alpha));
        qv[0] = m_tile;
    }
    float pj[16] __attribute__((aligned(64)));
    __m512 p = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(s, _mm512_set1_ps(qv[0]))));
    qv[1] += _mm512_reduce_add_ps(p);
    _mm512_store_ps(pj, p);
    for (int j = from; j < to; j++) {
        const __m512 w = _mm512_set1_ps(pj[j]);
        for (int c = 0; c < C; c++) ar[c] = _mm512_fmadd_ps(w, _mm512_load_ps(vf + j * C * 16 + c * 16), ar[c]);
    }
    for (int c = 0; c < C; c++) _mm512_storeu_ps(acc + c * 16, ar[c]);
}

/* One item: its query vectors' online softmax over keys k0 .. k1 - 1. Partial per query vector
 * (row r, head g at r * G + g): m, l, acc[Dp], then the scaled float32 query [Dp]. */
static inline __attribute__((always_inline)) void attn_item_c(const Attn *a, int64_t index, const int C) {
    const AttnItem *it = a->items + index;
    const int D = a->D, Dp = C * 16, G = a->G, bf16_dot = a->bf16_dot;
    const __mmask16 last = (__mmask16)(D % 16 ? (1u << (D % 16)) - 1 : 0xFFFF);
    float *part = a->partial + index * a->per_item;
    const int64_t q_len = a->cu[it->b + 1] - a->cu[it->b], n = a->lens[it->b];
    const int64_t first_row = a->cu[it->b] + it->row0, first_pos = n - q_len + it->row0;
    float *qf = part + it->rows * G * (2 + Dp); /* [rows][G][Dp] */
    for (int r = 0; r < it->rows; r++)
        for (int g = 0; g < G; g++) {
            float *qv = part + (r * G + g) * (2 + Dp);
            qv[0] = -INFINITY;
            qv[1] = 0.f;
            const int64_t at = ((first_row + r) * a->H + it->kvh * G + g) * (int64_t)D;
            for (int c = 0; c < C; c++) {
                _mm512_storeu_ps(qv + 2 + c * 16, _mm512_setzero_ps());
                __m512 x = load_kv(a->q, a->dtype, at + c * 16, c == C - 1 ? last : 0xFFFF);
                _mm512_storeu_ps(qf + (r * G + g) * Dp + c * 16, _mm512_mul_ps(x, _mm512_set1_ps(a->scale)));
            }
        }
    float kf[16 * Dp] __attribute__((aligned(64))), vf[16 * Dp] __attribute__((aligned(64)));
    uint16_t kb[16 * Dp] __attribute__((aligned(64))); /* int8 keys as bfloat16, for scores_bf16 */
    const uint16_t *kp[16];
    const int32_t *table = a->tables + it->b * a->width;
    const int64_t row_stride = (int64_t)a->KVH * a->row, head_at = (int64_t)it->kvh * a->row;
    for (int64_t t0 = it->k0; t0 < it->k1; t0 += 16) {
        const int nk = (int)(it->k1 - t0 < 16 ? it->k1 - t0 : 16);
        int64_t block = t0 / a->bs, offset = t0 % a->bs;
        for (int j = 0; j < nk; j++) {
            const int64_t at = ((int64_t)table[block] * a->bs + offset) * row_stride + head_at;
            if (++offset == a->bs) offset = 0, block++;
            kp[j] = (const uint16_t *)a->k + at;
            const int64_t ahead = t0 + ATTN_PREFETCH + j; /* blocks sit anywhere: the hardware prefetcher cannot follow */
            if (ahead < it->k1) {
                const int64_t next = ((int64_t)table[ahead / a->bs] * a->bs + ahead % a->bs) * row_stride + head_at;
                for (int64_t byte = 0; byte < (int64_t)a->row * a->size; byte += 64) {
                    _mm_prefetch((const char *)a->k + next * a->size + byte, _MM_HINT_T0);
                    _mm_prefetch((const char *)a->v + next * a->size + byte, _MM_HINT_T0);
                }
            }
            if (a->kv == KV_I8) {
                const int8_t *kr = (const int8_t *)a->k + at, *vr = (const int8_t *)a->v + at;
                for (int c = 0; c < C; c++) {
                    __mmask16 m = c == C - 1 ? last : 0xFFFF;
                    if (bf16_dot) /* keys rounded to bfloat16 for vdpbf16ps (the queries are bfloat16) */
                        store_kv(kb, KV_BF16, j * Dp + c * 16, load_i8(kr, D, c, m), 0xFFFF);
                    else
                        _mm512_store_ps(kf + j * Dp + c * 16, load_i8(kr, D, c, m));
                    _mm512_store_ps(vf + j * Dp + c * 16, load_i8(vr, D, c, m));
                }
                kp[j] = kb + j * Dp;
                continue;
            }
            for (int c = 0; c < C; c++) {
                __mmask16 m = c == C - 1 ? last : 0xFFFF;
                if (!bf16_dot) _mm512_store_ps(kf + j * Dp + c * 16, load_kv(a->k, a->kv, at + c * 16, m));
                _mm512_store_ps(vf + j * Dp + c * 16, load_kv(a->v, a->kv, at + c * 16, m));
            }
        }
        for (int r = 0; r < it->rows; r++) {
            const int64_t pos = first_pos + r; /* this row sees keys lo .. pos */
            const int64_t lo = a->window > 0 && pos - a->window + 1 > 0 ? pos - a->window + 1 : 0;
            int64_t from = lo - t0, to = pos + 1 - t0; /* valid lanes: from <= j < to, j < nk */
            if (from < 0) from = 0;
            if (to > nk) to = nk;
            if (from >= to) continue;
            const __mmask16 valid = (__mmask16)(((1u << to) - 1) & ~((1u << from) - 1));
            __m512 s[G];
            if (bf16_dot)
                scores_bf16((const uint16_t *)a->q + ((first_row + r) * a->H + it->kvh * G) * (int64_t)D, kp, D / 32,
                            G, (int)from, (int)to, a->scale, s);
            else
                scores_f32(qf + r * G * Dp, kf, C, G, (int)from, (int)to, s);
            for (int g = 0; g < G; g++)
                softmax_update(part + (r * G + g) * (2 + Dp), s[g], vf, C, (int)from, (int)to, valid);
        }
    }
}

static void attn_item(const void *ctx, int64_t index) {
    const Attn *a = ctx;
    switch (a->Dp / 16) { /* the common head sizes with their loops unrolled */
    case 4: attn_item_c(a, index, 4); break;
    case 8: attn_item_c(a, index, 8); break;
    case 16: attn_item_c(a, index, 16); break;
    default: attn_item_c(a, index, a->Dp / 16);
    }
}

/* Merge the key ranges of one (sequence, KV head, rows) group: items first .. first + count - 1. */
static void attn_merge(const Attn *a, int64_t first, int64_t count) {
    const AttnItem *it = a->items + first;
    const int D = a->D, Dp = a->Dp, C = Dp / 16, G = a->G;
    const __mmask16 last = (__mmask16)(D % 16 ? (1u << (D % 16)) - 1 : 0xFFFF);
    const int64_t first_row = a->cu[it->b] + it->row0;
    for (int v = 0; v < it->rows * G; v++) {
        float m = -INFINITY, l = 0.f;
        for (int64_t i = 0; i < count; i++) {
            const float *qv = a->partial + (first + i) * a->per_item + v * (2 + Dp);
            if (qv[0] > m) m = qv[0];
        }
        __m512 sum[ATTN_MAX_D / 16];
        for (int c = 0; c < C; c++) sum[c] = _mm512_setzero_ps();
        for (int64_t i = 0; i < count && m > -INFINITY; i++) {
            const float *qv = a->partial + (first + i) * a->per_item + v * (2 + Dp);
            if (qv[1] == 0.f) continue;
            const float w = expf(qv[0] - m);
            l += w * qv[1];
            for (int c = 0; c < C; c++) sum[c] = _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(qv + 2 + c * 16), sum[c]);
        }
        const float inv = l > 0.f ? 1.f / l : 0.f; /* a row that sees no key: zeros */
        const int r = v / G, g = v % G;
        const int64_t at = ((first_row + r) * a->H + it->kvh * G + g) * (int64_t)D;
        for (int c = 0; c < C; c++)
            store_kv(a->out, a->dtype, at + c * 16, _mm512_mul_ps(sum[c], _mm512_set1_ps(inv)), c == C - 1 ? last : 0xFFFF);
    }
}

/* Key range of `rows` query rows from row0 of sequence b: the union of what they see. */
static void attn_span(const Attn *a, int b, int row0, int rows, int64_t *lo, int64_t *hi) {
    const int64_t q_len = a->cu[b + 1] - a->cu[b], first = a->lens[b] - q_len + row0;
    *hi = first + rows;
    *lo = a->window > 0 && first - a->window + 1 > 0 ? first - a->window + 1 : 0;
}

int lv_paged_attention(const void *q, const void *k_cache, const void *v_cache, void *out, const int32_t *tables,
                       int64_t width, const int32_t *cu, const int32_t *lens, int B, int H, int KVH, int D,
                       int block_size, int window, float scale, int dtype, int kv, int nthreads) {
    if (D < 1 || D > ATTN_MAX_D || KVH < 1 || H % KVH || block_size < 1 || dtype == KV_I8) return -1;
    Attn a = {q, k_cache, v_cache, out, tables, cu, lens, width, H, KVH, D, (D + 15) / 16 * 16, H / KVH,
              block_size, window, dtype, kv, kv == KV_I8 ? D + 2 * ((D + 15) / 16) : D,
              dtype == KV_BF16 && (kv == KV_BF16 || kv == KV_I8) && D % 32 == 0 && bf16_dot_supported(),
              kv == KV_F32 ? 4 : kv == KV_I8 ? 1 : 2, scale, NULL, NULL, 0};
    const int rows_per_item = ATTN_QVECS / a.G > 1 ? ATTN_QVECS / a.G : 1;
    /* Pass 1: the keys all row groups read, to size the key ranges; pass 2: the items. */
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

/* The int8 cache's write (quant/kv_int8.py's `quantize`, then the rows stored at their slots): x
 * [T][KVH][D] (float32, bfloat16 or float16; `stride` values from one token to the next), less
 * offset [KVH][D] when given, as D codes and a float16 scale per 16 values into cache row
 * slots[t] * KVH + h. Rounds and clamps as the PyTorch version does, so both write the same bytes. */
int lv_kv_int8_store(const void *x, int dtype, int64_t stride, const float *offset, int8_t *cache,
                     const int64_t *slots, int64_t T, int KVH, int D) {
    if (D < 1 || D > ATTN_MAX_D || dtype == KV_I8) return -1;
    const int C = (D + 15) / 16, R = D + 2 * C;
    const __mmask16 last = (__mmask16)(D % 16 ? (1u << (D % 16)) - 1 : 0xFFFF);
    const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    for (int64_t t = 0; t < T; t++)
        for (int h = 0; h < KVH; h++) {
            int8_t *row = cache + (slots[t] * KVH + h) * (int64_t)R;
            for (int c = 0; c < C; c++) {
                const __mmask16 m = c == C - 1 ? last : 0xFFFF;
                __m512 v = load_kv(x, dtype, t * stride + (int64_t)h * D + c * 16, m);
                if (offset) v = _mm512_maskz_sub_ps(m, v, _mm512_maskz_loadu_ps(m, offset + h * D + c * 16));
                const float absmax = _mm512_reduce_max_ps(_mm512_abs_ps(v));
                const uint16_t half = _cvtss_sh(fminf(absmax / 127.f, 65504.f), _MM_FROUND_TO_NEAREST_INT);
                const float scale = fmaxf(_cvtsh_ss(half), 1.17549435e-38f); /* torch.finfo(float32).tiny */
                __m512 q = _mm512_roundscale_ps(_mm512_div_ps(v, _mm512_set1_ps(scale)),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
                _mm_mask_storeu_epi8(row + c * 16, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)));
                memcpy(row + D + 2 * c, &half, sizeof half);
            }
        }
    return 0;
}
