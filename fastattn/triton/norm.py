"""Fused LayerNorm and RMSNorm in Triton, with the residual add fused in, forward and backward.

Forward, per row of x (M, N): s = x + residual (rounded to x's dtype, as torch's add; stored and
returned when there is a residual), then y = (s - mean)·rstd·weight + bias (LayerNorm) or
y = s·rstd·weight (RMSNorm), statistics in float32 (mean and rstd are saved for the backward).

Backward, with x̂ = (s - mean)·rstd and g = dy·weight:
    ds = rstd·(g - mean(g) - x̂·mean(g·x̂))      (RMSNorm: no mean(g) term)
plus the gradient flowing into the returned sum; x and residual both receive ds. dweight = Σ dy·x̂
and dbias = Σ dy over rows: each program adds its rows into its own row of a float32 partial
buffer (no atomics), and a second small kernel sums the partials column by column.

Rows up to MAX_FUSED_N elements are held whole in registers, several short rows per program; longer
rows are streamed in chunks (two passes over the row: statistics, then output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastattn.ops import norms
from fastattn.triton.common import INTERPRETING as _INTERPRETING
from fastattn.triton.common import SUPPORTED_DTYPES as _SUPPORTED_DTYPES
from fastattn.triton.common import next_power_of_2, num_warps, sm_count
from fastattn.utils import empty

MAX_FUSED_N = 8192  # longest row held whole in registers in the forward
MAX_FUSED_N_BWD = 4096  # and in the backward, which keeps more values live per element
# Elements per tile when several rows share a program, chunk length when a row is streamed, and
# columns per program of the partial-sum reduction. The interpreter runs programs one after
# another at a high fixed cost each: fewer, larger tiles there.
TILE_ELEMENTS = 65536 if _INTERPRETING else 4096
LONG_BLOCK_N = 16384 if _INTERPRETING else 4096
REDUCE_BLOCK_N = 4096 if _INTERPRETING else 128
MAX_WARPS = 32  # per program


# --------------------------------------------------------------------------------------------
# forward kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_sum(x_ptr, r_ptr, s_ptr, rows, cols, ok, sxm, sxn, srm, srn, N, HAS_RES: tl.constexpr, STORE: tl.constexpr):
    """s = x + residual as float32, rounded through x's dtype as torch's add; stored if STORE."""
    rows64 = rows.to(tl.int64)[:, None]
    col_idx = cols[None, :]  # int32: the host makes sure (N - 1)·column stride fits
    s = tl.load(x_ptr + rows64 * sxm + col_idx * sxn, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + rows64 * srm + col_idx * srn, mask=ok, other=0.0).to(tl.float32)
        s_low = (s + r).to(s_ptr.dtype.element_ty)
        if STORE:
            tl.store(s_ptr + rows64 * N + cols[None, :], s_low, mask=ok)
        s = s_low.to(tl.float32)
    return s


@triton.jit
def _affine(y, w_ptr, b_ptr, cols, col_ok, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _norm_fwd_single(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr, M, N, eps, sxm, sxn, srm, srn,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_M whole rows per program: one read of x (and residual), one write of y (and s)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    s = _load_sum(x_ptr, r_ptr, s_ptr, rows, cols, ok, sxm, sxn, srm, srn, N, HAS_RES, True)
    if IS_RMS:
        centred = s
    else:
        mean = tl.sum(s, axis=1) / N
        centred = tl.where(ok, s - mean[:, None], 0.0)  # two-pass variance: no cancellation
        tl.store(mean_ptr + rows, mean, mask=row_ok)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / N + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    y = _affine(centred * rstd[:, None], w_ptr, b_ptr, cols, col_ok, HAS_W, HAS_B)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _norm_fwd_long(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr, M, N, eps, sxm, sxn, srm, srn,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One long row per program, streamed in chunks: statistics (Chan's merge of per-chunk mean and
    squared deviations, exact as a two-pass), then the output from x and residual read again."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_N)
    count = tl.zeros([1], tl.float32)
    mean = tl.zeros([1], tl.float32)
    sq_dev = tl.zeros([1], tl.float32)  # RMSNorm: the sum of squares
    for c0 in range(0, N, BLOCK_N):
        c = c0 + cols
        ok = row_ok[:, None] & (c < N)[None, :]
        s = _load_sum(x_ptr, r_ptr, s_ptr, rows, c, ok, sxm, sxn, srm, srn, N, HAS_RES, True)
        if IS_RMS:
            sq_dev += tl.sum(s * s, axis=1)
        else:
            n_chunk = tl.minimum(N - c0, BLOCK_N).to(tl.float32)
            chunk_mean = tl.sum(s, axis=1) / n_chunk
            dev = tl.where(ok, s - chunk_mean[:, None], 0.0)
            delta = chunk_mean - mean
            total = count + n_chunk
            mean += delta * (n_chunk / total)
            sq_dev += tl.sum(dev * dev, axis=1) + delta * delta * (count * n_chunk / total)
            count = total
    rstd = tl.rsqrt(sq_dev / N + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    if IS_RMS:
        mean = tl.zeros([1], tl.float32)
    else:
        tl.store(mean_ptr + rows, mean, mask=row_ok)
    for c0 in range(0, N, BLOCK_N):
        c = c0 + cols
        col_ok = c < N
        ok = row_ok[:, None] & col_ok[None, :]
        s = _load_sum(x_ptr, r_ptr, s_ptr, rows, c, ok, sxm, sxn, srm, srn, N, HAS_RES, False)
        y = _affine((s - mean[:, None]) * rstd[:, None], w_ptr, b_ptr, c, col_ok, HAS_W, HAS_B)
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + c[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------
# backward kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _bwd_load(s_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, rows, row_ok, cols, col_ok, ssm, ssn, sgm, sgn,
              IS_RMS: tl.constexpr, HAS_W: tl.constexpr):
    """x̂, dy and g = dy·weight in float32 (0 outside the tile), and the rows' rstd."""
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    col_idx = cols[None, :]
    s = tl.load(s_ptr + rows64 * ssm + col_idx * ssn, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows64 * sgm + col_idx * sgn, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    if IS_RMS:
        x_hat = s * rstd[:, None]
    else:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(ok, (s - mean[:, None]) * rstd[:, None], 0.0)
    g = dy
    if HAS_W:
        g = dy * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return x_hat, dy, g, rstd


@triton.jit
def _write_input_grad(x_hat, g, rstd, dot_mean, g_mean, ds_ptr, dsum_ptr, rows, cols, ok, N, sdm, sdn,
                      IS_RMS: tl.constexpr, HAS_DSUM: tl.constexpr):
    """ds = rstd·(g - x̂·mean(g·x̂) - mean(g)), plus the gradient flowing into the returned sum,
    into the contiguous ds_ptr."""
    ds = g - x_hat * dot_mean[:, None]
    if not IS_RMS:
        ds = ds - g_mean[:, None]
    ds = ds * rstd[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    col_idx = cols[None, :]
    if HAS_DSUM:
        ds += tl.load(dsum_ptr + rows64 * sdm + col_idx * sdn, mask=ok, other=0.0).to(tl.float32)
    tl.store(ds_ptr + rows64 * N + cols[None, :], ds.to(ds_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _norm_bwd_single(
    dy_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, dsum_ptr, ds_ptr, dw_part_ptr, db_part_ptr,
    M, N, n_tiles, ssm, ssn, sgm, sgn, sdm, sdn,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    HAS_DSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Whole rows in registers; program p takes row tiles p, p + P, ... and keeps its weight/bias
    gradient in registers, written once to its row of the partial buffers."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dw_acc = tl.zeros([BLOCK_N], tl.float32)
    db_acc = tl.zeros([BLOCK_N], tl.float32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ok = row_ok[:, None] & col_ok[None, :]
        x_hat, dy, g, rstd = _bwd_load(s_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, rows, row_ok, cols, col_ok,
                                       ssm, ssn, sgm, sgn, IS_RMS, HAS_W)
        dot_mean = tl.sum(x_hat * g, axis=1) / N
        g_mean = tl.sum(g, axis=1) / N
        _write_input_grad(x_hat, g, rstd, dot_mean, g_mean, ds_ptr, dsum_ptr, rows, cols, ok, N, sdm, sdn,
                          IS_RMS, HAS_DSUM)
        if WANT_DW:
            dw_acc += tl.sum(dy * x_hat, axis=0)
        if WANT_DB:
            db_acc += tl.sum(dy, axis=0)
    part = pid.to(tl.int64) * N + cols
    if WANT_DW:
        tl.store(dw_part_ptr + part, dw_acc, mask=col_ok)
    if WANT_DB:
        tl.store(db_part_ptr + part, db_acc, mask=col_ok)


@triton.jit
def _norm_bwd_long(
    dy_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, dsum_ptr, ds_ptr, dw_part_ptr, db_part_ptr,
    M, N, ssm, ssn, sgm, sgn, sdm, sdn,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    HAS_DSUM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Long rows: program p takes rows p, p + P, ...; per row one pass for the two row means and
    one for ds, adding into its own row of the (zeroed) partial buffers as it goes."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    for row in range(pid, M, tl.num_programs(0)):
        rows = row + tl.arange(0, 1)
        row_ok = rows < M
        dot_sum = tl.zeros([1], tl.float32)
        g_sum = tl.zeros([1], tl.float32)
        for c0 in range(0, N, BLOCK_N):
            c = c0 + cols
            col_ok = c < N
            ok = row_ok[:, None] & col_ok[None, :]
            x_hat, dy, g, rstd = _bwd_load(s_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, rows, row_ok, c, col_ok,
                                           ssm, ssn, sgm, sgn, IS_RMS, HAS_W)
            dot_sum += tl.sum(x_hat * g, axis=1)
            g_sum += tl.sum(g, axis=1)
        for c0 in range(0, N, BLOCK_N):
            c = c0 + cols
            col_ok = c < N
            ok = row_ok[:, None] & col_ok[None, :]
            x_hat, dy, g, rstd = _bwd_load(s_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, rows, row_ok, c, col_ok,
                                           ssm, ssn, sgm, sgn, IS_RMS, HAS_W)
            _write_input_grad(x_hat, g, rstd, dot_sum / N, g_sum / N, ds_ptr, dsum_ptr, rows, c, ok, N, sdm, sdn,
                              IS_RMS, HAS_DSUM)
            part = pid.to(tl.int64) * N + c
            if WANT_DW:  # this program alone owns its partial row: read-add-write, no atomics
                acc = tl.load(dw_part_ptr + part, mask=col_ok, other=0.0)
                tl.store(dw_part_ptr + part, acc + tl.sum(dy * x_hat, axis=0), mask=col_ok)
            if WANT_DB:
                acc = tl.load(db_part_ptr + part, mask=col_ok, other=0.0)
                tl.store(db_part_ptr + part, acc + tl.sum(dy, axis=0), mask=col_ok)


@triton.jit
def _sum_partials(part_ptr, out_ptr, P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n] = Σ_p part[p, n]: the second stage of the weight and bias gradients."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & col_ok[None, :]
        acc += tl.load(part_ptr + p.to(tl.int64)[:, None] * N + cols[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def _row_tiling(m: int, n: int, max_fused: int) -> tuple[int, int] | None:
    """(BLOCK_M, BLOCK_N) when rows fit whole in registers, else None (streamed rows)."""
    if n > max_fused:
        return None
    block_n = next_power_of_2(n)
    return min(next_power_of_2(m), max(1, TILE_ELEMENTS // block_n)), block_n


def _backward_programs(device: torch.device, work_items: int) -> int:
    """Programs for the backward (each owns one row of the partial buffers): enough to fill the GPU,
    few enough that the partial buffers stay small next to x."""
    if device.type == "cuda":
        target = 2 * sm_count(device)
    else:
        target = 4
    return max(1, min(work_items, target))


def _dense(param: torch.Tensor | None) -> torch.Tensor | None:
    return param if param is None or param.stride(0) == 1 else param.contiguous()


def _narrow_cols(t: torch.Tensor | None) -> torch.Tensor | None:
    """t, or a contiguous copy when its column offsets would not fit the kernels' 32-bit ones
    (a transposed tensor of more than 2**31 elements)."""
    if t is None or (t.size(1) - 1) * t.stride(1) < 2**31:
        return t
    return t.contiguous()


def _forward(x, weight, bias, eps, residual, is_rms):
    m, n = x.shape
    weight, bias = _dense(weight), _dense(bias)  # the kernels index parameters with unit stride
    x, residual = _narrow_cols(x), _narrow_cols(residual)
    y = empty(m, n, dtype=x.dtype, device=x.device)
    s = empty(m, n, dtype=x.dtype, device=x.device) if residual is not None else x.new_empty(0)
    mean = empty(m, dtype=torch.float32, device=x.device) if not is_rms else x.new_empty(0, dtype=torch.float32)
    rstd = empty(m, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, s, mean, rstd
    r = residual if residual is not None else x
    args = (x, r, weight if weight is not None else x, bias if bias is not None else x, y, s if residual is not None else y,
            mean if not is_rms else rstd, rstd, m, n, eps, x.stride(0), x.stride(1), r.stride(0), r.stride(1))
    flags = dict(IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None)
    tiling = _row_tiling(m, n, MAX_FUSED_N)
    if tiling is not None:
        block_m, block_n = tiling
        wrap_triton(_norm_fwd_single)[(triton.cdiv(m, block_m),)](
            *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps(block_m * block_n, 16, MAX_WARPS)
        )
    else:
        wrap_triton(_norm_fwd_long)[(m,)](*args, **flags, BLOCK_N=LONG_BLOCK_N, num_warps=8)
    return y, s, mean, rstd


def _backward(dy, dsum, s, weight, mean, rstd, want_dw, want_db, is_rms):
    m, n = s.shape
    weight = _dense(weight)
    dy, dsum, s = _narrow_cols(dy), _narrow_cols(dsum), _narrow_cols(s)
    ds = empty(m, n, dtype=s.dtype, device=s.device)
    w_dtype = weight.dtype if weight is not None else s.dtype
    dweight = empty(n, dtype=w_dtype, device=s.device) if want_dw else s.new_empty(0)
    dbias = empty(n, dtype=w_dtype, device=s.device) if want_db else s.new_empty(0)
    if s.numel() == 0:
        if want_dw:
            dweight.zero_()
        if want_db:
            dbias.zero_()
        return ds, dweight, dbias
    tiling = _row_tiling(m, n, MAX_FUSED_N_BWD)
    n_programs = _backward_programs(s.device, triton.cdiv(m, tiling[0]) if tiling else m)
    # float32 partial sums, one row per program; zeroed for the streamed kernel, which adds into them
    alloc = torch.empty if tiling is not None else torch.zeros
    dw_part = alloc(n_programs if want_dw else 0, n, dtype=torch.float32, device=s.device)
    db_part = alloc(n_programs if want_db else 0, n, dtype=torch.float32, device=s.device)
    dsum_arg = dsum if dsum is not None else dy
    args = (dy, s, weight if weight is not None else s, mean if not is_rms else rstd, rstd, dsum_arg, ds,
            dw_part if want_dw else rstd, db_part if want_db else rstd, m, n)
    strides = (s.stride(0), s.stride(1), dy.stride(0), dy.stride(1), dsum_arg.stride(0), dsum_arg.stride(1))
    flags = dict(IS_RMS=is_rms, HAS_W=weight is not None, WANT_DW=want_dw, WANT_DB=want_db, HAS_DSUM=dsum is not None)
    if tiling is not None:
        block_m, block_n = tiling
        wrap_triton(_norm_bwd_single)[(n_programs,)](
            *args, triton.cdiv(m, block_m), *strides, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps(block_m * block_n, 8, MAX_WARPS),  # more live values than the forward
        )
    else:
        wrap_triton(_norm_bwd_long)[(n_programs,)](*args, *strides, **flags, BLOCK_N=LONG_BLOCK_N, num_warps=8)
    for part, out, wanted in ((dw_part, dweight, want_dw), (db_part, dbias, want_db)):
        if wanted:
            block_n = min(REDUCE_BLOCK_N, next_power_of_2(n))
            wrap_triton(_sum_partials)[(triton.cdiv(n, block_n),)](part, out, n_programs, n, BLOCK_P=32,
                                                                   BLOCK_N=block_n, num_warps=4)
    return ds, dweight, dbias


# --------------------------------------------------------------------------------------------
# torch ops and autograd
# --------------------------------------------------------------------------------------------


@triton_op("fastattn_triton::layer_norm_fwd", mutates_args={})
def _layer_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s = x + residual or an empty tensor, mean, rstd)."""
    return _forward(x, weight, bias, eps, residual, is_rms=False)


@triton_op("fastattn_triton::rms_norm_fwd", mutates_args={})
def _rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s = x + residual or an empty tensor, rstd)."""
    y, s, _, rstd = _forward(x, weight, None, eps, residual, is_rms=True)
    return y, s, rstd


@triton_op("fastattn_triton::norm_bwd", mutates_args={})
def _norm_bwd(
    dy: torch.Tensor, dsum: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor, want_dweight: bool, want_dbias: bool, is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ds, dweight or empty, dbias or empty); ds includes dsum (the gradient of s) when given."""
    return _backward(dy, dsum, s, weight, mean, rstd, want_dweight, want_dbias, is_rms)


# --------------------------------------------------------------------------------------------
# the kernel providers (protocol in fastattn/ops/norms.py)
# --------------------------------------------------------------------------------------------


class Kernels:
    native_autograd = False

    def __init__(self, rms: bool):
        self.rms = rms
        self.forward_op = "fastattn_triton::rms_norm_fwd" if rms else "fastattn_triton::layer_norm_fwd"

    def supports(self, call) -> str | None:
        if call.dtype not in _SUPPORTED_DTYPES:
            return f"triton norms take float16, bfloat16 or float32, got {call.dtype}"
        return None

    def forward(self, p, x, weight, bias, residual):
        if self.rms:
            y, s, rstd = _rms_norm_fwd(x, residual, weight, p.eps)
            return y, s, rstd.new_empty(0), rstd
        return _layer_norm_fwd(x, residual, weight, bias, p.eps)

    def backward(self, p, dy, s, weight, mean, rstd, need_dweight, need_dbias):
        ds, dweight, dbias = _norm_bwd(dy, None, s, weight, mean, rstd, need_dweight, need_dbias, self.rms)
        return ds, (dweight if need_dweight else None), (dbias if need_dbias else None)


KERNELS = {"layer_norm": norms.bind(Kernels(rms=False)), "rms_norm": norms.bind(Kernels(rms=True))}
