/* One decode token through N pre-norm transformer blocks in one call (included by each variant
 * after its kernels: it only calls them, so it is the same C for every ISA).
 *
 * A single sequence's decode step is ~170 kernel calls, and between them PyTorch and Python
 * spent about as long as the small ops themselves: ~10 ms a token on this project's default
 * model (24 blocks), a fifth of the step, most of it cache misses in the interpreter after
 * each matmul has streamed megabytes of weights through the caches. Here the block is
 * the figure of models/llama.py, run with the same kernels, in the same order, with the
 * same roundings (every tensor the PyTorch path makes in x's dtype is rounded to it here at
 * the same point), so the result is bit for bit the same:
 *
 *   h += o_proj(attention(rope(q), rope(k) -> cache, v -> cache))   of qkv_proj(rms_norm(h)) (+ bias)
 *   h += down_proj(silu(gate) * up)                                  of gate_up_proj(rms_norm(h))
 *
 * with optional per-head RMSNorm on q and k before RoPE (Qwen3). The KV cache holds x's
 * dtype (float32 or bfloat16), or int8 (quant/kv_int8.py: the keys less the model's key bias,
 * written by lv_kv_int8_store as the modules write them); layers/decode_step.py decides when
 * this applies.
 */

/* h += y over n values (x's dtype: the sum rounded once, as PyTorch's add; plain C, the same
 * roundings as the variants' vector stores). */
static void add_into(void *h, const void *y, int64_t n, int bf16) {
    for (int64_t i = 0; i < n; i++) value_put(h, bf16, i, value_at(h, bf16, i) + value_at(y, bf16, i));
}

/* out = x @ W.T (+ bias) for one row of x, as kernels/native.py's matmuls for one row. */
static int decode_linear(const DecodeLinear *l, const void *x, int bf16, void *out, int nthreads) {
    int rc;
    if (l->kind == LIN_W8) /* one row: int8_matmul's "precise" two roundings */
        rc = lv_w8a16(l->w, l->scale, l->N, l->K, l->Kp, x, l->K, bf16, 1, out, l->N, bf16, nthreads);
    else if (l->kind == LIN_Q4)
        rc = lv_q4a8(l->w, l->qscale, l->qoffset, l->qscale_f32, l->N, l->K, x, l->K, bf16, 1, out, l->N, bf16,
                     nthreads, 0);
    else
        rc = lv_q5a8(l->w, l->N, l->K, x, l->K, bf16, 1, out, l->N, bf16, nthreads, 0);
    if (rc || !l->bias) return rc;
    add_into(out, l->bias, l->N, bf16);
    return 0;
}

/* Scratch (in x's dtype) the step needs: see the layout in lv_decode_blocks. */
int64_t lv_decode_scratch(int64_t hidden, int heads, int kv_heads, int head_dim, int64_t intermediate) {
    return 2 * hidden + (int64_t)(2 * heads + 2 * kv_heads) * head_dim + 3 * intermediate;
}

/* hidden [hidden] (in place): one token at `position` through blocks[0 .. n), its keys and
 * values written at cache slot `slot`; the sequence's block table `table` (`width` entries)
 * then holds `position` + 1 keys. */
int lv_decode_blocks(const DecodeBlock *blocks, int n, void *hidden, int64_t hidden_size, int heads, int kv_heads,
                     int head_dim, int64_t intermediate, int bf16, int64_t position, int64_t slot,
                     const int32_t *table, int64_t width, int block_size, void *scratch, int nthreads) {
    const int64_t size = bf16 ? 2 : 4, q_size = (int64_t)heads * head_dim, kv_size = (int64_t)kv_heads * head_dim;
    char *at = scratch;
    void *normed = at;                              at += hidden_size * size;
    void *qkv = at;                                 at += (q_size + 2 * kv_size) * size;
    void *q = at;                                   at += q_size * size;
    void *delta = at;                               at += hidden_size * size;
    void *gate_up = at;                             at += 2 * intermediate * size;
    void *act = at;
    void *attn_out = gate_up; /* free while attention runs: 2 * intermediate >= q_size in every model here */
    const int32_t cu[2] = {0, 1}, lens[1] = {(int32_t)(position + 1)};
    if (2 * intermediate < q_size || hidden_size < kv_size) return -1;
    for (int i = 0; i < n; i++) {
        const DecodeBlock *b = &blocks[i];
        int rc;
        lv_rms_norm(hidden, b->input_norm, normed, 1, hidden_size, b->eps, bf16, 0);
        if ((rc = decode_linear(&b->qkv, normed, bf16, qkv, nthreads))) return rc;
        char *k = (char *)qkv + q_size * size, *v = k + kv_size * size;
        if (b->q_norm) {
            lv_rms_norm(qkv, b->q_norm, qkv, heads, head_dim, b->qk_eps, bf16, 0);
            lv_rms_norm(k, b->k_norm, k, kv_heads, head_dim, b->qk_eps, bf16, 0);
        }
        const float *rows = b->cos_sin + position * head_dim;
        const int dtype = bf16 ? KV_BF16 : KV_F32;
        lv_rope(qkv, q, rows, 1, heads, head_dim, q_size, bf16);
        if (b->kv_int8) { /* the rotated keys into the step's o-projection buffer (free until then) */
            lv_rope(k, delta, rows, 1, kv_heads, head_dim, kv_size, bf16);
            if ((rc = lv_kv_int8_store(delta, dtype, kv_size, b->key_offset, b->k_cache, &slot, 1, kv_heads, head_dim))
                || (rc = lv_kv_int8_store(v, dtype, kv_size, NULL, b->v_cache, &slot, 1, kv_heads, head_dim)))
                return rc;
        } else {
            lv_rope(k, (char *)b->k_cache + slot * kv_size * size, rows, 1, kv_heads, head_dim, kv_size, bf16);
            memcpy((char *)b->v_cache + slot * kv_size * size, v, (size_t)(kv_size * size));
        }
        rc = lv_paged_attention(q, b->k_cache, b->v_cache, attn_out, table, width, cu, lens, 1, heads, kv_heads,
                                head_dim, block_size, b->window, b->scale, dtype, b->kv_int8 ? KV_I8 : dtype, nthreads);
        if (rc || (rc = decode_linear(&b->o, attn_out, bf16, delta, nthreads))) return rc;
        add_into(hidden, delta, hidden_size, bf16);
        lv_rms_norm(hidden, b->post_norm, normed, 1, hidden_size, b->eps, bf16, 0);
        if ((rc = decode_linear(&b->gate_up, normed, bf16, gate_up, nthreads))) return rc;
        lv_silu_mul(gate_up, act, 1, intermediate, bf16);
        if ((rc = decode_linear(&b->down, act, bf16, delta, nthreads))) return rc;
        add_into(hidden, delta, hidden_size, bf16);
    }
    return 0;
}
