/* Paged attention over the KV cache on the CPU (AVX-512; included by avx512.c, whose threads it uses).
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
 * 16-lane vector), converted to float32 with their scales as each tile is loaded. bfloat16
 * queries over bfloat16 or int8 caches take the bfloat16 path further down (attn_item_bf16)
 * where the CPU has AVX512-BF16; this general path computes in float32.
 */

#define ATTN_MAX_D 512
#define ATTN_MIN_SPLIT 256 /* keys: below this a range is not worth its merge */
#define ATTN_QVECS 32      /* query vectors per item (rows x G), at least one row */
#ifndef ATTN_PREFETCH
#define ATTN_PREFETCH 64   /* keys ahead whose rows are prefetched (into L2: more misses in flight than L1 takes) */
#endif
#ifndef ATTN_HINT
#define ATTN_HINT _MM_HINT_T1
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
    int bf16_path; /* bfloat16 queries, bfloat16 or int8 caches, D % 32 == 0, D <= ATTN_BF16_MAX_D,
                    * G <= ATTN_QVECS, a CPU with AVX512-BF16: attn_item_bf16; else attn_item_c */
    int size;     /* bytes per cache value */
    float scale;
    const AttnItem *items;
    float *partial;  /* per item: m, l, acc[Dp] per query vector, then the query vectors [Dp] */
    int64_t per_item; /* floats of `partial` per item */
} Attn;

/* Key `ahead`'s rows (K and V of the item's KV head) into L2, when it is before `end`: blocks sit
 * anywhere, so the hardware prefetcher cannot follow them, and into L1 too few misses stay in flight. */
static inline __attribute__((always_inline)) void prefetch_row(const Attn *a, const int32_t *table, int64_t ahead,
                                                               int64_t end, int64_t row_stride, int64_t head_at) {
    if (ahead >= end) return;
    const int64_t at = (((int64_t)table[ahead / a->bs] * a->bs + ahead % a->bs) * row_stride + head_at) * a->size;
    for (int64_t byte = 0; byte < (int64_t)a->row * a->size; byte += 64) {
        _mm_prefetch((const char *)a->k + at + byte, ATTN_HINT);
        _mm_prefetch((const char *)a->v + at + byte, ATTN_HINT);
    }
}

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
    const int D = a->D, Dp = C * 16, G = a->G;
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
                const int8_t *kr = (const int8_t *)a->k + at, *vr = (const int8_t *)a->v + at;
                for (int c = 0; c < C; c++) {
                    __mmask16 m = c == C - 1 ? last : 0xFFFF;
                    _mm512_store_ps(kf + j * Dp + c * 16, load_i8(kr, D, c, m));
                    _mm512_store_ps(vf + j * Dp + c * 16, load_i8(vr, D, c, m));
                }
                continue;
            }
            for (int c = 0; c < C; c++) {
                __mmask16 m = c == C - 1 ? last : 0xFFFF;
                _mm512_store_ps(kf + j * Dp + c * 16, load_kv(a->k, a->kv, at + c * 16, m));
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
            scores_f32(qf + r * G * Dp, kf, C, G, (int)from, (int)to, s);
            for (int g = 0; g < G; g++)
                softmax_update(part + (r * G + g) * (2 + Dp), s[g], vf, C, (int)from, (int)to, valid);
        }
    }
}

/* --- The bfloat16 path: bfloat16 queries, bfloat16 or int8 caches, a CPU with AVX512-BF16 (the usual decode) ---
 *
 * Keys: each tile of 16 is transposed to pairs of dimensions (vector i, lane j = key j's
 * dimensions 2i and 2i + 1), so a query vector's 16 scores are D / 2 vdpbf16ps with the query's
 * pairs broadcast, no horizontal sums. Values: per chunk of ATTN_CHUNK keys the softmax weights
 * are rounded to bfloat16 and the values interleaved by pairs of keys (vector c of pair p holds
 * (v_2p[d], v_2p+1[d]) for 16 dimensions d), so p . V is D / 16 vdpbf16ps per pair of keys, the
 * weights' pair broadcast. One online-softmax rescale per chunk. The rounding of the weights to
 * bfloat16 (relative 2^-9 each, as a bfloat16 matmul of softmax(QK) and V rounds them) is the
 * only difference from the float32 path; the accumulators are float32. The chunk's keys are
 * read in bursts (a tile's 16 key rows, then the chunk's value rows), prefetched ahead. An int8
 * cache's rows are dequantised to bfloat16 as they are read (row_bf16). */
#define ATTN_CHUNK 64       /* keys per softmax update */
#define ATTN_VG 8           /* query vectors per register group */
#define ATTN_BF16_MAX_D 256 /* head sizes this path takes (D % 32 == 0) */

/* r[i] lane j <- r[j] lane i (16 x 16 32-bit values). */
static inline __attribute__((always_inline)) void transpose16_epi32(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* u[4i + k] lane L: rows 4i .. 4i + 3 at column 4L + k */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int k = 0; k < 4; k++) {
        const __m512i v0 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x88), v1 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xDD);
        const __m512i w0 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x88), w1 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xDD);
        t[k] = _mm512_shuffle_i32x4(v0, w0, 0x88);      /* column k */
        t[8 + k] = _mm512_shuffle_i32x4(v0, w0, 0xDD);  /* column 8 + k */
        t[4 + k] = _mm512_shuffle_i32x4(v1, w1, 0x88);  /* column 4 + k */
        t[12 + k] = _mm512_shuffle_i32x4(v1, w1, 0xDD); /* column 12 + k */
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* out[v * stride] = scale * (lane j: query vector v . key j) for n vectors (q32: [n][W] pairs) and
 * a tile's transposed keys kt[W]. Two accumulators per vector halve the dependency chains. */
static inline __attribute__((always_inline, target("avx512bf16"))) void tile_scores_n(
        const uint32_t *q32, const __m512i *kt, const int W, const int n, float scale, __m512 *out, int stride) {
    __m512 s0[ATTN_VG], s1[ATTN_VG];
    for (int v = 0; v < n; v++) s0[v] = s1[v] = _mm512_setzero_ps();
    for (int i = 0; i < W; i += 2) {
        const __m512bh k0 = (__m512bh)kt[i], k1 = (__m512bh)kt[i + 1];
        for (int v = 0; v < n; v++) {
            s0[v] = _mm512_dpbf16_ps(s0[v], (__m512bh)_mm512_set1_epi32((int)q32[v * W + i]), k0);
            s1[v] = _mm512_dpbf16_ps(s1[v], (__m512bh)_mm512_set1_epi32((int)q32[v * W + i + 1]), k1);
        }
    }
    for (int v = 0; v < n; v++) out[v * stride] = _mm512_mul_ps(_mm512_add_ps(s0[v], s1[v]), _mm512_set1_ps(scale));
}

__attribute__((target("avx512bf16"))) static void tile_scores(const uint32_t *q32, const __m512i *kt, int W, int n,
                                                             float scale, __m512 *out, int stride) {
#define TILE_SCORES_CASE(N) case N: tile_scores_n(q32, kt, W, N, scale, out, stride); break;
    switch (n) {
    TILE_SCORES_CASE(1) TILE_SCORES_CASE(2) TILE_SCORES_CASE(3) TILE_SCORES_CASE(4)
    TILE_SCORES_CASE(5) TILE_SCORES_CASE(6) TILE_SCORES_CASE(7) default: tile_scores_n(q32, kt, W, 8, scale, out, stride);
    }
#undef TILE_SCORES_CASE
}

/* acc[v] (n vectors, [C][16] floats each, dimensions in the interleaved order) = alpha[v] acc[v] +
 * sum over pairs p of the weights' pair p32[v][p] times the interleaved values vi[p][c]. */
static inline __attribute__((always_inline, target("avx512bf16"))) void chunk_values_n(
        float *acc, const float *alpha, const uint32_t *p32, const __m512i *vi, int pairs, const int C, const int n) {
    for (int c = 0; c < C; c++) {
        __m512 x[ATTN_VG];
        for (int v = 0; v < n; v++) x[v] = _mm512_mul_ps(_mm512_load_ps(acc + (v * C + c) * 16), _mm512_set1_ps(alpha[v]));
        for (int p = 0; p < pairs; p++) {
            const __m512bh w = (__m512bh)vi[p * C + c];
            for (int v = 0; v < n; v++)
                x[v] = _mm512_dpbf16_ps(x[v], (__m512bh)_mm512_set1_epi32((int)p32[v * (ATTN_CHUNK / 2) + p]), w);
        }
        for (int v = 0; v < n; v++) _mm512_store_ps(acc + (v * C + c) * 16, x[v]);
    }
}

__attribute__((target("avx512bf16"))) static void chunk_values(float *acc, const float *alpha, const uint32_t *p32,
                                                              const __m512i *vi, int pairs, int C, int n) {
#define CHUNK_VALUES_CASE(N) case N: chunk_values_n(acc, alpha, p32, vi, pairs, C, N); break;
    switch (n) {
    CHUNK_VALUES_CASE(1) CHUNK_VALUES_CASE(2) CHUNK_VALUES_CASE(3) CHUNK_VALUES_CASE(4)
    CHUNK_VALUES_CASE(5) CHUNK_VALUES_CASE(6) CHUNK_VALUES_CASE(7) default: chunk_values_n(acc, alpha, p32, vi, pairs, C, 8);
    }
#undef CHUNK_VALUES_CASE
}

/* Values 32h .. 32h + 31 of a cache row as bfloat16: a bfloat16 row's as they are, an int8 row's
 * codes times their scales, rounded to bfloat16 as the queries are (int8's own error is ~50x that). */
static inline __attribute__((always_inline, target("avx512bf16"))) __m512i row_bf16(const char *row, int kv, int D,
                                                                                   int h) {
    if (kv == KV_I8)
        return (__m512i)_mm512_cvtne2ps_pbh(load_i8((const int8_t *)row, D, 2 * h + 1, 0xFFFF),
                                            load_i8((const int8_t *)row, D, 2 * h, 0xFFFF));
    return _mm512_loadu_si512(row + 64 * h);
}

/* One item on the bfloat16 path (rows * G <= ATTN_QVECS, D <= ATTN_BF16_MAX_D); partial as attn_item_c's. */
__attribute__((target("avx512bf16"))) static void attn_item_bf16(const Attn *a, int64_t index) {
    const AttnItem *it = a->items + index;
    const int D = a->D, W = D / 2, C = D / 16, G = a->G, NV = it->rows * G;
    float *part = a->partial + index * a->per_item;
    const int64_t q_len = a->cu[it->b + 1] - a->cu[it->b], n = a->lens[it->b];
    const int64_t first_row = a->cu[it->b] + it->row0, first_pos = n - q_len + it->row0;
    uint32_t q32[ATTN_QVECS * ATTN_BF16_MAX_D / 2] __attribute__((aligned(64)));
    float acc[ATTN_QVECS * ATTN_BF16_MAX_D] __attribute__((aligned(64)));
    float m[ATTN_QVECS], l[ATTN_QVECS], alpha[ATTN_QVECS];
    __m512 S[ATTN_QVECS * (ATTN_CHUNK / 16)];
    uint32_t p32[ATTN_QVECS * ATTN_CHUNK / 2] __attribute__((aligned(64)));
    __m512i kt[ATTN_BF16_MAX_D / 2], vi[ATTN_CHUNK / 2 * (ATTN_BF16_MAX_D / 16)];
    for (int v = 0; v < NV; v++) {
        const int r = v / G, g = v % G;
        memcpy(q32 + v * W, (const uint16_t *)a->q + ((first_row + r) * a->H + it->kvh * G + g) * (int64_t)D, 2 * D);
        m[v] = -INFINITY;
        l[v] = 0.f;
    }
    memset(acc, 0, sizeof(float) * NV * D);
    const int32_t *table = a->tables + it->b * a->width;
    const int64_t row_stride = (int64_t)a->KVH * a->row, head_at = (int64_t)it->kvh * a->row;
    const char *kp[ATTN_CHUNK], *vp[ATTN_CHUNK];
    const int kv = a->kv;
    for (int64_t c0 = it->k0; c0 < it->k1; c0 += ATTN_CHUNK) {
        const int nk = (int)(it->k1 - c0 < ATTN_CHUNK ? it->k1 - c0 : ATTN_CHUNK), tiles = (nk + 15) / 16;
        int64_t block = c0 / a->bs, offset = c0 % a->bs;
        for (int j = 0; j < nk; j++) {
            const int64_t at = ((int64_t)table[block] * a->bs + offset) * row_stride + head_at;
            if (++offset == a->bs) offset = 0, block++;
            kp[j] = (const char *)a->k + at * a->size;
            vp[j] = (const char *)a->v + at * a->size;
            prefetch_row(a, table, c0 + ATTN_PREFETCH + j, it->k1, row_stride, head_at);
        }
        for (int t = 0; t < tiles; t++) {
            const int nkt = nk - 16 * t < 16 ? nk - 16 * t : 16;
            for (int h = 0; h < W / 16; h++) {
                __m512i r[16];
                for (int j = 0; j < 16; j++)
                    r[j] = j < nkt ? row_bf16(kp[16 * t + j], kv, D, h) : _mm512_setzero_si512();
                transpose16_epi32(r);
                for (int i = 0; i < 16; i++) kt[16 * h + i] = r[i];
            }
            for (int v0 = 0; v0 < NV; v0 += ATTN_VG)
                tile_scores(q32 + v0 * W, kt, W, NV - v0 < ATTN_VG ? NV - v0 : ATTN_VG, a->scale,
                            S + v0 * (ATTN_CHUNK / 16) + t, ATTN_CHUNK / 16);
        }
        for (int v = 0; v < NV; v++) { /* the chunk's weights, the running max and sum */
            const int64_t pos = first_pos + v / G; /* this row sees keys lo .. pos */
            const int64_t lo = a->window > 0 && pos - a->window + 1 > 0 ? pos - a->window + 1 : 0;
            int64_t from = lo - c0, to = pos + 1 - c0;
            if (from < 0) from = 0;
            if (to > nk) to = nk;
            uint16_t *pv = (uint16_t *)(p32 + v * (ATTN_CHUNK / 2));
            if (from >= to) {
                alpha[v] = 1.f;
                memset(pv, 0, 2 * ATTN_CHUNK);
                continue;
            }
            __mmask16 valid[ATTN_CHUNK / 16];
            __m512 top = _mm512_set1_ps(-INFINITY);
            for (int t = 0; t < tiles; t++) {
                const int64_t f = from - 16 * t < 0 ? 0 : from - 16 * t, e = to - 16 * t > 16 ? 16 : to - 16 * t;
                valid[t] = f >= e ? 0 : (__mmask16)(((1u << e) - 1) & ~((1u << f) - 1));
                top = _mm512_mask_max_ps(top, valid[t], top, S[v * (ATTN_CHUNK / 16) + t]);
            }
            const float m_new = fmaxf(m[v], _mm512_reduce_max_ps(top));
            alpha[v] = expf(m[v] - m_new); /* 0 on the first chunk, 1 while the max holds */
            m[v] = m_new;
            __m512 sum = _mm512_setzero_ps();
            for (int t = 0; t < tiles; t++) {
                const __m512 p = _mm512_maskz_mov_ps(valid[t], exp512(_mm512_sub_ps(S[v * (ATTN_CHUNK / 16) + t],
                                                                                   _mm512_set1_ps(m_new))));
                sum = _mm512_add_ps(sum, p);
                _mm256_storeu_si256((__m256i *)(pv + 16 * t), (__m256i)_mm512_cvtneps_pbh(p));
            }
            l[v] = l[v] * alpha[v] + _mm512_reduce_add_ps(sum);
        }
        const int pairs = (nk + 1) / 2;
        for (int p = 0; p < pairs; p++) /* the values interleaved by pairs of keys (the last may pair with zeros) */
            for (int h = 0; h < D / 32; h++) {
                const __m512i x = row_bf16(vp[2 * p], kv, D, h);
                const __m512i y = 2 * p + 1 < nk ? row_bf16(vp[2 * p + 1], kv, D, h) : _mm512_setzero_si512();
                vi[p * C + 2 * h] = _mm512_unpacklo_epi16(x, y);     /* dims 32h + 8L + k, lane 4L + k */
                vi[p * C + 2 * h + 1] = _mm512_unpackhi_epi16(x, y); /* dims 32h + 8L + 4 + k */
            }
        for (int v0 = 0; v0 < NV; v0 += ATTN_VG)
            chunk_values(acc + v0 * D, alpha + v0, p32 + v0 * (ATTN_CHUNK / 2), vi, pairs, C,
                         NV - v0 < ATTN_VG ? NV - v0 : ATTN_VG);
    }
    /* Dimensions back in order: natural d = 32h + 8L + k is lane 4L + k of vector 2h (k < 4) or
     * lane 4L + k - 4 of vector 2h + 1 (k >= 4). */
    __m512i order[2];
    {
        int32_t idx[32];
        for (int d = 0; d < 32; d++) idx[d] = (d % 8 < 4 ? 0 : 16) + 4 * (d / 8) + d % 4;
        order[0] = _mm512_loadu_si512(idx);
        order[1] = _mm512_loadu_si512(idx + 16);
    }
    for (int v = 0; v < NV; v++) {
        float *qv = part + v * (2 + a->Dp);
        qv[0] = m[v];
        qv[1] = l[v];
        for (int h = 0; h < D / 32; h++) {
            const __m512 lo = _mm512_load_ps(acc + (v * C + 2 * h) * 16), hi = _mm512_load_ps(acc + (v * C + 2 * h + 1) * 16);
            _mm512_storeu_ps(qv + 2 + 32 * h, _mm512_permutex2var_ps(lo, order[0], hi));
            _mm512_storeu_ps(qv + 2 + 32 * h + 16, _mm512_permutex2var_ps(lo, order[1], hi));
        }
    }
}

static void attn_item(const void *ctx, int64_t index) {
    const Attn *a = ctx;
    if (a->bf16_path) {
        attn_item_bf16(a, index);
        return;
    }
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
              dtype == KV_BF16 && (kv == KV_BF16 || kv == KV_I8) && D % 32 == 0 && D <= ATTN_BF16_MAX_D
                  && H / KVH <= ATTN_QVECS && bf16_dot_supported(),
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
