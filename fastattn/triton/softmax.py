"""Fused softmax and log_softmax in Triton: softmax(x·scale + mask) along the last dim, forward and backward.

Rows are read in place through strides. The host folds the leading dims of x (and of the mask and
the output, which share them) into at most three "outer" dims and one "inner" dim whose rows a
program takes side by side as one (BLOCK_M, BLOCK_N) tile. Broadcast dims of the mask keep stride 0,
so a key-padding mask (B, 1, 1, N) is read in place, never expanded in memory.

Two paths, chosen by row length:
- single pass: the whole row is in registers (N <= MAX_FUSED_N), x is read once, y written once;
- long rows: each row is cut into `splits` segments, one program each. A first kernel writes per
  segment the running max and sum of exponentials (online softmax), a second one combines the
  segments' statistics of its row and writes the output. Few long rows still fill the GPU.

When the rows are strided and the inner dim is the contiguous one (softmax over a dim other than the
last of a contiguous tensor), the tile is made tall (many rows, few columns) so that loads coalesce
across rows, and the row is streamed in chunks by the long-row kernels.

Numerics: float32 inside, output in x's dtype. A fully masked row gives zeros (log_softmax: -inf).
The backward saves only y: dx = scale·y·(dy - sum(dy·y)), or for log_softmax
dx = scale·(dy - exp(y)·sum(dy)) and 0 where y = -inf (masked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastattn.ops import softmax as softmax_op
from fastattn.triton.common import INTERPRETING as _INTERPRETING
from fastattn.triton.common import SUPPORTED_DTYPES as _SUPPORTED_DTYPES
from fastattn.triton.common import next_power_of_2, num_warps, sm_count
from fastattn.utils import poisoning

MAX_FUSED_N = 16384  # longest row kept whole in registers (single pass)
# Elements per tile when several rows share a program, and chunk length when a row is streamed.
# The interpreter runs programs one after another at a high fixed cost each: fewer, larger tiles.
TILE_ELEMENTS = 65536 if _INTERPRETING else 4096
LONG_BLOCK_N = 16384 if _INTERPRETING else 4096
MAX_OUTER_DIMS = 3  # leading dims the kernels index besides the inner one
MAX_WARPS = 16  # per program

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _row_starts(pid, n_inner_blocks, splits, S1, S2, S3, sa0, sa1, sa2, sa3, sb0, sb1, sb2, sb3, sc0, sc1, sc2, sc3,
                BLOCK_M: tl.constexpr):
    """The program's rows: their inner indices, validity, flat indices, and where each starts in
    three tensors a, b, c that share the folded layout (int64 offsets). Program ids run over
    (outer index, block of inner rows, segment); the segment is returned too."""
    split = pid % splits
    rows_id = pid // splits
    o = rows_id // n_inner_blocks
    inner = (rows_id % n_inner_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    o2 = o % S2
    o1 = (o // S2) % S1
    o0 = o // (S2 * S1)
    i = inner.to(tl.int64)
    a = o0.to(tl.int64) * sa0 + o1.to(tl.int64) * sa1 + o2.to(tl.int64) * sa2 + i * sa3
    b = o0.to(tl.int64) * sb0 + o1.to(tl.int64) * sb1 + o2.to(tl.int64) * sb2 + i * sb3
    c = o0.to(tl.int64) * sc0 + o1.to(tl.int64) * sc1 + o2.to(tl.int64) * sc2 + i * sc3
    return inner, inner < S3, o.to(tl.int64) * S3 + i, a, b, c, split


@triton.jit
def _scores(x_ptr, mask_ptr, x_row, m_row, cols, sxn, smn, ok, inner, scale,
            MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """x·scale + mask in float32 over a (BLOCK_M, BLOCK_N) tile, -inf where masked or outside."""
    z = tl.load(x_ptr + (x_row[:, None] + cols[None, :] * sxn), mask=ok, other=0.0).to(tl.float32) * scale
    if MASK_KIND == 1:
        keep = tl.load(mask_ptr + (m_row[:, None] + cols[None, :] * smn), mask=ok, other=0) != 0
        z = tl.where(keep, z, float("-inf"))
    if MASK_KIND == 2:
        z = z + tl.load(mask_ptr + (m_row[:, None] + cols[None, :] * smn), mask=ok, other=0.0).to(tl.float32)
    if CAUSAL:  # the inner dim is x's dim -2 (the host never folds it), so inner is the row index i
        z = tl.where(cols[None, :] <= inner[:, None], z, float("-inf"))
    return tl.where(ok, z, float("-inf"))


@triton.jit
def _normalise(z, row_max, row_sum, LOG: tl.constexpr):
    """softmax (or log_softmax) of scores z given each row's max (finite) and sum of exp(z - max)."""
    empty = row_sum == 0.0  # a fully masked row
    safe_sum = tl.where(empty, 1.0, row_sum)
    if LOG:
        y = z - row_max[:, None] - tl.log(safe_sum)[:, None]
        return tl.where(empty[:, None], float("-inf"), y)  # log of the zeros; a NaN sum stays NaN
    inv = tl.where(empty, 0.0, 1.0 / safe_sum)  # zeros, not 0/0
    return tl.exp(z - row_max[:, None]) * inv[:, None]


@triton.jit
def _columns(BLOCK_N: tl.constexpr, WIDE_COLS: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    if WIDE_COLS:  # (N - 1)·column stride does not fit in 32 bits
        cols = cols.to(tl.int64)
    return cols


@triton.jit
def _softmax_fwd_single(
    x_ptr, mask_ptr, y_ptr, N, S1, S2, S3, n_inner_blocks, scale,
    sx0, sx1, sx2, sx3, sxn, sm0, sm1, sm2, sm3, smn, sy0, sy1, sy2, sy3, syn,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, LOG: tl.constexpr, WIDE_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows that fit in one tile: x read once, y written once."""
    inner, row_ok, _, x_row, m_row, y_row, _ = _row_starts(
        tl.program_id(0), n_inner_blocks, 1, S1, S2, S3, sx0, sx1, sx2, sx3, sm0, sm1, sm2, sm3,
        sy0, sy1, sy2, sy3, BLOCK_M)
    cols = _columns(BLOCK_N, WIDE_COLS)
    ok = row_ok[:, None] & (cols < N)[None, :]
    z = _scores(x_ptr, mask_ptr, x_row, m_row, cols, sxn, smn, ok, inner, scale, MASK_KIND, CAUSAL)
    row_max = tl.max(z, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = tl.sum(tl.exp(z - row_max[:, None]), axis=1)
    y = _normalise(z, row_max, row_sum, LOG)
    tl.store(y_ptr + (y_row[:, None] + cols[None, :] * syn), y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _softmax_fwd_partials(
    x_ptr, mask_ptr, max_ptr, sum_ptr, N, S1, S2, S3, n_inner_blocks, splits, seg_len, scale,
    sx0, sx1, sx2, sx3, sxn, sm0, sm1, sm2, sm3, smn,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, WIDE_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Long rows, pass 1: running max and sum of exp over one segment (online softmax)."""
    inner, row_ok, flat_row, x_row, m_row, _, split = _row_starts(
        tl.program_id(0), n_inner_blocks, splits, S1, S2, S3, sx0, sx1, sx2, sx3, sm0, sm1, sm2, sm3,
        sx0, sx1, sx2, sx3, BLOCK_M)
    cols = _columns(BLOCK_N, WIDE_COLS)
    start = split * seg_len
    end = tl.minimum(start + seg_len, N)
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(start, end, BLOCK_N):
        c = c0 + cols
        ok = row_ok[:, None] & (c < end)[None, :]
        z = _scores(x_ptr, mask_ptr, x_row, m_row, c, sxn, smn, ok, inner, scale, MASK_KIND, CAUSAL)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # all masked so far: sums stay 0
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(z - safe_max[:, None]), axis=1)
        run_max = new_max
    stat = flat_row * splits + split
    tl.store(max_ptr + stat, run_max, mask=row_ok)
    tl.store(sum_ptr + stat, run_sum, mask=row_ok)


@triton.jit
def _softmax_fwd_finish(
    x_ptr, mask_ptr, y_ptr, max_ptr, sum_ptr, N, S1, S2, S3, n_inner_blocks, splits, seg_len, scale,
    sx0, sx1, sx2, sx3, sxn, sm0, sm1, sm2, sm3, smn, sy0, sy1, sy2, sy3, syn,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, LOG: tl.constexpr, WIDE_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Long rows, pass 2: combine the row's segment statistics, then write this segment."""
    inner, row_ok, flat_row, x_row, m_row, y_row, split = _row_starts(
        tl.program_id(0), n_inner_blocks, splits, S1, S2, S3, sx0, sx1, sx2, sx3, sm0, sm1, sm2, sm3,
        sy0, sy1, sy2, sy3, BLOCK_M)
    cols = _columns(BLOCK_N, WIDE_COLS)
    start = split * seg_len
    end = tl.minimum(start + seg_len, N)
    seg = tl.arange(0, BLOCK_S)
    stat = flat_row[:, None] * splits + seg[None, :]
    stat_ok = row_ok[:, None] & (seg < splits)[None, :]
    seg_max = tl.load(max_ptr + stat, mask=stat_ok, other=float("-inf"))
    seg_sum = tl.load(sum_ptr + stat, mask=stat_ok, other=0.0)
    row_max = tl.max(seg_max, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = tl.sum(seg_sum * tl.exp(seg_max - row_max[:, None]), axis=1)
    for c0 in range(start, end, BLOCK_N):
        c = c0 + cols
        ok = row_ok[:, None] & (c < end)[None, :]
        z = _scores(x_ptr, mask_ptr, x_row, m_row, c, sxn, smn, ok, inner, scale, MASK_KIND, CAUSAL)
        y = _normalise(z, row_max, row_sum, LOG)
        tl.store(y_ptr + (y_row[:, None] + c[None, :] * syn), y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _softmax_bwd_single(
    y_ptr, dy_ptr, dx_ptr, N, S1, S2, S3, n_inner_blocks, scale,
    sy0, sy1, sy2, sy3, syn, sg0, sg1, sg2, sg3, sgn, sd0, sd1, sd2, sd3, sdn,
    LOG: tl.constexpr, WIDE_COLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx = scale·y·(dy - Σ dy·y), or scale·(dy - exp(y)·Σ dy) for log_softmax (dy·scale where y = -inf)."""
    _, row_ok, _, y_row, g_row, d_row, _ = _row_starts(
        tl.program_id(0), n_inner_blocks, 1, S1, S2, S3, sy0, sy1, sy2, sy3, sg0, sg1, sg2, sg3,
        sd0, sd1, sd2, sd3, BLOCK_M)
    cols = _columns(BLOCK_N, WIDE_COLS)
    ok = row_ok[:, None] & (cols < N)[None, :]
    y = tl.load(y_ptr + (y_row[:, None] + cols[None, :] * syn), mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + (g_row[:, None] + cols[None, :] * sgn), mask=ok, other=0.0).to(tl.float32)
    if LOG:
        dx = dy - tl.exp(y) * tl.sum(dy, axis=1)[:, None]  # torch's formula: dy where y = -inf
    else:
        dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
    tl.store(dx_ptr + (d_row[:, None] + cols[None, :] * sdn), (dx * scale).to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _softmax_bwd_partials(
    y_ptr, dy_ptr, total_ptr, N, S1, S2, S3, n_inner_blocks, splits, seg_len,
    sy0, sy1, sy2, sy3, syn, sg0, sg1, sg2, sg3, sgn,
    LOG: tl.constexpr, WIDE_COLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Long rows, pass 1 of the backward: this segment's part of Σ dy·y (log_softmax: Σ dy)."""
    _, row_ok, flat_row, y_row, g_row, _, split = _row_starts(
        tl.program_id(0), n_inner_blocks, splits, S1, S2, S3, sy0, sy1, sy2, sy3, sg0, sg1, sg2, sg3,
        sy0, sy1, sy2, sy3, BLOCK_M)
    cols = _columns(BLOCK_N, WIDE_COLS)
    start = split * seg_len
    end = tl.minimum(start + seg_len, N)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(start, end, BLOCK_N):
        c = c0 + cols
        ok = row_ok[:, None] & (c < end)[None, :]
        dy = tl.load(dy_ptr + (g_row[:, None] + c[None, :] * sgn), mask=ok, other=0.0).to(tl.float32)
        if LOG:
            acc += tl.sum(dy, axis=1)
        else:
            y = tl.load(y_ptr + (y_row[:, None] + c[None, :] * syn), mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(dy * y, axis=1)
    tl.store(total_ptr + flat_row * splits + split, acc, mask=row_ok)


@triton.jit
def _softmax_bwd_finish(
    y_ptr, dy_ptr, dx_ptr, total_ptr, N, S1, S2, S3, n_inner_blocks, splits, seg_len, scale,
    sy0, sy1, sy2, sy3, syn, sg0, sg1, sg2, sg3, sgn, sd0, sd1, sd2, sd3, sdn,
    LOG: tl.constexpr, WIDE_COLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Long rows, pass 2 of the backward: sum the segments' parts, then write this segment of dx."""
    _, row_ok, flat_row, y_row, g_row, d_row, split = _row_starts(
        tl.program_id(0), n_inner_blocks, splits, S1, S2, S3, sy0, sy1, sy2, sy3, sg0, sg1, sg2, sg3,
        sd0, sd1, sd2, sd3, BLOCK_M)
    cols = _columns(BLOCK_N, WIDE_COLS)
    start = split * seg_len
    end = tl.minimum(start + seg_len, N)
    seg = tl.arange(0, BLOCK_S)
    stat_ok = row_ok[:, None] & (seg < splits)[None, :]
    parts = tl.load(total_ptr + flat_row[:, None] * splits + seg[None, :], mask=stat_ok, other=0.0)
    row_total = tl.sum(parts, axis=1)[:, None]
    for c0 in range(start, end, BLOCK_N):
        c = c0 + cols
        ok = row_ok[:, None] & (c < end)[None, :]
        y = tl.load(y_ptr + (y_row[:, None] + c[None, :] * syn), mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + (g_row[:, None] + c[None, :] * sgn), mask=ok, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp(y) * row_total
        else:
            dx = y * (dy - row_total)
        tl.store(dx_ptr + (d_row[:, None] + c[None, :] * sdn), (dx * scale).to(dx_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------
# host side: layout folding and launch planning
# --------------------------------------------------------------------------------------------


def _fold_rows(shape, strides_per_tensor, pin_inner: bool):
    """Fold the leading dims of tensors sharing ``shape`` (..., N) into (sizes, strides) with at
    most MAX_OUTER_DIMS outer dims and one inner dim, or None when they do not fold that far.

    Size-1 dims go; the dims are ordered by the first tensor's stride (largest outermost, so the
    inner dim is the one closest to contiguous); neighbours merge where every tensor steps through
    them as through one dim. ``pin_inner`` keeps dim -2 alone as the inner dim (causal masking
    needs its index). Returns sizes (S0, S1, S2, S3) and, per tensor, (s0, s1, s2, s3, s_col).
    """
    n_tensors = len(strides_per_tensor)
    dims = [(shape[d], tuple(st[d] for st in strides_per_tensor)) for d in range(len(shape) - 1)]
    pinned = dims.pop() if pin_inner and dims else None
    dims = [d for d in dims if d[0] != 1]
    dims.sort(key=lambda d: -d[1][0])  # stable: equal strides keep their order
    merged: list[tuple[int, tuple[int, ...]]] = []
    for size, strides in dims:
        if merged and all(a == b * size for a, b in zip(merged[-1][1], strides)):
            merged[-1] = (merged[-1][0] * size, strides)
        else:
            merged.append((size, strides))
    if pinned is not None:
        merged.append(pinned)
    if len(merged) > MAX_OUTER_DIMS + 1:
        return None
    merged = [(1, (0,) * n_tensors)] * (MAX_OUTER_DIMS + 1 - len(merged)) + merged
    sizes = tuple(size for size, _ in merged)
    strides = [tuple(s[t] for _, s in merged) + (strides_per_tensor[t][-1],) for t in range(n_tensors)]
    return sizes, strides


def _target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: a few per SM on a GPU, a handful in the interpreter."""
    if device.type != "cuda":
        return 4
    return 4 * sm_count(device)


class _Plan:
    """Tile shape, path and segment split for rows of length n on a folded layout."""

    def __init__(self, n: int, sizes, lead_strides, device: torch.device):
        n_outer = sizes[0] * sizes[1] * sizes[2]
        inner, inner_stride, col_stride = sizes[3], lead_strides[3], lead_strides[4]
        column_major = inner > 1 and inner_stride == 1 and col_stride != 1
        if column_major:  # rows side by side in memory: a tall tile so that loads coalesce across rows
            self.block_m = min(next_power_of_2(inner), 64)
            self.block_n = min(next_power_of_2(n), max(16, TILE_ELEMENTS // self.block_m))
        elif n <= MAX_FUSED_N:
            self.block_n = next_power_of_2(n)
            self.block_m = min(next_power_of_2(inner), max(1, TILE_ELEMENTS // self.block_n))
        else:
            self.block_n, self.block_m = LONG_BLOCK_N, 1
        self.single = self.block_n >= n
        self.n_inner_blocks = triton.cdiv(inner, self.block_m)
        row_programs = n_outer * self.n_inner_blocks
        self.splits, self.seg_len = 1, n
        if not self.single:
            chunks = triton.cdiv(n, self.block_n)
            want = max(1, min(chunks, triton.cdiv(_target_programs(device), row_programs)))
            self.seg_len = triton.cdiv(chunks, want) * self.block_n
            self.splits = triton.cdiv(n, self.seg_len)
        self.grid = (row_programs * self.splits,)
        self.n_rows = n_outer * inner
        # streamed tiles keep int64 addresses of three tensors live across the loop: fewer elements per thread
        self.num_warps = num_warps(self.block_m * self.block_n, 16 if self.single else 8, MAX_WARPS)


def _wide_cols(n: int, strides) -> bool:
    return any((n - 1) * st[4] >= 2**31 for st in strides)


def _empty_like_layout(t: torch.Tensor) -> torch.Tensor:
    """An output with t's layout when t is dense (so strided rows stay coalesced), else contiguous;
    NaN-poisoned under tests."""
    out = torch.empty_like(t)
    if poisoning():
        out.fill_(float("nan"))
    return out


def _launch_forward(x, mask, y, scale: float, is_causal: bool, log: bool) -> None:
    n = x.size(-1)
    tensors = [x, y] if mask is None else [x, y, mask]
    folded = _fold_rows(x.shape, [t.stride() for t in tensors], pin_inner=is_causal)
    if folded is None:  # too many unfoldable dims: one launch per slice of the first dim
        for i in range(x.size(0)):
            _launch_forward(x[i], None if mask is None else mask[i], y[i], scale, is_causal, log)
        return
    sizes, strides = folded
    sx, sy = strides[0], strides[1]
    sm = strides[2] if mask is not None else (0,) * 5
    mask_kind = MASK_NONE if mask is None else (MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT)
    mask_arg = x if mask is None else mask  # a bool mask loads as bytes (Triton: *i1)
    plan = _Plan(n, sizes, sx, x.device)
    S1, S2, S3 = sizes[1], sizes[2], sizes[3]
    wide = _wide_cols(n, strides)
    common = dict(MASK_KIND=mask_kind, CAUSAL=is_causal, WIDE_COLS=wide, BLOCK_M=plan.block_m,
                  BLOCK_N=plan.block_n, num_warps=plan.num_warps)
    if plan.single:
        wrap_triton(_softmax_fwd_single)[plan.grid](
            x, mask_arg, y, n, S1, S2, S3, plan.n_inner_blocks, scale, *sx, *sm, *sy, LOG=log, **common
        )
        return
    row_max = torch.empty(plan.n_rows * plan.splits, dtype=torch.float32, device=x.device)
    row_sum = torch.empty_like(row_max)
    split_args = (n, S1, S2, S3, plan.n_inner_blocks, plan.splits, plan.seg_len, scale)
    wrap_triton(_softmax_fwd_partials)[plan.grid](x, mask_arg, row_max, row_sum, *split_args, *sx, *sm, **common)
    wrap_triton(_softmax_fwd_finish)[plan.grid](
        x, mask_arg, y, row_max, row_sum, *split_args, *sx, *sm, *sy,
        LOG=log, BLOCK_S=next_power_of_2(plan.splits), **common,
    )


def _launch_backward(dy, y, dx, scale: float, log: bool) -> None:
    n = y.size(-1)
    folded = _fold_rows(y.shape, [y.stride(), dy.stride(), dx.stride()], pin_inner=False)
    if folded is None:
        for i in range(y.size(0)):
            _launch_backward(dy[i], y[i], dx[i], scale, log)
        return
    sizes, (sy, sg, sd) = folded
    plan = _Plan(n, sizes, sy, y.device)
    S1, S2, S3 = sizes[1], sizes[2], sizes[3]
    common = dict(LOG=log, WIDE_COLS=_wide_cols(n, (sy, sg, sd)), BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
                  num_warps=plan.num_warps)
    if plan.single:
        wrap_triton(_softmax_bwd_single)[plan.grid](
            y, dy, dx, n, S1, S2, S3, plan.n_inner_blocks, scale, *sy, *sg, *sd, **common
        )
        return
    totals = torch.empty(plan.n_rows * plan.splits, dtype=torch.float32, device=y.device)
    split_args = (n, S1, S2, S3, plan.n_inner_blocks, plan.splits, plan.seg_len)
    wrap_triton(_softmax_bwd_partials)[plan.grid](y, dy, totals, *split_args, *sy, *sg, **common)
    wrap_triton(_softmax_bwd_finish)[plan.grid](
        y, dy, dx, totals, *split_args, scale, *sy, *sg, *sd, BLOCK_S=next_power_of_2(plan.splits), **common
    )


# --------------------------------------------------------------------------------------------
# torch ops and autograd
# --------------------------------------------------------------------------------------------


@triton_op("fastattn_triton::softmax", mutates_args={})
def _softmax_op(x: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool, log: bool) -> torch.Tensor:
    y = _empty_like_layout(x)
    if x.numel() > 0:
        _launch_forward(x, mask, y, scale, is_causal, log)
    return y


@triton_op("fastattn_triton::softmax_bwd", mutates_args={})
def _softmax_bwd_op(dy: torch.Tensor, y: torch.Tensor, scale: float, log: bool) -> torch.Tensor:
    dx = _empty_like_layout(y)
    if y.numel() > 0:
        _launch_backward(dy, y, dx, scale, log)
    return dx


# --------------------------------------------------------------------------------------------
# the kernel provider (protocol in fastattn/ops/softmax.py)
# --------------------------------------------------------------------------------------------


class Kernels:
    native_autograd = False
    forward_op = "fastattn_triton::softmax"

    def supports(self, call) -> str | None:
        if call.dtype not in _SUPPORTED_DTYPES:
            return f"triton softmax takes float16, bfloat16 or float32, got {call.dtype}"
        if call.mask_dtype is not None and call.mask_dtype not in (torch.bool, *_SUPPORTED_DTYPES, torch.float64):
            return f"triton softmax takes a bool or floating mask, got {call.mask_dtype}"
        return None

    def forward(self, p, x):
        return _softmax_op(x, p.mask, p.scale, p.is_causal, p.log)

    def backward(self, p, dy, y, scale):
        return _softmax_bwd_op(dy, y, scale, p.log)


KERNELS = {"softmax": softmax_op.bind(Kernels())}
