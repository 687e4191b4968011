"""The feed-forward block act(x·w1ᵀ + b1)·w2ᵀ + b2 in Triton, forward and backward.

Forward: one Triton kernel computes the first GEMM tile by tile and applies, in its epilogue, the
bias, the activation, the gate product of swiglu/geglu (the gate and up tiles are accumulated in
the same program from the same x tile) and dropout (Philox 4x32-10, the scheme of every backend:
fastattn/triton/dropout.py, see ``_keep``; regenerated in the backward and by ``dropout_mask``). The
pre-activation h = x·w1ᵀ + b1 therefore never leaves registers; only the activation
``a`` (M, hidden) is written, and the second GEMM ``a·w2ᵀ + b2`` runs in cuBLAS (``torch.addmm``).
Why cuBLAS for the second GEMM: after it there is nothing element-wise left to fuse (dropout sits
before it, the residual belongs to the caller), so a Triton GEMM could only match cuBLAS, whose
bias epilogue (cublasLt) already folds b2 in.

What the backward keeps: only x (plus the weights, which are parameters, not activations), and
the seed. ``a`` and h are recomputed: the backward kernel accumulates, per (rows, hidden cols)
tile, both h = x·w1ᵀ (the K loop) and da = dout·w2 (the N loop), and its epilogue turns them into
dh = da·mask·act'(h) (and the gate/up split) and the recomputed activation ``a`` that dw2 needs;
neither da nor h makes a round trip through memory. The price is the first GEMM run once more
(+1/6 of the block's FLOPs, +2/9 for the gated ones); the saving, per token, in bytes (s the
input dtype's size, d_model K, hidden H, torch's Linear → act → dropout → Linear as the baseline;
measured with saved-tensor hooks, fp16):

    activation      fastattn saves   torch saves              K=1024, H=4096 (gated: H=2816)
    relu/gelu/...   K·s              (K + 2H)·s, +2H dropout   2 KiB vs 18 KiB (26 KiB with dropout)
    swiglu/geglu    K·s              (K + 4H)·s, +2H dropout   2 KiB vs 24 KiB (29.5 KiB with dropout)

x is also what the next-lower layer (a norm, a residual add) usually keeps anyway, so the block's
own activation memory is close to zero. tests/test_ffn.py counts these bytes with saved-tensor
hooks on the CPU and measures the peak CUDA memory against torch's block on a GPU.
The backward's transients are ``a`` (M, H) and dh (M, H1), released when it returns.

Gated layout: w1 (2·hidden, K), the gate's rows first; out = act(gate)·up (swiglu: silu gate,
geglu: exact-gelu (erf) gate, geglu_tanh: tanh-approximated gelu gate), as reference.activate.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastattn import activations
from fastattn.activations import ACTIVATIONS, GATED_ACTIVATIONS
from fastattn.ops import feed_forward as feed_forward_op
from fastattn.triton import common
from fastattn.triton import dropout as _rng
from fastattn.triton.common import SUPPORTED_DTYPES
from fastattn.utils import empty, seed_arg

# The kernels' ACTIVATION constexpr is the code (fastattn/activations.py, csrc/activations.h) of the
# function applied to h (to the gate of a gated activation): an integer rather than a string, so that
# Inductor renders it trivially in its kernel launches. _activation below switches on these codes.
_RELU, _GELU, _GELU_TANH, _SILU = (tl.constexpr(activations.code(n)) for n in ("relu", "gelu", "gelu_tanh", "silu"))
# The activations' constants (csrc/activations.h names the same ones for the C++ kernels). Tensor
# operand first where they multiply (constexpr * tensor does not stay a tensor in the interpreter).
_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1/√2: Φ(x) = (1 + erf(x/√2)) / 2
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/√(2π): φ(x) = e^{-x²/2}/√(2π)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # √(2/π), the tanh approximation's scale
_GELU_TANH_CUBIC = tl.constexpr(0.044715)  # and its cubic coefficient
_GELU_TANH_CUBIC_3 = tl.constexpr(0.134145)  # 3 · 0.044715, in its derivative


# --------------------------------------------------------------------------------------------
# autotuning: configs for A100/H100, pruned to what fits the device; a single one when interpreting
# --------------------------------------------------------------------------------------------


def _configs(candidates) -> list[triton.Config]:
    """triton.Configs from (BLOCK_M, BLOCK_H, BLOCK_K, warps, stages) tuples."""
    if common.INTERPRETING or not torch.cuda.is_available():
        # one config, small enough that tests with odd shapes cover several tiles and masked edges
        return [triton.Config({"BLOCK_M": 32, "BLOCK_H": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    if os.environ.get("FASTATTN_AUTOTUNE", "1") == "0":
        # one config, as the attention kernels do: (64, 64, 32) at 8 warps and 3 stages fits every dtype,
        # gated or not, forward and backward, on A100 and H100 without spills (at 4 warps the gated fp32
        # and sm_80 tiles spilled in the static sweep)
        candidates = [_FIXED_TILE]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_H": bh, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        for bm, bh, bk, warps, stages in candidates
    ]


# 128x128 tiles with 8 warps are the A100/H100 sweet spot for 16-bit GEMMs; 64-wide ones cover
# small M and the gated kernels' extra accumulators; BLOCK_K=32 ones are for float32 (half the
# shared memory per stage, and FMA dots that need more registers). Checked by compiling for sm_80
# and sm_90 with Triton 3.6 and 3.9 and reading ptxas' register/spill report: tiles spill once the
# fp32 accumulators take more than ~96 registers per thread (128x128 with 4 warps, 128x256, the
# gated kernels' 128x128), hence _prune's limit. _prune also drops what does not fit the call.
_FWD_TILES = (  # (BLOCK_M, BLOCK_H, BLOCK_K, num_warps, num_stages)
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 8, 3),
    (64, 128, 64, 8, 3),
    (64, 64, 64, 4, 4),
    (128, 64, 32, 4, 3),
    (64, 64, 32, 4, 3),
    (64, 64, 32, 8, 3),
)
_BWD_TILES = (  # two (three when gated) accumulators: 8 warps for the 128-wide tiles
    (128, 64, 64, 8, 3),
    (64, 128, 64, 8, 3),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 3),
    (64, 64, 32, 8, 3),
)
# The tile of FASTATTN_AUTOTUNE=0 (no autotuning: the GPU check's tests, a quick start): in both lists.
_FIXED_TILE = (64, 64, 32, 8, 3)
_FWD_CONFIGS, _BWD_CONFIGS = _configs(_FWD_TILES), _configs(_BWD_TILES)

_M_BUCKETS = (64, 256, 1024, 4096, 16384)


def _m_bucket(rows) -> int:
    """Autotuning key for the row count, so that a new batch size does not re-tune every time.
    Comparisons only: under torch.compile with dynamic shapes ``rows`` is a SymInt."""
    return next((bucket for bucket in _M_BUCKETS if rows <= bucket), 65536)


# Register budgets per thread (accumulators, operand tiles) by (architecture, 4-byte inputs), fitted
# to a `make check-sass` sweep of every tile above (sm_90a and sm_80, bf16 and fp32, plain and gated,
# forward and backward; benchmarks/NOTES.md): each rule keeps no tile that spilled there. Hopper's
# wgmma reads bf16 operands from shared memory, so only the operand staging of 4-stage 4-warp tiles
# spills; sm_80's mma.sync and all fp32 (CUDA-core) dots hold operand fragments in registers.
_REGISTER_BUDGETS = {  # (max accumulators + operands, max operands)
    (90, False): (256, 32),  # gated 64x128x64 (40 operand registers) spilled with Triton 3.6
    (80, False): (88, 256),
    (90, True): (96, 256),
    (80, True): (96, 32),
}


def _register_estimate(bm: int, bh: int, bk: int, warps: int, accumulators: int, w_tiles: int, element_size: int):
    """(fp32 accumulator registers, operand-tile registers) per thread of a tile."""
    threads = 32 * warps
    return accumulators * bm * bh / threads, (bm * bk + w_tiles * bh * bk) * element_size / 4 / threads


def _prune(configs, args, accumulators: int, shared_memory: int | None = None, capability: int | None = None):
    """Keep the configs that fit this call: pipeline buffers (x tile + gate and up w1 tiles per
    stage; the backward's dout/w2 loop needs less and reuses them) within the device's shared
    memory, registers within the architecture's budget (_REGISTER_BUDGETS: beyond, ptxas spills),
    and tiles not mostly padding for the problem's M and hidden. ``shared_memory`` and
    ``capability`` default to those of x's device."""
    if len(configs) <= 1:
        return configs
    element_size = args["x_ptr"].element_size()
    w_tiles = 2 if args["GATED"] else 1
    device = args["x_ptr"].device
    if shared_memory is None:
        shared_memory = common.shared_memory_limit(device)
    if capability is None:
        capability = common.capability(device)
    arch = 90 if capability >= 90 else 80
    max_total, max_operands = _REGISTER_BUDGETS[(arch, element_size == 4)]
    kept = []
    for c in configs:
        bm, bh, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_H"], c.kwargs["BLOCK_K"]
        smem = c.num_stages * (bm * bk + w_tiles * bh * bk) * element_size
        acc, operands = _register_estimate(bm, bh, bk, c.num_warps, accumulators, w_tiles, element_size)
        fits = smem <= shared_memory and acc <= 96 and acc + operands <= max_total and operands <= max_operands
        if fits and bm // 2 < args["M_BUCKET"] and bh // 2 < args["H"]:
            kept.append(c)
    # nothing fits: the smallest tile, with the most warps (fewest registers per thread)
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_H"] * c.kwargs["BLOCK_K"], -c.num_warps))]


def _prune_fwd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return _prune(configs, args, accumulators=2 if args["GATED"] else 1)


def _prune_bwd(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # h (gate and up when gated) and da
    return _prune(configs, args, accumulators=3 if args["GATED"] else 2)


# --------------------------------------------------------------------------------------------
# device functions
# --------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, UPCAST_DOT: tl.constexpr, EXACT_FP32: tl.constexpr):
    """acc + a·b; under the interpreter bf16 dots are wrong (Triton 3.8/3.9), so it upcasts there.
    float32 inputs must match the oracle to ~1e-5: full-precision dots, no TF32 (torch's matmul
    default is also full fp32)."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if EXACT_FP32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _sigmoid(h):
    # exp of -|h| only: no overflow to inf for large negative h
    e = tl.exp(-tl.abs(h))
    return tl.where(h >= 0.0, 1.0, e) / (1.0 + e)


@triton.jit
def _tanh(u):
    # 1 - 2/(e^{2u} + 1): exact limits ±1 when e^{2u} over/underflows, no NaN
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _activation(h, ACTIVATION: tl.constexpr):
    """act(h) in float32; ACTIVATION: the code of relu, gelu (exact, erf), gelu_tanh or silu."""
    if ACTIVATION == _RELU:
        out = tl.where(h < 0.0, 0.0, h)  # NaN stays NaN, as torch.relu (tl.maximum would drop it)
    elif ACTIVATION == _GELU:
        out = 0.5 * h * (1.0 + tl.math.erf(h * _SQRT_HALF))
    elif ACTIVATION == _GELU_TANH:
        out = 0.5 * h * (1.0 + _tanh((h + h * _GELU_TANH_CUBIC * h * h) * _SQRT_2_OVER_PI))
    else:  # silu
        out = h * _sigmoid(h)
    return out


@triton.jit
def _activation_grad(h, ACTIVATION: tl.constexpr):
    """d act / d h in float32."""
    if ACTIVATION == _RELU:
        grad = tl.where(h <= 0.0, 0.0, 1.0)  # at NaN the gradient passes, as torch's
    elif ACTIVATION == _GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(h * _SQRT_HALF))
        pdf = tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
        grad = cdf + h * pdf
    elif ACTIVATION == _GELU_TANH:
        t = _tanh((h + h * _GELU_TANH_CUBIC * h * h) * _SQRT_2_OVER_PI)
        grad = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + h * _GELU_TANH_CUBIC_3 * h)
    else:  # silu
        s = _sigmoid(h)
        grad = s * (1.0 + h * (1.0 - s))
    return grad


@triton.jit
def _keep(seed, rows, first_col, hidden, dropout_p, INDEX_64: tl.constexpr, BLOCK_H: tl.constexpr):
    """The dropout keep-mask of the tile (rows, first_col + [0, BLOCK_H)) of the (M, hidden)
    activation, so that forward, backward and ``dropout_mask`` agree. The one dropout scheme of every
    backend (fastattn/triton/dropout.py, csrc/dropout_rng.h): Philox stream 0, row, column; one
    Philox call per 4 consecutive columns of a row (counter (col // 4, row, 0, 0)) gives their 4
    draws (a quarter of tl.rand's work, and of its registers in the epilogue). first_col is a
    multiple of 4. The counters are 32-bit for any M < 2^32, so hidden and INDEX_64 (kept for the
    call sites) do not enter."""
    return _rng.quad_keep(seed, 0, rows, first_col // 4, dropout_p, BLOCK_H // 4)


@triton.jit
def _tile_ids(M, H, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_h) of this program, in groups of GROUP_M row blocks so that neighbouring programs
    share w1 columns in L2."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_h = tl.cdiv(H, BLOCK_H)
    in_group = GROUP_M * blocks_h
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_h = (pid % in_group) // group_size
    return pid_m, pid_h


@triton.jit
def _gemm_tile(
    a_ptr, b_ptr, rows, cols, depth, stride_am, stride_ak, stride_bn, stride_bk, b_col_offset,
    acc_b, acc_c, TWO_B: tl.constexpr, UPCAST_DOT: tl.constexpr, EXACT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc_b += A[rows, :]·B[cols, :]ᵀ over ``depth`` (and acc_c += A·B[cols + b_col_offset, :]ᵀ when
    TWO_B: the gated up half, reading each A tile once). ``rows``/``cols`` are already wrapped into
    range (row % M), so only the depth needs a mask."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + cols.to(tl.int64)[None, :] * stride_bn + ks[:, None] * stride_bk
    c_ptrs = b_ptrs + b_col_offset * stride_bn
    for k0 in range(0, depth, BLOCK_K):
        in_depth = ks < depth - k0
        a_tile = tl.load(a_ptrs, mask=in_depth[None, :], other=0.0)
        b_tile = tl.load(b_ptrs, mask=in_depth[:, None], other=0.0)
        acc_b = _mma(a_tile, b_tile, acc_b, UPCAST_DOT, EXACT_FP32)
        if TWO_B:
            c_tile = tl.load(c_ptrs, mask=in_depth[:, None], other=0.0)
            acc_c = _mma(a_tile, c_tile, acc_c, UPCAST_DOT, EXACT_FP32)
            c_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc_b, acc_c


@triton.jit
def _add_bias(acc, b_ptr, cols, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    return acc


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.autotune(configs=_FWD_CONFIGS, key=["M_BUCKET", "K", "H"], prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _ffn_up_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, a_ptr,
    M, K, H, M_BUCKET, seed_ptr, dropout_p,
    stride_xm, stride_xk, stride_w1h, stride_w1k, stride_am,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INDEX_64: tl.constexpr, UPCAST_DOT: tl.constexpr, EXACT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """a[rows, cols] = dropout(act(x·w1ᵀ + b1)) (gated: act(gate)·up), h kept in registers."""
    pid_m, pid_h = _tile_ids(M, H, BLOCK_M, BLOCK_H, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rows_in, cols_in = rows % M, cols % H  # wrapped: loads need no row/col masks, stores are masked

    gate = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    gate, up = _gemm_tile(
        x_ptr, w1_ptr, rows_in, cols_in, K, stride_xm, stride_xk, stride_w1h, stride_w1k, H,
        gate, up, GATED, UPCAST_DOT, EXACT_FP32, BLOCK_M, BLOCK_H, BLOCK_K,
    )
    act = _activation(_add_bias(gate, b1_ptr, cols_in, HAS_BIAS), ACTIVATION)
    if GATED:
        act = act * _add_bias(up, b1_ptr + H, cols_in, HAS_BIAS)
    if HAS_DROPOUT:
        keep = _keep(tl.load(seed_ptr), rows, pid_h * BLOCK_H, H, dropout_p, INDEX_64, BLOCK_H)
        act = tl.where(keep, act / (1.0 - dropout_p), 0.0)

    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + cols[None, :]
    tl.store(a_ptrs, act.to(a_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < H))


@triton.autotune(configs=_BWD_CONFIGS, key=["M_BUCKET", "K", "H", "N"], prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _ffn_up_bwd_kernel(
    x_ptr, w1_ptr, b1_ptr, dout_ptr, w2_ptr, a_ptr, dh_ptr,
    M, K, H, N, M_BUCKET, seed_ptr, dropout_p,
    stride_xm, stride_xk, stride_w1h, stride_w1k, stride_dom, stride_don, stride_w2n, stride_w2h,
    stride_am, stride_dhm,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INDEX_64: tl.constexpr, UPCAST_DOT: tl.constexpr, EXACT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Recomputes h = x·w1ᵀ + b1 and da = dout·w2 for a (rows, cols) tile, then writes
    dh = d(out)/d(h) (gated: gate columns, then up columns) and the activation a (for dw2)."""
    pid_m, pid_h = _tile_ids(M, H, BLOCK_M, BLOCK_H, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rows_in, cols_in = rows % M, cols % H

    gate = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    gate, up = _gemm_tile(
        x_ptr, w1_ptr, rows_in, cols_in, K, stride_xm, stride_xk, stride_w1h, stride_w1k, H,
        gate, up, GATED, UPCAST_DOT, EXACT_FP32, BLOCK_M, BLOCK_H, BLOCK_K,
    )
    # da[m, j] = Σ_n dout[m, n]·w2[n, j]: w2's "rows" of this GEMM are its columns j
    d_act = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    d_act, unused = _gemm_tile(
        dout_ptr, w2_ptr, rows_in, cols_in, N, stride_dom, stride_don, stride_w2h, stride_w2n, 0,
        d_act, d_act, False, UPCAST_DOT, EXACT_FP32, BLOCK_M, BLOCK_H, BLOCK_K,
    )

    gate = _add_bias(gate, b1_ptr, cols_in, HAS_BIAS)
    act = _activation(gate, ACTIVATION)
    if HAS_DROPOUT:  # out used act·keep/(1-p): the same factor scales the gradient
        keep = _keep(tl.load(seed_ptr), rows, pid_h * BLOCK_H, H, dropout_p, INDEX_64, BLOCK_H)
        scale = tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)
        d_act = d_act * scale
    d_gate = d_act * _activation_grad(gate, ACTIVATION)
    if GATED:
        up = _add_bias(up, b1_ptr + H, cols_in, HAS_BIAS)
        d_up = d_act * act
        d_gate = d_gate * up
        act = act * up
    if HAS_DROPOUT:
        act = act * scale

    in_tile = (rows[:, None] < M) & (cols[None, :] < H)
    row_offsets = rows.to(tl.int64)[:, None]
    tl.store(a_ptr + row_offsets * stride_am + cols[None, :], act.to(a_ptr.dtype.element_ty), mask=in_tile)
    dh_ptrs = dh_ptr + row_offsets * stride_dhm + cols[None, :]
    tl.store(dh_ptrs, d_gate.to(dh_ptr.dtype.element_ty), mask=in_tile)
    if GATED:
        tl.store(dh_ptrs + H, d_up.to(dh_ptr.dtype.element_ty), mask=in_tile)


@triton.jit
def _keep_mask_kernel(
    mask_ptr, M, H, seed_ptr, dropout_p, INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    keep = _keep(tl.load(seed_ptr), rows, tl.program_id(1) * BLOCK_H, H, dropout_p, INDEX_64, BLOCK_H)
    ptrs = mask_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < M) & (cols[None, :] < H))


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _needs_64bit_counter(rows: int, hidden: int) -> bool:
    return rows * ((hidden + 3) // 4) >= 2**31


def _kernel_flags(x: torch.Tensor, activation: str, dropout_p: float, rows: int, hidden: int) -> dict:
    return {
        "ACTIVATION": activations.base_code(activation),
        "GATED": activation in GATED_ACTIVATIONS,
        "HAS_DROPOUT": dropout_p > 0.0,
        "INDEX_64": _needs_64bit_counter(rows, hidden),
        "UPCAST_DOT": common.INTERPRETING,
        "EXACT_FP32": x.dtype == torch.float32,
    }


def _grid(rows: int, hidden: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(hidden, meta["BLOCK_H"]),)


def _define_op(name: str):
    """A ``triton_op`` (torch.compile traces into it and sees the kernels); under the interpreter a
    plain opaque ``custom_op`` with a fake registered below, because interpreted kernels can be
    launched but not traced (torch would drop them from the graph)."""
    if common.INTERPRETING:
        return torch.library.custom_op(name, mutates_args=())
    return triton_op(name, mutates_args=())


def _hidden(w1: torch.Tensor, activation: str) -> int:
    return w1.size(0) // 2 if activation in GATED_ACTIVATIONS else w1.size(0)


@_define_op("fastattn_triton::ffn_fwd")
def ffn_fwd(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    dropout_p: float,
    seed: torch.Tensor | None,
) -> torch.Tensor:
    """out (M, N) = dropout(act(x·w1ᵀ + b1))·w2ᵀ + b2 for x (M, K)."""
    rows, depth = x.shape
    hidden = _hidden(w1, activation)
    a = empty(rows, hidden, dtype=x.dtype, device=x.device)
    wrap_triton(_ffn_up_fwd_kernel)[_grid(rows, hidden)](
        x, w1, b1 if b1 is not None else w1, a,
        rows, depth, hidden, _m_bucket(rows), seed_arg(seed, dropout_p, x), dropout_p,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), a.stride(0),
        HAS_BIAS=b1 is not None, **_kernel_flags(x, activation, dropout_p, rows, hidden),
    )  # fmt: skip
    if b2 is None:
        return torch.mm(a, w2.t())
    return torch.addmm(b2, a, w2.t())


@_define_op("fastattn_triton::ffn_bwd")
def ffn_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    activation: str,
    dropout_p: float,
    seed: torch.Tensor | None,
    need_dx: bool,
    need_dw1: bool,
    need_dw2: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1, db1, dw2, db2); those not needed (and db1 without b1) come back empty."""
    rows, depth = x.shape
    width = dout.size(1)
    hidden = _hidden(w1, activation)
    a = empty(rows, hidden, dtype=x.dtype, device=x.device)
    dh = empty(rows, w1.size(0), dtype=x.dtype, device=x.device)
    wrap_triton(_ffn_up_bwd_kernel)[_grid(rows, hidden)](
        x, w1, b1 if b1 is not None else w1, dout, w2, a, dh,
        rows, depth, hidden, width, _m_bucket(rows), seed_arg(seed, dropout_p, x), dropout_p,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), dout.stride(0), dout.stride(1),
        w2.stride(0), w2.stride(1), a.stride(0), dh.stride(0),
        HAS_BIAS=b1 is not None, **_kernel_flags(x, activation, dropout_p, rows, hidden),
    )  # fmt: skip
    # A fresh empty tensor for each gradient not computed: a custom op may not return aliased outputs.
    dx = torch.mm(dh, w1) if need_dx else x.new_empty(0)
    dw1 = torch.mm(dh.t(), x) if need_dw1 else x.new_empty(0)
    db1 = dh.sum(0, dtype=torch.float32).to(x.dtype) if need_dw1 and b1 is not None else x.new_empty(0)
    dw2 = torch.mm(dout.t(), a) if need_dw2 else x.new_empty(0)
    db2 = dout.sum(0, dtype=torch.float32).to(x.dtype) if need_dw2 else x.new_empty(0)
    return dx, dw1, db1, dw2, db2


if common.INTERPRETING:

    @ffn_fwd.register_fake
    def _ffn_fwd_fake(x, w1, b1, w2, b2, activation, dropout_p, seed):
        return x.new_empty(x.size(0), w2.size(0))

    @ffn_bwd.register_fake
    def _ffn_bwd_fake(dout, x, w1, b1, w2, activation, dropout_p, seed, need_dx, need_dw1, need_dw2):
        def like(t, needed):
            return x.new_empty(t.shape) if needed else x.new_empty(0)

        db1 = like(b1, need_dw1) if b1 is not None else x.new_empty(0)
        db2 = x.new_empty(dout.size(1)) if need_dw2 else x.new_empty(0)
        return like(x, need_dx), like(w1, need_dw1), db1, like(w2, need_dw2), db2


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------


def dropout_mask(seed, rows: int, hidden: int, dropout_p: float, device) -> torch.Tensor:
    """The exact keep-mask (bool (rows, hidden), True = kept) that ``feed_forward`` applies to its
    (rows, hidden) activation for this seed (an int, or the seed tensor the op takes) and dropout_p,
    so tests can replay it through ``reference.feed_forward(..., dropout_mask=...)``."""
    out = torch.empty(rows, hidden, dtype=torch.int8, device=device)
    if out.numel():
        seed = seed.to(device) if isinstance(seed, torch.Tensor) else torch.tensor([int(seed)], dtype=torch.int64, device=device)
        grid = (triton.cdiv(rows, 32), triton.cdiv(hidden, 32))
        _keep_mask_kernel[grid](out, rows, hidden, seed, dropout_p, _needs_64bit_counter(rows, hidden), 32, 32)
    return out.bool()


# --------------------------------------------------------------------------------------------
# the kernel provider (protocol in fastattn/ops/feed_forward.py)
# --------------------------------------------------------------------------------------------


class Kernels:
    native_autograd = False
    forward_op = "fastattn_triton::ffn_fwd"

    def supports(self, call) -> str | None:
        if call.dtype not in SUPPORTED_DTYPES:
            return f"the Triton FFN runs in float16, bfloat16 or float32, not {call.dtype}"
        if call.activation not in ACTIVATIONS:
            return f"unknown activation {call.activation!r}"
        return None

    def forward(self, p, x, w1, b1, w2, b2):
        return ffn_fwd(x, w1, b1, w2, b2, p.activation, p.dropout_p, p.seed)

    def backward(self, p, dout, x, w1, b1, w2, need_dx, need_dw1, need_db1, need_dw2, need_db2):
        dx, dw1, db1, dw2, db2 = ffn_bwd(
            dout, x, w1, b1, w2, p.activation, p.dropout_p, p.seed, need_dx, need_dw1 or need_db1, need_dw2 or need_db2
        )
        return (dx if need_dx else None, dw1 if need_dw1 else None, db1 if need_db1 else None,
                dw2 if need_dw2 else None, db2 if need_db2 else None)  # fmt: skip

    def dropout_keep_mask(self, shape, dropout_p, seed, device):
        return dropout_mask(seed, *shape, dropout_p, device)


KERNELS = {"feed_forward": feed_forward_op.bind(Kernels())}
