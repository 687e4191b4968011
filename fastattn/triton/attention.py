"""FlashAttention-2 in Triton: softmax(Q·Kᵀ·scale + mask)·V, forward and backward.

Forward (one program per BLOCK_M query rows of one (batch, head)): the rows' Q tile stays in
registers while K/V tiles stream past; an online softmax keeps the running row max m and sum l,
rescaling the output accumulator when the max grows. The (Nq, Nk) score matrix never exists in
memory. The forward writes the output and the row log-sum-exp (lse, float32, natural log).

Backward (FlashAttention-2's split): a small kernel computes delta = rowsum(dO·O); a dK/dV kernel
(one program per BLOCK_N keys of one K/V head) recomputes P = exp(S - lse) block by block from Q,
K and lse and accumulates dV = Pᵀ·dO and dK = dSᵀ·Q·scale, dS = P·(dP - delta), dP = dO·Vᵀ; a dQ
kernel (one program per BLOCK_M query rows) accumulates dQ = dS·K·scale the same way. Extra memory:
lse and delta, O(B·H·N). No atomics: results are deterministic.

Conventions and details:
- Scores are handled in base 2: log2(e) is folded into the scale, exp2 replaces exp.
- Fully masked rows (every key masked, by attn_mask and/or is_causal): output 0, and lse = +inf, so
  the backward's exp2(s - lse) is exactly 0 there and the row gets zero gradients, never NaN.
- Causal is top-left aligned (query i sees keys j <= i), as torch's is_causal. Blocks wholly
  above the diagonal are never visited (about half the work). In the forward and dQ kernels the
  blocks wholly below it run without mask arithmetic and only those that straddle the diagonal
  (or the ragged end of the keys) apply the element masks; the dK/dV kernel applies the causal
  compare to every block it visits (one loop: see the kernel).
- GQA/MQA: query head h reads K/V head h // (Hq // Hkv) in place. The dK/dV program of a K/V
  head loops over the query heads of its group, so the group's sum is accumulated in registers:
  no per-query-head copies of K, V, dK or dV.
- attn_mask: a (B, Hq, Nq, Nk) view read through its strides (stride 0 where broadcast), bool
  (True = attend) or floating (added, converted to float32 in the kernel).
- Dropout: counter-based Philox 4x32-10 inside the kernels, the scheme every backend draws
  (fastattn/triton/dropout.py, csrc/dropout_rng.h): weight (b, h, i, j) takes output j % 4 of
  philox(key = seed, counter = (j // 4, i, b·Hq + h, 0)) and is kept iff it is >= the uint32
  threshold of p. 32-bit counters, so nothing overflows for any B·H·N². The backward regenerates
  the same decisions; ``dropout_keep_mask`` materialises them for tests.
- Head dims 1..256 (query/key and value dims may differ), padded to a power of two >= 16 with
  masked loads. q/k/v/dO with any strides whose last one is 1 are read in place (packed QKV
  views); a tensor with a strided last dim is copied once.
- fp16/bf16/fp32 inputs, fp32 accumulation; fp32 dots run in IEEE fp32 (not TF32) so float32
  results match the float64 oracle to ~1e-6.
- Launch configuration: autotuned over BLOCK_M/BLOCK_N/num_warps/num_stages for A100/H100, the
  candidate list pruned by head dim, causal and the device's shared memory; a single fixed
  configuration under the Triton interpreter or with FASTATTN_AUTOTUNE=0. The autotuning key is
  (Nq, Nk, head dims, causal, mask kind, dropout, dtypes).
- The kernels are torch ops (``fastattn_triton::attention_fwd`` / ``attention_bwd``, triton_op +
  wrap_triton) with autograd registered, so torch.compile(fullgraph=True) captures them.
"""

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastattn.ops import attention as attention_op
from fastattn.triton import dropout as _rng
from fastattn.triton.common import INTERPRETING as _INTERPRETING
from fastattn.triton.common import LN2, LN2_C, LOG2E, LOG2E_C, next_power_of_2  # noqa: F401  (LN2: kept public)
from fastattn.triton.common import SUPPORTED_DTYPES as _SUPPORTED_DTYPES
from fastattn.triton.common import capability as _capability
from fastattn.triton.common import shared_memory_limit as _shared_memory_limit
from fastattn.utils import empty, seed_arg

MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# device helpers (jit)
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a·b with fp32 accumulation. UPCAST_DOT (interpreter only) works around its bf16 tl.dot bug."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _dot_acc(a, b, acc, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a·b, written as the dot's accumulator operand (the wgmma accumulates in place)."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _load_tile(
    base,
    start,
    stride_row,
    n_rows,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    N_COLS: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    """Rows [start, start + ROWS) and columns [0, COLS) of a (n_rows, N_COLS) row-major matrix with
    unit column stride, zero-padded; (ROWS, COLS), or (COLS, ROWS) when TRANSPOSED. COLS may be
    below N_COLS (the first piece of a split head dim).

    The block start moves the base pointer in 64-bit arithmetic so that the per-element offsets
    stay small (32-bit) whatever the sequence length and row stride."""
    base = base + tl.cast(start, tl.int64) * stride_row
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    if TRANSPOSED:
        rows = rows[None, :]
        cols = cols[:, None]
    else:
        rows = rows[:, None]
        cols = cols[None, :]
    ptrs = base + rows * stride_row + cols
    if CHECK_ROWS:
        if COLS > N_COLS:
            tile = tl.load(ptrs, mask=(rows < n_rows - start) & (cols < N_COLS), other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows < n_rows - start, other=0.0)
    else:
        if COLS > N_COLS:
            tile = tl.load(ptrs, mask=cols < N_COLS, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _dropout_keep(seed, bh, rows, cols, dropout_p):
    """Keep decisions (True = kept) of the weights at (rows, cols) of head bh = b·Hq + h.

    rows, cols: broadcastable index tensors ([:, None] and [None, :], either way round).
    The one dropout scheme (fastattn/triton/dropout.py, csrc/dropout_rng.h): Philox stream bh, row
    i, column j, one Philox call per element."""
    return _rng.element_keep(seed, bh, rows, cols, dropout_p)


@triton.jit
def _mask_scores(
    s,
    q_idx,
    k_idx,
    start_m,
    start_n,
    mask_base,
    stride_mm,
    stride_mn,
    n_q,
    n_k,
    q_local,
    k_local,
    MASK_KIND: tl.constexpr,
    CHECK_KEYS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DIAGONAL: tl.constexpr,
):
    """Scores s (base 2) with attn_mask, the key bound and the causal mask applied (-inf = masked);
    the causal mask only where IS_CAUSAL and DIAGONAL (a block that straddles the diagonal).

    q_idx/k_idx: global query/key indices, q_local/k_local the same minus start_m/start_n (all
    broadcastable, in either orientation). MASK_KIND: 0 none, 1 bool (True = attend), 2 additive."""
    if MASK_KIND != 0:
        mask_ptr = mask_base + tl.cast(start_m, tl.int64) * stride_mm + tl.cast(start_n, tl.int64) * stride_mn
        mask_ptrs = mask_ptr + q_local * stride_mm + k_local * stride_mn
        in_bounds = (q_idx < n_q) & (k_idx < n_k)
        if MASK_KIND == 1:
            attend = tl.load(mask_ptrs, mask=in_bounds, other=0)
            s = tl.where(attend != 0, s, float("-inf"))
        else:
            bias = tl.load(mask_ptrs, mask=in_bounds, other=0.0)
            s = s + bias.to(tl.float32) * LOG2E_C
    if CHECK_KEYS:
        s = tl.where(k_idx < n_k, s, float("-inf"))
    if IS_CAUSAL:
        if DIAGONAL:
            s = tl.where(k_idx <= q_idx, s, float("-inf"))
    return s


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(
    acc, acc2, l_i, m_i, q, q2, k_base, v_base, mask_base, start_m, start_n, bh, seed, dropout_p, qk_scale2,
    n_q, n_k, stride_kn, stride_vn, stride_mm, stride_mn,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    EDGE: tl.constexpr, SCALE_FIRST: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over the keys [start_n, start_n + BLOCK_N). EDGE: a block on the
    causal diagonal or past the end of the keys, so the key bound and the causal compare apply.

    Masks turn scores into -inf before the row max, so the scale folds into the exponent's argument
    (one FFMA per score: qk·scale - m); an additive mask or a scale <= 0 or NaN (SCALE_FIRST) needs the
    scaled scores first (max(qk)·scale is not the max for a negative scale, -inf·0 is NaN).

    A head dim that is not a power of two runs as two power-of-two pieces (BLOCK_D2/BLOCK_DV2 > 0:
    q2, acc2 hold columns [BLOCK_D, HEAD_DIM) and [BLOCK_DV, HEAD_DIM_V)), so d96 computes 64 + 32
    columns, not 128; with BLOCK_D2/BLOCK_DV2 = 0, q2/acc2 are unused scalars."""
    q_local = tl.arange(0, BLOCK_M)[:, None]
    q_idx = start_m + q_local
    k_local = tl.arange(0, BLOCK_N)[None, :]
    k_idx = start_n + k_local
    k_t = _load_tile(k_base, start_n, stride_kn, n_k, BLOCK_N, BLOCK_D, HEAD_DIM, EDGE, True)
    qk = _dot(q, k_t, UPCAST_DOT, DOT_PRECISION)
    if BLOCK_D2 > 0:
        k2_t = _load_tile(k_base + BLOCK_D, start_n, stride_kn, n_k, BLOCK_N, BLOCK_D2, HEAD_DIM - BLOCK_D, EDGE, True)
        qk = _dot_acc(q2, k2_t, qk, UPCAST_DOT, DOT_PRECISION)
    if SCALE_FIRST:
        qk = qk * qk_scale2
    qk = _mask_scores(
        qk, q_idx, k_idx, start_m, start_n, mask_base, stride_mm, stride_mn, n_q, n_k, q_local, k_local,
        MASK_KIND, EDGE, IS_CAUSAL, EDGE,
    )
    if SCALE_FIRST:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale2)
    if MASK_KIND != 0 or EDGE:
        # a row with nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    if SCALE_FIRST:
        p = tl.math.exp2(qk - m_safe[:, None])
    else:
        p = tl.math.exp2(qk * qk_scale2 - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        # the normaliser l sums the undropped weights; dropout zeroes weights after softmax
        p = tl.where(_dropout_keep(seed, bh, q_idx, k_idx, dropout_p), p, 0.0)
    v = _load_tile(v_base, start_n, stride_vn, n_k, BLOCK_N, BLOCK_DV, HEAD_DIM_V, EDGE, False)
    acc = _dot_acc(p.to(v.dtype), v, acc, UPCAST_DOT, DOT_PRECISION)
    if BLOCK_DV2 > 0:
        v2 = _load_tile(v_base + BLOCK_DV, start_n, stride_vn, n_k, BLOCK_N, BLOCK_DV2, HEAD_DIM_V - BLOCK_DV, EDGE, False)
        acc2 = _dot_acc(p.to(v2.dtype), v2, acc2 * alpha[:, None], UPCAST_DOT, DOT_PRECISION)
    return acc, acc2, l_i, m_new


@triton.jit
def _edge_start(start_m, n_k, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """The first key of the blocks that need element masks: causal (top-left), the blocks on the
    diagonal of query rows [start_m, start_m + BLOCK_M) (EDGE_BLOCKS of them); otherwise the ragged
    last block (which may be empty). Every key below it is visible to every row of the program."""
    if IS_CAUSAL:
        return (tl.minimum(start_m, n_k) // BLOCK_N) * BLOCK_N
    return (n_k // BLOCK_N) * BLOCK_N


@triton.jit
def _fwd_key_blocks(
    acc, acc2, l_i, m_i, q, q2, k_base, v_base, mask_base, start_m, bh, seed, dropout_p, qk_scale2, n_q, n_k,
    stride_kn, stride_vn, stride_mm, stride_mn,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_D2: tl.constexpr, BLOCK_DV2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_K: tl.constexpr, SCALE_FIRST: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ONE_LOOP: tl.constexpr,
):
    """Online-softmax accumulation over every key block the query rows can see.

    The masked blocks (causal diagonal, ragged end) come first, unrolled at compile time from the
    zero accumulator, then one loop over the unmasked blocks below them. Why this order: with the
    masked blocks in a second loop, that loop's first wgmma took its accumulator either from the
    first loop's wgmma or from its zero-trip path, and ptxas serialised every wgmma of the kernel
    (C7515); a runtime branch inside one loop avoids that but crashes Triton 3.6's pipeliner."""
    if ONE_LOOP:
        # One loop over every visible block, each with the element masks: for tiles whose unrolled
        # prologue spills (wide heads, float32 without tensor cores, some sm_80 tiles; see
        # _candidates). The masks cost a select per score; the dots dominate at those widths.
        loop_end = tl.minimum(start_m + BLOCK_M, n_k) if IS_CAUSAL else n_k
    elif IS_CAUSAL or not EVEN_K:
        first_edge = _edge_start(start_m, n_k, BLOCK_N, IS_CAUSAL)
        # the diagonal spans ceil(BLOCK_M / BLOCK_N) key blocks (one when not causal: the ragged end)
        for i in tl.static_range((BLOCK_M + BLOCK_N - 1) // BLOCK_N if IS_CAUSAL else 1):
            acc, acc2, l_i, m_i = _fwd_block(
                acc, acc2, l_i, m_i, q, q2, k_base, v_base, mask_base, start_m, first_edge + i * BLOCK_N, bh, seed,
                dropout_p, qk_scale2, n_q, n_k, stride_kn, stride_vn, stride_mm, stride_mn,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_D2, BLOCK_DV2, BLOCK_M, BLOCK_N, MASK_KIND, DROPOUT,
                True, SCALE_FIRST, IS_CAUSAL, UPCAST_DOT, DOT_PRECISION,
            )
        loop_end = first_edge
    else:
        loop_end = n_k
    for start_n in range(0, loop_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, acc2, l_i, m_i = _fwd_block(
            acc, acc2, l_i, m_i, q, q2, k_base, v_base, mask_base, start_m, start_n, bh, seed,
            dropout_p, qk_scale2, n_q, n_k, stride_kn, stride_vn, stride_mm, stride_mn,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_D2, BLOCK_DV2, BLOCK_M, BLOCK_N, MASK_KIND, DROPOUT,
            ONE_LOOP and (IS_CAUSAL or not EVEN_K), SCALE_FIRST, IS_CAUSAL, UPCAST_DOT, DOT_PRECISION,
        )
    return acc, acc2, l_i, m_i


@triton.jit
def _store_rows(base, tile, rows, n_rows, stride_row, COLS: tl.constexpr, N_COLS: tl.constexpr):
    """tile (rows, COLS) into columns [0, N_COLS) of the rows below n_rows, in the output's dtype."""
    cols = tl.arange(0, COLS)
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS))


@triton.jit(do_not_specialize=["n_q_bucket", "n_k_bucket"])
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Mask,
    Out,
    Lse,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_ob,
    stride_oh,
    stride_om,
    n_heads_q,
    group_size,
    n_q,
    n_k,
    qk_scale2,
    dropout_p,
    Seed,
    n_q_bucket,
    n_k_bucket,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DROPOUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    SCALE_FIRST: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_LOOP: tl.constexpr = False,
    BLOCK_D2: tl.constexpr = 0,
    BLOCK_DV2: tl.constexpr = 0,
):
    # n_q_bucket/n_k_bucket: unused by the code, they are the autotuning key (see _tuned).
    # 1-D grid, query blocks fastest: neighbouring programs share one head's K/V in L2, and the grid
    # has no 65535 limit on B·H. Causal: the longest rows (most key blocks) start first.
    pid = tl.program_id(0)
    seed = 0
    if DROPOUT:  # the seed tensor drawn in the graph (no host sync, fresh under CUDA graphs)
        seed = tl.load(Seed)
    n_m_blocks = tl.cdiv(n_q, BLOCK_M)
    bh = pid // n_m_blocks
    m_block = pid % n_m_blocks
    if IS_CAUSAL:
        m_block = n_m_blocks - 1 - m_block
    b = bh // n_heads_q
    h = bh % n_heads_q
    h_kv = h // group_size
    start_m = m_block * BLOCK_M

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh

    q = _load_tile(q_base, start_m, stride_qm, n_q, BLOCK_M, BLOCK_D, HEAD_DIM, True, False)
    q2 = 0.0
    if BLOCK_D2 > 0:
        q2 = _load_tile(q_base + BLOCK_D, start_m, stride_qm, n_q, BLOCK_M, BLOCK_D2, HEAD_DIM - BLOCK_D, True, False)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc2 = 0.0
    if BLOCK_DV2 > 0:
        acc2 = tl.zeros([BLOCK_M, BLOCK_DV2], dtype=tl.float32)

    acc, acc2, l_i, m_i = _fwd_key_blocks(
        acc, acc2, l_i, m_i, q, q2, k_base, v_base, mask_base, start_m, bh, seed, dropout_p, qk_scale2, n_q, n_k,
        stride_kn, stride_vn, stride_mm, stride_mn,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_D2, BLOCK_DV2, BLOCK_M, BLOCK_N, MASK_KIND, DROPOUT,
        EVEN_K, SCALE_FIRST, IS_CAUSAL, UPCAST_DOT, DOT_PRECISION, ONE_LOOP,
    )

    # fully masked rows: l = 0, acc = 0 -> output 0 and lse = +inf
    empty_row = l_i == 0.0
    inv_l = 1.0 / tl.where(empty_row, 1.0, l_i)
    if DROPOUT:
        inv_l = inv_l * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty_row, float("inf"), (m_i + tl.math.log2(l_i)) * LN2_C)

    rows = start_m + tl.arange(0, BLOCK_M)
    out_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    _store_rows(out_base, acc * inv_l[:, None], rows, n_q, stride_om, BLOCK_DV, HEAD_DIM_V)
    if BLOCK_DV2 > 0:
        _store_rows(out_base + BLOCK_DV, acc2 * inv_l[:, None], rows, n_q, stride_om, BLOCK_DV2, HEAD_DIM_V - BLOCK_DV)
    tl.store(Lse + bh.to(tl.int64) * n_q + rows, lse, mask=rows < n_q)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(
    Out,
    DOut,
    Delta,
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    n_heads_q,
    n_q,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[row] = rowsum(dO·O) in float32 (= rowsum(P·dP), the softmax backward's correction)."""
    pid = tl.program_id(0)
    n_m_blocks = tl.cdiv(n_q, BLOCK_M)
    bh = pid // n_m_blocks
    start_m = (pid % n_m_blocks) * BLOCK_M
    b = bh // n_heads_q
    h = bh % n_heads_q
    o = _load_tile(
        Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh, start_m, stride_om, n_q,
        BLOCK_M, BLOCK_DV, HEAD_DIM_V, True, False,
    )
    do = _load_tile(
        DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, start_m, stride_dom, n_q,
        BLOCK_M, BLOCK_DV, HEAD_DIM_V, True, False,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = start_m + tl.arange(0, BLOCK_M)
    tl.store(Delta + bh.to(tl.int64) * n_q + rows, delta, mask=rows < n_q)


@triton.jit
def _dkdv_query_blocks(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    mask_base,
    start_n,
    lo,
    hi,
    bh,
    seed,
    dropout_p,
    qk_scale2,
    n_q,
    n_k,
    stride_qm,
    stride_dom,
    stride_mm,
    stride_mn,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DROPOUT: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK/dV accumulation of keys [start_n, start_n + BLOCK_N) over the query blocks [lo, hi) of
    one query head, in the transposed orientation (keys along rows): sᵀ = K·Qᵀ.

    Rows past n_q load lse = +inf, so their weights are 0; key rows past n_k are never stored."""
    k_local = tl.arange(0, BLOCK_N)[:, None]
    k_idx = start_n + k_local
    q_local_1d = tl.arange(0, BLOCK_M)
    q_local = q_local_1d[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        q_idx = start_m + q_local
        q_t = _load_tile(q_base, start_m, stride_qm, n_q, BLOCK_M, BLOCK_D, HEAD_DIM, True, True)
        s_t = _dot(k, q_t, UPCAST_DOT, DOT_PRECISION) * qk_scale2
        s_t = _mask_scores(
            s_t, q_idx, k_idx, start_m, start_n, mask_base, stride_mm, stride_mn, n_q, n_k, q_local, k_local,
            MASK_KIND, False, IS_CAUSAL, True,
        )
        rows_ok = start_m + q_local_1d < n_q
        lse2 = tl.load(lse_base + start_m + q_local_1d, mask=rows_ok, other=float("inf")) * LOG2E_C
        p_t = tl.math.exp2(s_t - lse2[None, :])
        do = _load_tile(do_base, start_m, stride_dom, n_q, BLOCK_M, BLOCK_DV, HEAD_DIM_V, True, False)
        dp_t = _dot(v, tl.trans(do), UPCAST_DOT, DOT_PRECISION)
        if DROPOUT:
            keep_t = _dropout_keep(seed, bh, q_idx, k_idx, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv += _dot(tl.where(keep_t, p_t * inv_keep, 0.0).to(do.dtype), do, UPCAST_DOT, DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
        else:
            dv += _dot(p_t.to(do.dtype), do, UPCAST_DOT, DOT_PRECISION)
        delta = tl.load(delta_base + start_m + q_local_1d, mask=rows_ok, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q_t.dtype), tl.trans(q_t), UPCAST_DOT, DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["n_q_bucket", "n_k_bucket"])
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    Mask,
    DOut,
    Lse,
    Delta,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dob,
    stride_doh,
    stride_dom,
    n_heads_q,
    n_heads_kv,
    group_size,
    n_q,
    n_k,
    scale,
    qk_scale2,
    dropout_p,
    Seed,
    n_q_bucket,
    n_k_bucket,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DROPOUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    SCALE_FIRST: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    seed = 0
    if DROPOUT:  # the seed tensor drawn in the graph (no host sync, fresh under CUDA graphs)
        seed = tl.load(Seed)
    n_n_blocks = tl.cdiv(n_k, BLOCK_N)
    bh_kv = pid // n_n_blocks
    start_n = (pid % n_n_blocks) * BLOCK_N
    b = bh_kv // n_heads_kv
    h_kv = bh_kv % n_heads_kv

    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    k = _load_tile(k_base, start_n, stride_kn, n_k, BLOCK_N, BLOCK_D, HEAD_DIM, True, False)
    v = _load_tile(v_base, start_n, stride_vn, n_k, BLOCK_N, BLOCK_DV, HEAD_DIM_V, True, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Causal: only rows i >= start_n see this key block, so the query blocks above it are skipped.
    # Unlike the forward and dQ kernels, the causal compare runs on every block visited: a second
    # loop copy for the diagonal blocks made ptxas spill here (dK, dV, K and V are all resident).
    if IS_CAUSAL:
        first_row = (start_n // BLOCK_M) * BLOCK_M
    else:
        first_row = 0

    # the query heads of this K/V head's group: their contributions sum in dk/dv (GQA/MQA)
    for g in range(group_size):
        h = h_kv * group_size + g
        bh = b * n_heads_q + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        lse_base = Lse + bh.to(tl.int64) * n_q
        delta_base = Delta + bh.to(tl.int64) * n_q
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, start_n, first_row, n_q,
            bh, seed, dropout_p, qk_scale2, n_q, n_k, stride_qm, stride_dom, stride_mm, stride_mn,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND, DROPOUT, IS_CAUSAL,
            UPCAST_DOT, DOT_PRECISION,
        )

    # dK and dV are written contiguous (B, Hkv, Nk, D)
    rows = start_n + tl.arange(0, BLOCK_N)[:, None]
    rows_ok = rows < n_k
    out_row = bh_kv.to(tl.int64) * n_k + rows
    cols = tl.arange(0, BLOCK_D)[None, :]
    tl.store(DK + out_row * HEAD_DIM + cols, (dk * scale).to(DK.dtype.element_ty), mask=rows_ok & (cols < HEAD_DIM))
    cols_v = tl.arange(0, BLOCK_DV)[None, :]
    tl.store(DV + out_row * HEAD_DIM_V + cols_v, dv.to(DV.dtype.element_ty), mask=rows_ok & (cols_v < HEAD_DIM_V))


@triton.jit
def _dq_block(
    dq, q, do, lse2, delta, k_base, v_base, mask_base, start_m, start_n, bh, seed, dropout_p, qk_scale2, n_q,
    n_k, stride_kn, stride_vn, stride_mm, stride_mn,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    EDGE: tl.constexpr, SCALE_FIRST: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ += dS·K over the keys [start_n, start_n + BLOCK_N); EDGE and the masks as in _fwd_block."""
    q_local = tl.arange(0, BLOCK_M)[:, None]
    q_idx = start_m + q_local
    k_local = tl.arange(0, BLOCK_N)[None, :]
    k_idx = start_n + k_local
    k_t = _load_tile(k_base, start_n, stride_kn, n_k, BLOCK_N, BLOCK_D, HEAD_DIM, EDGE, True)
    v_t = _load_tile(v_base, start_n, stride_vn, n_k, BLOCK_N, BLOCK_DV, HEAD_DIM_V, EDGE, True)
    qk = _dot(q, k_t, UPCAST_DOT, DOT_PRECISION)
    if SCALE_FIRST:
        qk = qk * qk_scale2
    qk = _mask_scores(
        qk, q_idx, k_idx, start_m, start_n, mask_base, stride_mm, stride_mn, n_q, n_k, q_local, k_local,
        MASK_KIND, EDGE, IS_CAUSAL, EDGE,
    )
    if SCALE_FIRST:
        p = tl.math.exp2(qk - lse2[:, None])
    else:
        p = tl.math.exp2(qk * qk_scale2 - lse2[:, None])
    dp = _dot(do, v_t, UPCAST_DOT, DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, q_idx, k_idx, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    return _dot_acc(ds.to(k_t.dtype), tl.trans(k_t), dq, UPCAST_DOT, DOT_PRECISION)


@triton.jit
def _dq_key_blocks(
    dq, q, do, lse2, delta, k_base, v_base, mask_base, start_m, bh, seed, dropout_p, qk_scale2, n_q, n_k,
    stride_kn, stride_vn, stride_mm, stride_mn,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    EVEN_K: tl.constexpr, SCALE_FIRST: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ONE_LOOP: tl.constexpr,
):
    """dQ accumulation of query rows [start_m, start_m + BLOCK_M) over the key blocks they see: the
    masked blocks first, unrolled, then one loop over the unmasked ones (see _fwd_key_blocks)."""
    if ONE_LOOP:  # as in _fwd_key_blocks
        loop_end = tl.minimum(start_m + BLOCK_M, n_k) if IS_CAUSAL else n_k
    elif IS_CAUSAL or not EVEN_K:
        first_edge = _edge_start(start_m, n_k, BLOCK_N, IS_CAUSAL)
        for i in tl.static_range((BLOCK_M + BLOCK_N - 1) // BLOCK_N if IS_CAUSAL else 1):
            dq = _dq_block(
                dq, q, do, lse2, delta, k_base, v_base, mask_base, start_m, first_edge + i * BLOCK_N, bh, seed,
                dropout_p, qk_scale2, n_q, n_k, stride_kn, stride_vn, stride_mm, stride_mn,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND, DROPOUT,
                True, SCALE_FIRST, IS_CAUSAL, UPCAST_DOT, DOT_PRECISION,
            )
        loop_end = first_edge
    else:
        loop_end = n_k
    for start_n in range(0, loop_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        dq = _dq_block(
            dq, q, do, lse2, delta, k_base, v_base, mask_base, start_m, start_n, bh, seed,
            dropout_p, qk_scale2, n_q, n_k, stride_kn, stride_vn, stride_mm, stride_mn,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND, DROPOUT,
            ONE_LOOP and (IS_CAUSAL or not EVEN_K), SCALE_FIRST, IS_CAUSAL, UPCAST_DOT, DOT_PRECISION,
        )
    return dq


@triton.jit(do_not_specialize=["n_q_bucket", "n_k_bucket"])
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    Mask,
    DOut,
    Lse,
    Delta,
    DQ,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_mb,
    stride_mh,
    stride_mm,
    stride_mn,
    stride_dob,
    stride_doh,
    stride_dom,
    n_heads_q,
    group_size,
    n_q,
    n_k,
    scale,
    qk_scale2,
    dropout_p,
    Seed,
    n_q_bucket,
    n_k_bucket,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DROPOUT: tl.constexpr,
    EVEN_K: tl.constexpr,
    SCALE_FIRST: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_LOOP: tl.constexpr = False,
):
    pid = tl.program_id(0)
    seed = 0
    if DROPOUT:  # the seed tensor drawn in the graph (no host sync, fresh under CUDA graphs)
        seed = tl.load(Seed)
    n_m_blocks = tl.cdiv(n_q, BLOCK_M)
    bh = pid // n_m_blocks
    m_block = pid % n_m_blocks
    if IS_CAUSAL:
        m_block = n_m_blocks - 1 - m_block
    b = bh // n_heads_q
    h = bh % n_heads_q
    h_kv = h // group_size
    start_m = m_block * BLOCK_M

    q = _load_tile(
        Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, start_m, stride_qm, n_q,
        BLOCK_M, BLOCK_D, HEAD_DIM, True, False,
    )
    do = _load_tile(
        DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, start_m, stride_dom, n_q,
        BLOCK_M, BLOCK_DV, HEAD_DIM_V, True, False,
    )
    rows = start_m + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_q
    lse2 = tl.load(Lse + bh.to(tl.int64) * n_q + rows, mask=rows_ok, other=float("inf")) * LOG2E_C
    delta = tl.load(Delta + bh.to(tl.int64) * n_q + rows, mask=rows_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    mask_base = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    dq = _dq_key_blocks(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, start_m, bh, seed, dropout_p, qk_scale2, n_q, n_k,
        stride_kn, stride_vn, stride_mm, stride_mn,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, MASK_KIND, DROPOUT,
        EVEN_K, SCALE_FIRST, IS_CAUSAL, UPCAST_DOT, DOT_PRECISION, ONE_LOOP,
    )

    # dQ is written contiguous (B, Hq, Nq, D)
    out_row = bh.to(tl.int64) * n_q + rows[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    tl.store(DQ + out_row * HEAD_DIM + cols, (dq * scale).to(DQ.dtype.element_ty), mask=rows_ok[:, None] & (cols < HEAD_DIM))


@triton.jit
def _dropout_keep_kernel(Keep, n_heads_q, n_q, n_k, dropout_p, Seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Materialise the attention kernels' dropout keep mask (B, Hq, Nq, Nk) (tests, debugging)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    keep = _dropout_keep(tl.load(Seed), bh, rows, cols, dropout_p)
    ptrs = Keep + (bh.to(tl.int64) * n_q + rows) * n_k + cols
    tl.store(ptrs, keep, mask=(rows < n_q) & (cols < n_k))


# --------------------------------------------------------------------------------------------
# launch configurations
# --------------------------------------------------------------------------------------------

# Under the interpreter: small blocks so that the tests' short sequences still span several
# blocks, diagonal blocks and ragged ends (BLOCK_M != BLOCK_N on purpose).
_INTERPRETER_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def _autotuning() -> bool:
    return not _INTERPRETING and os.environ.get("FASTATTN_AUTOTUNE", "1") != "0"


def _stages(block_d: int) -> tuple[int, ...]:
    """Pipeline depths worth trying: deeper for small heads, 2 for 256-wide ones (at 1 stage the
    K/V tiles are loaded through registers, not cp.async, and every 256-wide tile spilled)."""
    if block_d <= 64:
        return (2, 3, 4)
    if block_d <= 128:
        return (2, 3)
    return (2,)


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    warps: int
    stages: int
    one_loop: bool = False  # ONE_LOOP: no unrolled masked prologue (see _fwd_key_blocks)


# 16-bit inputs (tensor cores): (BLOCK_M, BLOCK_N, warps, ONE_LOOP[, stages]) per (architecture, kind,
# head width, causal), the spill-free tiles of `make check-sass` sweeps compiled with Triton 3.6 and
# 3.9 (benchmarks/NOTES.md). Hopper's wgmma keeps operands in shared memory; sm_80's mma.sync holds
# them in registers, so its lists are narrower. Causal 128-row tiles take 8 warps (at 4 the unrolled
# diagonal spilled); 256-wide heads and some sm_80 dQ tiles run ONE_LOOP (the prologue spilled).
_F, _T = False, True
_BLOCKS_16BIT = {
    (90, "fwd", 64, _F): [(128, 128, 8, _F), (128, 64, 4, _F), (128, 32, 4, _F), (64, 64, 4, _F), (64, 32, 4, _F)],
    (90, "fwd", 64, _T): [(128, 128, 8, _F), (128, 64, 8, _F), (128, 32, 4, _F), (64, 64, 4, _F), (64, 32, 4, _F)],
    (90, "fwd", 128, _F): [(128, 128, 8, _F), (128, 64, 8, _F), (128, 32, 8, _F), (64, 64, 4, _F), (64, 32, 4, _F)],
    (90, "fwd", 128, _T): [(128, 128, 8, _F), (128, 64, 8, _F), (128, 32, 8, _F), (64, 64, 4, _F), (64, 32, 4, _F)],
    (90, "fwd", 256, _F): [(128, 64, 8, _T), (128, 32, 8, _T), (64, 64, 8, _T), (64, 32, 8, _T)],
    (90, "fwd", 256, _T): [(128, 64, 8, _T), (128, 32, 8, _T), (64, 64, 8, _T), (64, 32, 8, _T)],
    (90, "dkdv", 64, None): [(32, 128, 8, _F), (32, 64, 4, _F), (16, 128, 8, _F)],
    (90, "dkdv", 128, None): [(32, 128, 8, _F), (32, 64, 8, _F), (16, 128, 8, _F)],
    (90, "dkdv", 256, None): [(32, 32, 8, _F), (16, 32, 8, _F)],
    (90, "dq", 64, _F): [(128, 64, 4, _F), (128, 32, 4, _F), (64, 64, 4, _F), (64, 32, 4, _F)],
    (90, "dq", 64, _T): [(128, 64, 8, _F), (128, 32, 4, _F), (64, 64, 4, _F), (64, 32, 4, _F)],
    (90, "dq", 128, _F): [(128, 64, 8, _F), (128, 32, 8, _F), (64, 64, 4, _F), (64, 32, 4, _F)],
    (90, "dq", 128, _T): [(128, 64, 8, _F), (128, 32, 8, _F), (64, 64, 4, _F), (64, 32, 4, _F)],
    (90, "dq", 256, _F): [(64, 64, 8, _T), (64, 32, 8, _T), (32, 32, 8, _T)],
    (90, "dq", 256, _T): [(64, 32, 8, _T), (32, 32, 8, _T)],
    (80, "fwd", 64, _F): [(128, 128, 8, _F), (128, 64, 4, _F), (128, 32, 4, _F), (64, 64, 4, _F), (64, 32, 4, _F)],
    (80, "fwd", 64, _T): [(128, 128, 8, _F), (128, 64, 8, _F), (128, 32, 8, _F), (64, 64, 4, _F), (64, 32, 4, _F)],
    (80, "fwd", 128, _F): [(128, 64, 8, _F), (128, 32, 8, _F), (64, 64, 4, _F), (64, 32, 4, _F)],
    (80, "fwd", 128, _T): [(128, 64, 8, _F), (128, 32, 8, _F), (64, 64, 8, _F), (64, 32, 8, _F)],
    (80, "fwd", 256, _F): [(64, 64, 8, _T), (64, 32, 8, _T)],
    (80, "fwd", 256, _T): [(64, 64, 8, _T), (64, 32, 8, _T)],
    # sm_80 d64 dK/dV: 3 and 4 stages spilled 12 B with Triton 3.6
    (80, "dkdv", 64, None): [(32, 128, 8, _F, (2,)), (32, 64, 4, _F, (2,)), (16, 128, 8, _F)],
    (80, "dkdv", 128, None): [(32, 64, 8, _F), (16, 64, 4, _F)],
    (80, "dkdv", 256, None): [(32, 32, 8, _F), (16, 32, 8, _F)],
    (80, "dq", 64, _F): [(128, 32, 4, _F), (64, 32, 4, _F)],
    (80, "dq", 64, _T): [(128, 32, 4, _T), (64, 32, 4, _F), (32, 64, 4, _F)],
    # 64x64 at 4 warps spilled 12 B with a 96-wide head padded to 128 (the column masks' registers)
    (80, "dq", 128, _F): [(128, 32, 8, _F, (2,)), (64, 64, 8, _F, (2,)), (64, 32, 4, _F)],
    (80, "dq", 128, _T): [(128, 32, 8, _T, (2,)), (64, 64, 8, _T, (2,)), (64, 32, 4, _T, (2,)), (32, 32, 4, _F)],
    (80, "dq", 256, _F): [(64, 32, 8, _T), (32, 32, 8, _T)],
    (80, "dq", 256, _T): [(64, 32, 8, _T), (32, 32, 8, _T)],
}

# float32 (IEEE dots on CUDA cores, operands in registers, no wgmma to serialise): every tile runs
# ONE_LOOP, at 2 stages; (BLOCK_M, BLOCK_N, warps) by head width up to 64, 128 and 256, spill-free on
# sm_80 and sm_90a in the same sweeps.
_FP32_BLOCKS = {
    "fwd": {64: [(64, 32, 8), (64, 16, 4), (32, 32, 4)], 128: [(64, 32, 8), (32, 16, 4), (16, 32, 4)],
            256: [(32, 32, 8), (16, 32, 4), (16, 16, 4)]},
    "dkdv": {64: [(32, 32, 8), (16, 32, 8), (16, 64, 4)], 128: [(16, 32, 8), (16, 16, 4)],
             256: [(16, 32, 8), (16, 16, 4)]},
    "dq": {64: [(64, 32, 8), (32, 32, 4), (64, 16, 4)], 128: [(32, 16, 4), (32, 32, 4), (16, 32, 4)],
           256: [(32, 16, 4), (16, 32, 4), (16, 16, 4)]},
}


# ... but for causal rows the compare's live registers tip these over (1492 B spilled on sm_90a)
_FP32_CAUSAL_SPILLS = {("fwd", 128, 64, 32, 8)}


def _width(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def _candidates(
    kind: str, block_d: int, block_dv: int, is_causal: bool, elem_bytes: int,
    smem_limit: int | None = None, capability: int | None = None,
) -> list[LaunchConfig]:
    """The autotune candidates of ``kind`` for the current GPU (or ``capability``), pruned by
    head width, causal and shared memory.

    The lists come from compiling candidates for sm_80 and sm_90a with Triton 3.6 and 3.9 and
    reading ptxas' report (``make check-sass``, table in benchmarks/results/static/): tiles that
    spill are left out. Shared memory: a candidate is dropped here only when its pipelined tiles
    alone exceed the device's limit (``smem_limit``, default the current GPU's), a lower bound of
    what it needs; whether one that passes fits is decided by its compiled size (Triton raises
    OutOfResources for a compiled kernel over the limit, and the autotuner skips it). d128 128x128
    at 3 stages compiles to 224 KiB and fits the H100/H200's 227 KiB. Which of the rest is fastest
    is the autotuner's call."""
    width = _width(max(block_d, block_dv))
    if elem_bytes == 4:
        blocks = [(m, n, warps, True, (2,)) for m, n, warps in _FP32_BLOCKS[kind][width]
                  if not (is_causal and (kind, width, m, n, warps) in _FP32_CAUSAL_SPILLS)]
    else:
        arch = 90 if (_capability() if capability is None else capability) >= 90 else 80
        blocks = _BLOCKS_16BIT[(arch, kind, width, None if kind == "dkdv" else bool(is_causal))]
        if arch == 80 and kind == "fwd" and is_causal and block_d & (block_d - 1):
            # a split head (96 = 64 + 32) on sm_80: the causal 128-row prologues spilled 24-32 B (Triton 3.9
            # 128x64, 3.6 128x32); one loop does not
            blocks = [(m, n, w, True if m == 128 else one, *st) for m, n, w, one, *st in blocks]
    limit = _shared_memory_limit() if smem_limit is None else smem_limit
    out = []
    for block_m, block_n, warps, one_loop, *stages in blocks:
        qk_v = block_d + block_dv
        if kind == "fwd":  # Q resident, K/V streamed, O accumulated
            resident, streamed = block_m * block_d, block_n * qk_v
        elif kind == "dkdv":  # K/V resident, Q/dO streamed, dK/dV accumulated
            resident, streamed = block_n * qk_v, block_m * qk_v
        else:  # Q/dO resident, K/V streamed, dQ accumulated
            resident, streamed = block_m * qk_v, block_n * qk_v
        # causal forward/dQ: the unrolled diagonal blocks before the loop hold one more K/V tile
        prologue = 1 if is_causal and kind != "dkdv" and not one_loop else 0
        for n_stages in stages[0] if stages else _stages(width):
            # Triton's pipeliner keeps stages - 1 tiles in flight next to the one being consumed
            if limit and (resident + (n_stages + prologue) * streamed) * elem_bytes > limit:
                continue
            out.append(LaunchConfig(block_m, block_n, warps, n_stages, one_loop))
    return out


# The configuration used without autotuning (FASTATTN_AUTOTUNE=0): (BLOCK_M, BLOCK_N) for heads up
# to 128 wide and above, at 2 stages.
_DEFAULT_BLOCKS = {"fwd": ((128, 64), (64, 64)), "dkdv": ((32, 64), (32, 32)), "dq": ((128, 32), (64, 32))}

# Decode-shaped forward calls (a few query rows over a KV cache whose length grows by one per token)
# run one fixed configuration: autotuning them would re-tune at every new cache length. 16 query rows
# is the smallest tile tl.dot takes; 64-key blocks keep the K/V stream pipelined.
DECODE_MAX_QUERIES = 16
_DECODE_CONFIG = LaunchConfig(16, 64, 4, 2)
# float32 decode: 16x64 tiles spilled (CUDA-core dots hold both operands in registers)
_DECODE_CONFIG_FP32 = LaunchConfig(16, 32, 4, 2, one_loop=True)

# Autotuning keys: the sequence lengths are bucketed (next power of two) so a new length re-tunes only
# when it crosses a bucket, plus everything that changes the compiled kernel.
_TUNING_KEY = ["n_q_bucket", "n_k_bucket", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "MASK_KIND", "DROPOUT", "EVEN_K"]


def length_bucket(n):
    """The autotuning key of a sequence length: the next power of two (at least 16). Symbolic sizes
    (torch.compile with dynamic shapes) get a linear bucket of 256, which Inductor can compute."""
    if isinstance(n, int):
        return max(16, next_power_of_2(n))
    return (n + 255) // 256 * 256


def _kernel_configs(
    kind: str, block_d: int, block_dv: int, is_causal: bool, elem_bytes: int,
    autotune: bool | None = None, smem_limit: int | None = None, capability: int | None = None,
) -> list[LaunchConfig]:
    """The launch configs of the kernel of ``kind``: the autotune candidates, or one fixed config
    without autotuning (FASTATTN_AUTOTUNE=0, or ``autotune=False``) and for decode-shaped calls."""
    if _INTERPRETING:
        block_m, block_n = _INTERPRETER_BLOCKS["fwd" if kind == "decode" else kind]
        return [LaunchConfig(block_m, block_n, 4, 1)]
    if kind == "decode":
        return [_DECODE_CONFIG_FP32 if elem_bytes == 4 else _DECODE_CONFIG]
    candidates = _candidates(kind, block_d, block_dv, is_causal, elem_bytes, smem_limit, capability)
    if not (_autotuning() if autotune is None else autotune):
        narrow, wide = _DEFAULT_BLOCKS[kind]
        blocks = wide if max(block_d, block_dv) > 128 else narrow
        chosen = [c for c in candidates if (c.block_m, c.block_n) == blocks and c.stages <= 2]
        candidates = chosen[-1:] or candidates[:1]
    return candidates


def triton_config(kind: str, config: LaunchConfig) -> triton.Config:
    """The triton.Config of a launch config (the dK/dV kernel has no ONE_LOOP: a single loop always)."""
    kwargs = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n}
    if kind != "dkdv":
        kwargs["ONE_LOOP"] = config.one_loop
    return triton.Config(kwargs, num_warps=config.warps, num_stages=config.stages)


@functools.cache
def _tuned(kind: str, block_d: int, block_dv: int, is_causal: bool, elem_bytes: int):
    """The kernel of ``kind`` ("fwd", "decode", "dkdv", "dq") wrapped in an Autotuner over its
    configs (one config when not autotuning or decoding: Triton does not benchmark a single one)."""
    kernel = {"fwd": _attn_fwd_kernel, "decode": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[kind]
    configs = [triton_config(kind, c) for c in _kernel_configs(kind, block_d, block_dv, is_causal, elem_bytes)]
    return triton.autotune(configs=configs, key=_TUNING_KEY)(kernel)


def tuned_kernels():
    """{(kind, block_d, block_dv, is_causal, elem_bytes): Autotuner} of every kernel launched so far
    (benchmarks read the chosen configs from each Autotuner's cache; tests count the tunings)."""
    return {args: _tuned(*args) for args in _launched}


_launched: set = set()


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def _block_dim(d: int) -> int:
    return max(16, next_power_of_2(d))


def _head_pieces(d: int) -> tuple[int, int]:
    """The forward's head-dim pieces (first, second): two powers of two when they cover d with
    fewer columns than the next power of two (80 = 64 + 16, 96 = 64 + 32, 160 = 128 + 32,
    192 = 128 + 64), else (next power of two, 0). tl.arange and tl.dot need power-of-two sizes."""
    padded = _block_dim(d)
    first = max(16, 1 << (d.bit_length() - 1))
    if first >= d:
        return padded, 0
    second = _block_dim(d - first)
    return (first, second) if first + second < padded else (padded, 0)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels read rows with unit column stride; any other layout is kept as is."""
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def _mask_args(mask: torch.Tensor | None, like: torch.Tensor):
    """(kind, tensor, strides) for the kernels: kind 0 none, 1 bool, 2 additive float."""
    if mask is None:
        return 0, like, (0, 0, 0, 0)
    return (1 if mask.dtype == torch.bool else 2), mask, tuple(mask.stride())


def _meta(q, k, v, mask_kind, is_causal, dropout_p, scale):
    """The kernels' compile-time arguments. Head dims become Python ints: under torch.compile with
    dynamic shapes they are specialised (they are constexprs of the kernels anyway)."""
    head_dim, head_dim_v = int(q.size(-1)), int(v.size(-1))
    k_len = k.size(2)
    return {
        "HEAD_DIM": head_dim,
        "HEAD_DIM_V": head_dim_v,
        "BLOCK_D": _block_dim(head_dim),
        "BLOCK_DV": _block_dim(head_dim_v),
        "IS_CAUSAL": bool(is_causal),
        "MASK_KIND": mask_kind,
        "DROPOUT": dropout_p > 0.0,
        # 128 is the largest BLOCK_N of any candidate: every key block is full, no bound checks
        "EVEN_K": isinstance(k_len, int) and k_len % 128 == 0,
        # an additive mask, or a scale <= 0 (max(qk)·scale is then not the max of the scores, -inf·0 is NaN),
        # or NaN (masked scores must stay -inf, not -inf·NaN, so a fully masked row still gives zeros)
        "SCALE_FIRST": mask_kind == 2 or not scale > 0,
        "UPCAST_DOT": _INTERPRETING and q.dtype == torch.bfloat16,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _tuned_for(kind, meta, q):
    # the tile lists and shared-memory bounds see the columns computed (both pieces of a split head)
    block_d, block_dv = meta["BLOCK_D"] + meta.get("BLOCK_D2", 0), meta["BLOCK_DV"] + meta.get("BLOCK_DV2", 0)
    args = (kind, block_d, block_dv, meta["IS_CAUSAL"], q.element_size())
    _launched.add(args)
    return _tuned(*args)


@triton_op("fastattn_triton::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Nq, Dv), lse (B, Hq, Nq) float32 natural log, +inf on fully masked rows)."""
    batch, heads_q, n_q, _ = q.shape
    heads_kv, n_k = k.size(1), k.size(2)
    out = empty(batch, heads_q, n_q, v.size(-1), dtype=q.dtype, device=q.device)
    lse = empty(batch, heads_q, n_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if n_k == 0:  # no key to attend: every row is fully masked
        return out.zero_(), lse.fill_(float("inf"))
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    mask_kind, mask_arg, mask_strides = _mask_args(mask, q)
    meta = _meta(q, k, v, mask_kind, is_causal, dropout_p, scale)
    # the forward splits a non-power-of-two head dim into two pieces (the backward pads it)
    meta["BLOCK_D"], meta["BLOCK_D2"] = _head_pieces(meta["HEAD_DIM"])
    meta["BLOCK_DV"], meta["BLOCK_DV2"] = _head_pieces(meta["HEAD_DIM_V"])
    kind = "decode" if isinstance(n_q, int) and n_q <= DECODE_MAX_QUERIES else "fwd"
    grid = lambda m: (triton.cdiv(n_q, m["BLOCK_M"]) * batch * heads_q,)  # noqa: E731
    wrap_triton(_tuned_for(kind, meta, q))[grid](
        q, k, v, mask_arg, out, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *out.stride()[:3],
        heads_q, heads_q // heads_kv, n_q, n_k, scale * LOG2E, dropout_p, seed_arg(seed, dropout_p, q),
        length_bucket(n_q), length_bucket(n_k), **meta,
    )
    return out, lse


@triton_op("fastattn_triton::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
    need_dq: bool,
    need_dkdv: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) laid out contiguous; a gradient not asked for is an empty (0,) tensor."""
    batch, heads_q, n_q, _ = q.shape
    heads_kv, n_k = k.size(1), k.size(2)
    nothing = q.new_empty(0)
    dq = empty(*q.shape, dtype=q.dtype, device=q.device) if need_dq else nothing
    dk = empty(*k.shape, dtype=k.dtype, device=k.device) if need_dkdv else q.new_empty(0)
    dv = empty(*v.shape, dtype=v.dtype, device=v.device) if need_dkdv else q.new_empty(0)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0 or n_q == 0 or n_k == 0:
        # nothing to attend or nobody attending: all gradients are zero
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout, q, k, v = (_unit_last_stride(t) for t in (dout, q, k, v))
    mask_kind, mask_arg, mask_strides = _mask_args(mask, q)
    meta = _meta(q, k, v, mask_kind, is_causal, dropout_p, scale)
    group_size = heads_q // heads_kv
    buckets = (length_bucket(n_q), length_bucket(n_k))
    seed_ptr = seed_arg(seed, dropout_p, q)

    delta = empty(batch, heads_q, n_q, dtype=torch.float32, device=q.device)
    # the O and dO tiles of a block stay in registers: 8K elements each (ptxas spills fp32 d256 at 32K)
    delta_block = 64 if _INTERPRETING else max(16, min(128, 8192 // meta["BLOCK_DV"]))
    wrap_triton(_attn_bwd_delta_kernel)[(triton.cdiv(n_q, delta_block) * batch * heads_q,)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], heads_q, n_q,
        HEAD_DIM_V=meta["HEAD_DIM_V"], BLOCK_DV=meta["BLOCK_DV"], BLOCK_M=delta_block,
    )
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *dout.stride()[:3])
    if need_dkdv:
        grid = lambda m: (triton.cdiv(n_k, m["BLOCK_N"]) * batch * heads_kv,)  # noqa: E731
        wrap_triton(_tuned_for("dkdv", meta, q))[grid](
            q, k, v, mask_arg, dout, lse, delta, dk, dv, *strides,
            heads_q, heads_kv, group_size, n_q, n_k, scale, scale * LOG2E, dropout_p, seed_ptr, *buckets, **meta,
        )
    if need_dq:
        grid = lambda m: (triton.cdiv(n_q, m["BLOCK_M"]) * batch * heads_q,)  # noqa: E731
        wrap_triton(_tuned_for("dq", meta, q))[grid](
            q, k, v, mask_arg, dout, lse, delta, dq, *strides,
            heads_q, group_size, n_q, n_k, scale, scale * LOG2E, dropout_p, seed_ptr, *buckets, **meta,
        )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# the kernel provider (protocol in fastattn/ops/attention.py)
# --------------------------------------------------------------------------------------------


class Kernels:
    native_autograd = False
    forward_op = "fastattn_triton::attention_fwd"

    def supports(self, call) -> str | None:
        """None when the triton kernels can serve a call with these facts, else why not."""
        if call.dtype not in _SUPPORTED_DTYPES:
            return f"the triton attention kernel takes float16, bfloat16 or float32, not {call.dtype}"
        if max(call.head_dim, call.head_dim_v) > MAX_HEAD_DIM:
            return f"head dim {max(call.head_dim, call.head_dim_v)} > {MAX_HEAD_DIM}, the largest the triton attention kernel tiles"
        if call.mask_needs_grad:
            return "the triton attention kernel gives no gradient for attn_mask, and this one requires grad"
        return attention_op.unsupported_feature(call)

    def forward(self, p, q, k, v):
        return attention_fwd(q, k, v, p.mask, p.scale, p.is_causal, p.dropout_p, p.seed)

    def backward(self, p, dout, q, k, v, out, lse, need_dq, need_dkdv):
        return attention_bwd(dout, q, k, v, out, lse, p.mask, p.scale, p.is_causal, p.dropout_p, p.seed, need_dq, need_dkdv)

    def dropout_keep_mask(self, shape, dropout_p, seed, device):
        return dropout_keep_mask(seed, *shape, dropout_p, device)


def dropout_keep_mask(seed, batch: int, heads_q: int, n_q: int, n_k: int, dropout_p: float, device) -> torch.Tensor:
    """The exact keep mask (bool (B, Hq, Nq, Nk), True = kept) the kernels draw for ``seed`` (an int,
    or the seed tensor the op takes), so a test can run reference.attention(..., dropout_mask=mask)
    against them."""
    keep = torch.empty(batch, heads_q, n_q, n_k, dtype=torch.bool, device=device)
    if keep.numel() == 0:
        return keep
    block_m, block_n = 32, 32
    grid = (triton.cdiv(n_q, block_m), triton.cdiv(n_k, block_n), batch * heads_q)
    seed = seed.to(device) if isinstance(seed, torch.Tensor) else torch.tensor([int(seed)], dtype=torch.int64, device=device)
    _dropout_keep_kernel[grid](keep, heads_q, n_q, n_k, float(dropout_p), seed, BLOCK_M=block_m, BLOCK_N=block_n)
    return keep


KERNELS = {"attention": attention_op.bind(Kernels())}
