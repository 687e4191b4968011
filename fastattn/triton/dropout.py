"""The dropout RNG of the Triton kernels: csrc/dropout_rng.h's scheme, the one every backend draws.

Philox 4x32-10 (``tl.philox``, 10 rounds, the constants of Salmon et al. 2011, as Random123 and
cuRAND). A dropout shape is read as (S, R, C): C its last dim, R the one before, S the product of
the others; for the attention weights (B, Hq, Nq, Nk) the stream is s = b·Hq + h, row i, column
j; for the FFN activation (M, hidden) the stream is 0, row the token, column the hidden unit.
Element (s, row, col) takes output ``col % 4`` of

    philox(key = seed (int64 as 64 unsigned bits: lo word k0, hi word k1),
           counter = (col // 4, row, s, 0))

and is kept iff that uint32 output >= ``dropout_threshold(p)`` = min(ceil(float32(p)·2^32),
2^32 - 256): an integer compare against a threshold computed exactly in float32, so the CPU and
CUDA kernels (host: csrc/dropout_rng.h ``dropout_threshold``) and fastattn.reference.dropout_keep
make the same decisions bit for bit. Kept elements are scaled by 1 / (1 - p).

Cost in the kernels: one Philox call per element in the attention kernels (the element selects its
lane), one per 4 columns in the FFN epilogue (``quad_keep``: the 4 lanes become 4 columns).
"""

import triton
import triton.language as tl

# 2^32 - 256: the largest float32 below 2^32, the threshold's cap (so that it fits a uint32)
_MAX_THRESHOLD = tl.constexpr(4294967040.0)


@triton.jit
def dropout_threshold(dropout_p):
    """The uint32 threshold of dropout_p: draws below it are dropped. Exact in float32 (a power-of-
    two scale of float32(p), then its ceiling), as dropout_rng.h computes it on the host."""
    t = tl.ceil(tl.cast(dropout_p, tl.float32) * 4294967296.0)
    return tl.minimum(t, _MAX_THRESHOLD).to(tl.uint32)


@triton.jit
def element_keep(seed, stream, rows, cols, dropout_p):
    """Keep decisions (True = kept) of the elements (stream, rows, cols): rows and cols broadcastable
    int32 index tensors (either way round), stream an int32 scalar; one Philox call per element,
    which picks its lane col % 4."""
    cols_full = cols + rows * 0
    rows_full = (rows + cols * 0).to(tl.uint32, bitcast=True)
    quad = (cols_full >> 2).to(tl.uint32, bitcast=True)
    zero = quad * 0
    r0, r1, r2, r3 = tl.philox(seed, quad, rows_full, zero + tl.cast(stream, tl.uint32, bitcast=True), zero)
    lane = cols_full & 3
    bits = tl.where(lane < 2, tl.where(lane == 0, r0, r1), tl.where(lane == 2, r2, r3))
    return bits >= dropout_threshold(dropout_p)


@triton.jit
def quad_keep(seed, stream, rows, first_quad, dropout_p, N_QUADS: tl.constexpr):
    """Keep decisions of the (rows, 4·N_QUADS) tile whose first column is 4·first_quad, stream
    ``stream``: one Philox call per 4 consecutive columns of a row, its 4 outputs the 4 columns."""
    quads = (first_quad + tl.arange(0, N_QUADS))[None, :] + rows[:, None] * 0
    c0 = quads.to(tl.uint32, bitcast=True)
    c1 = (rows[:, None] + quads * 0).to(tl.uint32, bitcast=True)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + tl.cast(stream, tl.uint32, bitcast=True), zero)
    # join(join(r0, r2), join(r1, r3)) is (rows, quads, 2, 2) with [.., a, b] = r(2a + b): row-major
    # reshape puts lane k of quad q at column 4q + k
    draws = tl.join(tl.join(r0, r2), tl.join(r1, r3)).reshape(rows.shape[0], 4 * N_QUADS)
    return draws >= dropout_threshold(dropout_p)
