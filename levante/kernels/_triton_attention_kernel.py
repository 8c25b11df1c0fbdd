"""The Triton kernel behind `triton_attention.paged_attention_triton` (imports triton; load lazily).

One program per (sequence, query tile, KV head). Its tile is BLOCK_M rows: BLOCK_Q query
positions x the G query heads sharing that KV head (row r = position r // G, head r % G), so
K/V are read once for the whole group. It walks the keys the tile may see in TILE_N steps,
looking each key's slot up in the block table (any block size), with an online softmax in
float32 (flash-attention). Head dim is padded to D_PAD (a power of two) with masks.

Split-KV (flash-decoding), for decode steps with too few (sequence, KV head) programs to fill
the GPU: NUM_SPLITS > 1 makes program axis 1 a split of the key range instead of a query tile
(the step has one query tile), each split writes its unnormalised partial (max, sum, acc) to
scratch, and `combine_splits_kernel` merges them.
"""
import triton
import triton.language as tl


@triton.jit
def paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    part_m_ptr, part_l_ptr, part_acc_ptr,  # split-KV scratch [T, H, NUM_SPLITS(, D_PAD)] float32
    num_heads,
    qk_scale,  # softmax scale * log2(e): exp2 below
    window,  # sliding window (keys with p - j >= window are masked); only read when USE_WINDOW
    block_size,
    G: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # BLOCK_M // G query positions per tile
    TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: full-precision dots (no tf32)
    INTERPRET: tl.constexpr,  # running under TRITON_INTERPRET=1 (CPU tensors)
    NUM_SPLITS: tl.constexpr,  # 1: the whole key range here; > 1: program axis 1 is the split
):
    seq = tl.program_id(0)
    if NUM_SPLITS > 1:
        split = tl.program_id(1)
        q_tile = 0
    else:
        q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    tile_first = q_tile * BLOCK_Q
    if tile_first >= q_len:  # grid sized by max_q: shorter sequences have idle tiles
        return

    rows = tl.arange(0, BLOCK_M)
    q_idx = tile_first + rows // G  # query row within the sequence
    head = kv_head * G + rows % G
    row_ok = (rows < BLOCK_Q * G) & (q_idx < q_len)
    q_pos = seq_len - q_len + q_idx  # its position (negative: an inconsistent padding row, sees nothing)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM

    token = (q_start + q_idx).to(tl.int64)
    q_offs = token[:, None] * stride_qt + head[:, None].to(tl.int64) * stride_qh + d[None, :] * stride_qd
    qm = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_offs, mask=qm, other=0.0)

    # Keys this tile may see: [lo, hi).
    last_q = tl.minimum(tile_first + BLOCK_Q, q_len) - 1
    hi = tl.minimum(seq_len - q_len + last_q + 1, seq_len)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - q_len + tile_first - window + 1, 0)
        lo = (lo // TILE_N) * TILE_N
    hi = tl.maximum(hi, lo)
    if NUM_SPLITS > 1:  # this split's share, whole key tiles
        per = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), TILE_N) * TILE_N
        lo = lo + split * per
        hi = tl.maximum(tl.minimum(hi, lo + per), lo)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    kv_h_off = kv_head.to(tl.int64)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    n_tiles = tl.cdiv(hi - lo, TILE_N)
    if INTERPRET:
        # The interpreter's scalars are 1-element arrays, which recent numpy refuses as range() bounds.
        t = 0
        while t < n_tiles:
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, lo + t * TILE_N, hi, q_pos, row_ok, d, d_ok, bt_row, block_size,
                k_ptr, v_ptr, kv_h_off, stride_ks, stride_kh, stride_kd, stride_vs, stride_vh, stride_vd,
                qk_scale, window, TILE_N, USE_WINDOW, IEEE, INTERPRET)
            t += 1
    else:
        for t in range(0, n_tiles):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, lo + t * TILE_N, hi, q_pos, row_ok, d, d_ok, bt_row, block_size,
                k_ptr, v_ptr, kv_h_off, stride_ks, stride_kh, stride_kd, stride_vs, stride_vh, stride_vd,
                qk_scale, window, TILE_N, USE_WINDOW, IEEE, INTERPRET)

    if NUM_SPLITS > 1:
        part = (token * num_heads + head) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * D_PAD + d[None, :], acc, mask=row_ok[:, None])
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = tl.where((l_i > 0.0)[:, None], acc / l_safe[:, None], 0.0)
        o_offs = token[:, None] * stride_ot + head[:, None].to(tl.int64) * stride_oh + d[None, :] * stride_od
        tl.store(out_ptr + o_offs, o.to(out_ptr.dtype.element_ty), mask=qm)


@triton.jit
def combine_splits_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, stride_ot, stride_oh, stride_od,
                          num_heads, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """One program per (token, head): merge the splits' partial softmaxes (a row seeing nothing: zeros)."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (token * num_heads + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, D_PAD)
    m = tl.load(part_m_ptr + part)
    big = tl.max(m, axis=0)
    big = tl.where(big > float("-inf"), big, 0.0)
    w = tl.exp2(m - big)  # empty splits (m = -inf): 0, and their l/acc (maybe never written) are not used
    total = tl.sum(tl.where(w > 0.0, w * tl.load(part_l_ptr + part), 0.0), axis=0)
    acc = tl.load(part_acc_ptr + part[:, None] * D_PAD + d[None, :])
    acc = tl.sum(tl.where(w[:, None] > 0.0, w[:, None] * acc, 0.0), axis=0)
    o = tl.where(total > 0.0, acc / tl.where(total > 0.0, total, 1.0), 0.0)
    tl.store(out_ptr + token * stride_ot + head.to(tl.int64) * stride_oh + d * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _attend_tile(q, m_i, l_i, acc, j0, hi, q_pos, row_ok, d, d_ok, bt_row, block_size,
                 k_ptr, v_ptr, kv_h_off, stride_ks, stride_kh, stride_kd, stride_vs, stride_vh, stride_vd,
                 qk_scale, window, TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """Keys j0 .. j0 + TILE_N - 1 (those < hi) folded into the running softmax (m_i, l_i, acc)."""
    j = j0 + tl.arange(0, TILE_N)
    j_ok = j < hi
    blk = tl.load(bt_row + j // block_size, mask=j_ok, other=0).to(tl.int64)
    slot = blk * block_size + (j % block_size)

    k_offs = slot[None, :] * stride_ks + kv_h_off * stride_kh + d[:, None] * stride_kd
    k = tl.load(k_ptr + k_offs, mask=j_ok[None, :] & d_ok[:, None], other=0.0)  # [D_PAD, TILE_N]
    if INTERPRET:  # the interpreter's tl.dot mishandles bf16: products of 16-bit floats are exact in fp32
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale

    allowed = row_ok[:, None] & j_ok[None, :] & (j[None, :] <= q_pos[:, None])
    if USE_WINDOW:
        allowed = allowed & (q_pos[:, None] - j[None, :] < window)
    s = tl.where(allowed, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows with nothing yet: exp2(-inf) = 0, no NaN
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]

    v_offs = slot[:, None] * stride_vs + kv_h_off * stride_vh + d[None, :] * stride_vd
    v = tl.load(v_ptr + v_offs, mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # [TILE_N, D_PAD]
    p = p.to(v.dtype)
    if INTERPRET:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        acc += tl.dot(p, v, input_precision="ieee")
    else:
        acc += tl.dot(p, v)
    return m_new, l_i, acc
