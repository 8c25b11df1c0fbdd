/* levante's CPU kernels: the one interface every ISA variant implements.
 *
 * Each variant (avx512.c, avx2.c, neon.c) is compiled on its own into a shared library with
 * the flags of its ISA (levante/kernels/build.py); levante/kernels/isa.py picks one at run
 * time from the CPU's features and levante/kernels/bindings.py reads the prototypes and
 * structures below (the lines starting with LV_API, and the typedef structs) to make its
 * ctypes signatures, so this file is the only list of them.
 *
 * Conventions: pointers are raw tensor data; `*_bf16` flags say a buffer holds bfloat16
 * (else float32); functions return 0 on success, negative on bad arguments; `nthreads` is
 * the caller's thread budget (the library runs its own helper threads, runtime.h).
 *
 * Weight layouts (the same bytes for every variant, so packed weights and prepared caches
 * carry over; see the variants' comments for how each reads them):
 *   t16    int8 codes + 128, tiles of 16 rows, per group of 4 columns 64 bytes (16 rows x 4)
 *   q4t16  4-bit codes, tiles of 16 rows, per group of 8 columns 64 bytes (low nibbles
 *          columns 0..3, high nibbles 4..7), float16/float32 scales and offsets [tile][group][16]
 *   q5t16  5-bit codes (GGUF Q5_0), per tile and block of 32 columns 352 bytes
 */
#ifndef LEVANTE_KERNELS_H
#define LEVANTE_KERNELS_H

#include <stdint.h>

#define LV_API __attribute__((visibility("default")))

/* -- identity ------------------------------------------------------------------------------ */
LV_API const char *lv_variant(void);       /* "avx512", "avx2", "avx2-vnni", "neon" */
LV_API const char *lv_build_id(void);      /* hash of the sources it was built from */
LV_API int lv_max_rows(void);              /* rows of x one matrix call takes (more: the caller splits) */
LV_API int lv_bf16_dot(void);              /* 1: the bfloat16 attention path runs here (AVX512-BF16) */

/* -- threads ------------------------------------------------------------------------------- */
LV_API void lv_set_spin(int on);
/* STREAM-like read of `bytes` (a multiple of 8) by `nthreads` threads of the pool: a sum, so the
 * loads are not optimised away (benchmarks/memory_bandwidth.py: the bandwidth decode is bound by). */
LV_API uint64_t lv_read(const void *buf, int64_t bytes, int nthreads);

/* -- matrix-vector products: out[m, n] = sum_k W[n, k] x[m, k], m < M ------------------------ */
LV_API int lv_w8a8(const uint8_t *w, const float *scale, int64_t N, int64_t K, int64_t Kp, const void *x,
                   int64_t ldx, int x_bf16, int M, void *out, int64_t ldo, int out_bf16, int nthreads);
LV_API int lv_w8a16(const uint8_t *w, const float *scale, int64_t N, int64_t K, int64_t Kp, const void *x,
                    int64_t ldx, int x_bf16, int M, void *out, int64_t ldo, int out_bf16, int nthreads);
LV_API int lv_q4a8(const uint8_t *w, const void *qscale, const void *qoffset, int qscale_f32, int64_t N, int64_t K,
                   const void *x, int64_t ldx, int x_bf16, int M, void *out, int64_t ldo, int out_bf16,
                   int nthreads, int split);
LV_API int lv_q5a8(const uint8_t *w, int64_t N, int64_t K, const void *x, int64_t ldx, int x_bf16, int M, void *out,
                   int64_t ldo, int out_bf16, int nthreads, int split);

/* -- layouts --------------------------------------------------------------------------------- */
LV_API int lv_w8_pack(const int8_t *codes, int64_t N, int64_t K, int64_t Kp, uint8_t *out, int nthreads);
LV_API int lv_w8_unpack(const uint8_t *w, int64_t N, int64_t K, int64_t Kp, int64_t row0, int64_t row1, void *out,
                        int out_bf16, int nthreads);
LV_API int lv_q5_pack_gguf(const uint8_t *raw, int64_t N, int64_t K, int64_t row_bytes, uint8_t *out, int nthreads);
LV_API int lv_q5_unpack(const uint8_t *w, int64_t N, int64_t K, int64_t row0, int64_t row1, void *out, int out_bf16,
                        int nthreads);

/* -- small decode-step ops -------------------------------------------------------------------- */
LV_API int lv_rms_norm(const void *x, const void *weight, void *out, int64_t rows, int64_t n, float eps, int bf16,
                       int unit_offset);
LV_API int lv_silu_mul(const void *x, void *out, int64_t rows, int64_t n, int bf16);
LV_API int lv_rope(const void *x, void *out, const float *cos_sin, int64_t tokens, int64_t heads, int64_t dim,
                   int64_t stride, int bf16);

/* -- paged attention ------------------------------------------------------------------------- */
enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2, KV_I8 = 3 }; /* dtype codes; KV_I8: kv_int8.py's rows */
LV_API int lv_paged_attention(const void *q, const void *k_cache, const void *v_cache, void *out,
                              const int32_t *tables, int64_t width, const int32_t *cu, const int32_t *lens, int B,
                              int H, int KVH, int D, int block_size, int window, float scale, int dtype, int kv,
                              int nthreads);
LV_API int lv_kv_int8_store(const void *x, int dtype, int64_t stride, const float *offset, int8_t *cache,
                            const int64_t *slots, int64_t T, int KVH, int D);

/* -- a decode token through the blocks (decode_step.c) ---------------------------------------- */
enum { LIN_W8 = 0, LIN_Q4 = 1, LIN_Q5 = 2 };

typedef struct {
    int kind;                     /* LIN_*: layout t16 (int8), q4t16, q5t16 */
    int qscale_f32;               /* q4t16: scales and offsets float32 (else float16) */
    const uint8_t *w;
    const float *scale;           /* t16: per-row float32 scales */
    const void *qscale;           /* q4t16 */
    const void *qoffset;          /* q4t16 */
    const void *bias;             /* [N] in x's dtype, or NULL */
    int64_t N;
    int64_t K;
    int64_t Kp;
} DecodeLinear;

typedef struct {
    const void *input_norm;       /* [hidden] in x's dtype */
    const void *post_norm;
    const void *q_norm;           /* [head_dim] in x's dtype, or NULL */
    const void *k_norm;
    float eps;
    float qk_eps;
    DecodeLinear qkv;
    DecodeLinear o;
    DecodeLinear gate_up;
    DecodeLinear down;
    void *k_cache;                /* [slots][kv_heads][head_dim] in x's dtype, or int8 rows */
    void *v_cache;
    const float *cos_sin;         /* [positions][head_dim]: cos half, then sin half */
    int window;                   /* sliding window, 0: none */
    float scale;                  /* attention scale */
    int kv_int8;                  /* the caches are int8 (rows of head_dim codes, then scales) */
    const float *key_offset;      /* int8: [kv_heads][head_dim] subtracted from keys, or NULL */
} DecodeBlock;

LV_API int64_t lv_decode_scratch(int64_t hidden, int heads, int kv_heads, int head_dim, int64_t intermediate);
LV_API int lv_decode_blocks(const DecodeBlock *blocks, int n, void *hidden, int64_t hidden_size, int heads,
                            int kv_heads, int head_dim, int64_t intermediate, int bf16, int64_t position,
                            int64_t slot, const int32_t *table, int64_t width, int block_size, void *scratch,
                            int nthreads);

#endif
