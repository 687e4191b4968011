"""The CUDA kernels and their torch glue, run on the CPU emulator, against the float64 oracle.

The .cu files and csrc/cuda/*_api.cpp are compiled as C++ with FASTATTN_EMULATE (see emu.h) into
a torch library whose ops are ``torch.ops.fastattn_emu.*`` (the schemas of csrc/fastattn.cpp)
and take CPU tensors. Every kernel path is reachable: FASTATTN_EMU_SM picks the tensor-core
(>= 80) or the CUDA-core (< 80) attention kernels. Checks follow the project's numerics rule
(tests/helpers.assert_rule); dropout is checked exactly against csrc/dropout_rng.h's Philox in
NumPy (tests/helpers.dropout_keep_oracle) and against the CPU extension's mask.

    python -m pytest csrc/cuda/tools/emulate/test_emulated.py -q -n 0
"""

from __future__ import annotations

import math
import os
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[4]
HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

os.environ["FASTATTN_POISON_OUTPUTS"] = "1"  # the glue NaN-fills outputs: unwritten elements show
GUARD = 67  # NaN elements the glue puts before and after each floating output (api_utils.h new_output)
os.environ["FASTATTN_GUARD_OUTPUTS"] = str(GUARD)

from helpers import assert_rule, dropout_keep_oracle  # noqa: E402

from fastattn import reference  # noqa: E402
from fastattn.utils import zero_hidden_scores  # noqa: E402

CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")


def _build():
    from torch.utils.cpp_extension import load

    build_dir = ROOT / "build" / "cuda_emu"
    build_dir.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "csrc" / "fastattn.cpp").read_text()
    start = text.index("TORCH_LIBRARY(fastattn, m)")
    end = text.index("\n}\n", start) + 3
    schemas = build_dir / "fastattn_emu_schemas.inc"
    block = text[start:end].replace("TORCH_LIBRARY(fastattn, m)", "TORCH_LIBRARY(fastattn_emu, m)")
    if not schemas.exists() or schemas.read_text() != block:
        schemas.write_text(block)
    sources = [HERE / "emu.cpp", HERE / "emu_glue.cpp"] + sorted(HERE.glob("emu_kernels_*.cpp"))
    load(
        name="fastattn_cuda_emu",
        sources=[str(s) for s in sources],
        extra_cflags=[
            "-O1",
            "-DFASTATTN_EMULATE",
            "-DFASTATTN_WITH_CUDA",
            f"-I{build_dir}",
            f"-I{CUDA_INCLUDE}",
        ],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.fastattn_emu


def assert_guards_intact(t: torch.Tensor, name: str, guard: int = GUARD) -> None:
    """The `guard` elements before and after an output in its allocation are still NaN: no kernel
    wrote past either end of it."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (t.untyped_storage().nbytes() // t.element_size(),))
    start, end = t.storage_offset(), t.storage_offset() + t.numel()
    assert start == guard and flat.numel() == end + guard, f"{name}: not allocated with guard bands"
    before, after = flat[:start], flat[end:]
    assert torch.isnan(before).all(), f"{name}: written before its start at {(~torch.isnan(before)).nonzero().flatten()}"
    assert torch.isnan(after).all(), f"{name}: written past its end at {(~torch.isnan(after)).nonzero().flatten()}"


class GuardedOps:
    """torch.ops.fastattn_emu whose every call checks the guard bands of the outputs it returns."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        op = getattr(self._ops, name)

        def call(*args):
            result = op(*args)
            for i, t in enumerate(result if isinstance(result, (tuple, list)) else [result]):
                assert_guards_intact(t, f"{name} output {i}")
            return result

        return call


@pytest.fixture(scope="session")
def ops():
    if not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_runtime.h")):
        pytest.skip(f"no CUDA headers under {CUDA_INCLUDE}")
    return GuardedOps(_build())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0x5EED)


@pytest.fixture
def emulated_sm(monkeypatch):
    def set_sm(sm: int):
        monkeypatch.setenv("FASTATTN_EMU_SM", str(sm))

    return set_sm


# ---------------------------------------------------------------------------------------------
# dropout: csrc/dropout_rng.h (Philox 4x32-10), the NumPy oracle of tests/helpers.py
# ---------------------------------------------------------------------------------------------


def keep_mask(seed: int, shape, dropout_p: float) -> torch.Tensor:
    """Kept elements of a row-major tensor of `shape`, read as (streams, rows, cols)."""
    return dropout_keep_oracle(seed, shape, dropout_p)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout_mask(ops, p):
    like = torch.empty(3, 5, 7)
    got = ops.dropout_mask(like, p, torch.tensor([20240607]))
    assert got.dtype == torch.bool and got.shape == like.shape
    assert torch.equal(got, keep_mask(20240607, like.shape, p))
    with pytest.raises(ValueError, match="p must be"):
        ops.dropout_mask(like, 1.0, torch.tensor([0]))


@pytest.mark.parametrize("shape", [(2, 3, 13, 37), (1, 1, 1, 1), (39, 66), (13, 37)], ids=str)
def test_dropout_mask_is_the_cpu_extensions(ops, shape):
    """The CUDA dropout_mask kernel draws what the CPU kernels draw (attention (B, Hq, Nq, Nk) and
    FFN (M, hidden) shapes, hidden not a multiple of 4)."""
    import fastattn

    if fastattn.backends()["cpu"] is not None:
        pytest.skip(f"cpu extension: {fastattn.backends()['cpu']}")
    for seed in (0, -7, 2**62 + 3):
        got = ops.dropout_mask(torch.empty(shape), 0.3, torch.tensor([seed]))
        assert torch.equal(got, torch.ops.fastattn.dropout_mask(torch.empty(shape), 0.3, torch.tensor([seed]))), seed


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (the kernels read any strides)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "bnhd":  # (B, N, H, D) storage, as a projection's output reshaped
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "padded":  # rows longer than D: no 16-byte vector path
        pad = torch.randn(*t.shape[:-1], t.size(-1) + 3, dtype=t.dtype)
        pad[..., : t.size(-1)] = t
        return pad[..., : t.size(-1)]
    raise ValueError(layout)


def _attention_mask(kind, b, h, n_q, n_k, dtype):
    if kind is None:
        return None
    if kind == "key_padding":  # (B, 1, 1, Nk) bool, never expanded in memory
        keep = torch.rand(b, 1, 1, n_k) > 0.3
        keep[..., 0] = True
        return keep
    if kind == "float":  # additive, with -inf entries, in float32
        bias = torch.randn(1, h, n_q, n_k)
        return bias.masked_fill(torch.rand(1, h, n_q, n_k) < 0.2, float("-inf"))
    if kind == "float_same_dtype":
        return torch.randn(b, 1, n_q, n_k).to(dtype)
    if kind == "fully_masked_rows":  # bool with a few query rows masked everywhere
        keep = torch.rand(b, h, n_q, n_k) > 0.5
        keep[:, :, ::3] = False
        return keep
    raise ValueError(kind)


# Sizes give every kernel several key blocks (online-softmax rescaling, the cp.async pipelines of
# the forward and the backward's dQ kernel) and most of them several query blocks (the pipeline of
# the backward's dK/dV kernel, across the query heads of a GQA group too).
ATTENTION_CASES = [
    # dtype, B, Hq, Hkv, Nq, Nk, D, Dv, causal, mask, dropout, layout
    ("fp16", 1, 2, 2, 70, 150, 64, 64, False, None, 0.0, "contiguous"),
    ("bf16", 1, 2, 1, 133, 80, 64, 64, True, None, 0.0, "bnhd"),
    ("fp16", 2, 2, 1, 20, 100, 40, 24, True, "key_padding", 0.0, "padded"),
    ("fp16", 1, 1, 1, 40, 140, 128, 128, False, "float", 0.0, "contiguous"),
    ("bf16", 1, 2, 2, 17, 70, 32, 32, False, "fully_masked_rows", 0.0, "contiguous"),
    ("fp16", 1, 2, 2, 24, 90, 64, 64, False, "float_same_dtype", 0.2, "contiguous"),
    ("fp16", 1, 1, 1, 18, 70, 256, 200, True, None, 0.0, "contiguous"),
    ("fp32", 1, 2, 1, 21, 35, 48, 48, True, "key_padding", 0.0, "bnhd"),
    ("fp32", 1, 2, 2, 19, 50, 64, 32, False, "fully_masked_rows", 0.3, "padded"),
    ("fp32", 1, 1, 1, 9, 40, 256, 256, False, None, 0.0, "contiguous"),
]
# Ragged lengths around every block size the attention kernels use (query blocks 64/32/16/8, key
# blocks 64/32/16; which one depends on D, the arch and the kernel: forward, backward dK/dV, backward
# dQ): Nq and Nk = block - 1, block + 1, 2·block - 1, so a last block that is one row short or one
# row over shows. A list of its own so that a kernel change can extend it without touching the rest.
# D -> the block sizes its kernels use: 64: mma 64 (fwd, dK/dV, dQ), CUDA-core 32; 128: mma 64 (fwd,
# dK/dV keys, dQ rows) and 32 (dK/dV query blocks, dQ key blocks), CUDA-core 16 (and 32 fwd keys);
# 256: CUDA-core 16 and 8.
RAGGED_BLOCKS = {64: (64, 32), 128: (64, 32, 16), 256: (16, 8)}
ATTENTION_RAGGED_CASES = [
    (dtype, 1, 2, 1, nq, nk, d, d, causal, None, 0.0, "contiguous")
    for d, blocks in RAGGED_BLOCKS.items()
    for block in blocks
    for (nq, nk), causal, dtype in zip(
        [(block - 1, block + 1), (block + 1, block - 1), (2 * block - 1, 2 * block - 1), (block + 1, 2 * block - 1)],
        [False, True, True, False],
        ["fp16", "bf16", "fp16", "fp32"],
    )
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _attention_case_id(case):
    dtype, b, hq, hkv, nq, nk, d, dv, causal, mask, p, layout = case
    return f"{dtype}-h{hq}/{hkv}-n{nq}x{nk}-d{d}/{dv}-{'causal' if causal else 'full'}-{mask}-p{p}-{layout}"


def _lse_oracle(q, k, mask, causal, scale):
    scores = reference.attention_scores(q, k, mask, causal, scale, enable_gqa=q.size(1) != k.size(1))
    lse = torch.logsumexp(scores, dim=-1)
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


@pytest.mark.parametrize("sm", [80, 75])
@pytest.mark.parametrize("case", ATTENTION_CASES + ATTENTION_RAGGED_CASES, ids=_attention_case_id)
def test_attention(ops, emulated_sm, case, sm):
    dtype_name, b, hq, hkv, nq, nk, d, dv, causal, mask_kind, dropout_p, layout = case
    if sm == 75 and dtype_name == "fp32":
        pytest.skip("fp32 takes the same CUDA-core kernels on every arch (covered by sm 80)")
    emulated_sm(sm)
    dtype = DTYPES[dtype_name]
    q = _layout(torch.randn(b, hq, nq, d).to(dtype), layout)
    k = _layout(torch.randn(b, hkv, nk, d).to(dtype), layout)
    v = _layout(torch.randn(b, hkv, nk, dv).to(dtype), layout)
    mask = _attention_mask(mask_kind, b, hq, nq, nk, dtype)
    mask_view = None if mask is None else mask.expand(b, hq, nq, nk)
    scale = 0.7 / math.sqrt(d)
    seed = 1234567
    drop = keep_mask(seed, (b, hq, nq, nk), dropout_p) if dropout_p > 0 else None

    seed_t = torch.tensor([seed]) if dropout_p > 0 else None
    out, lse = ops.attention_fwd(q, k, v, mask_view, scale, causal, dropout_p, seed_t)

    def run_reference(qq, kk, vv, mm):
        return reference.attention(qq, kk, vv, mm, dropout_p, causal, scale, hq != hkv, drop)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mask64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    oracle = run_reference(*leaves64, mask64)
    naive = run_reference(*leaves, mask)
    assert out.dtype == dtype and out.shape == (b, hq, nq, dv)
    assert_rule(out, naive, oracle, k=2, name="out")
    lse_oracle = _lse_oracle(q.double(), k.double(), mask64, causal, scale).float()
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, nq)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_oracle)), "lse: +inf rows differ"
    finite = torch.isfinite(lse_oracle)
    assert torch.allclose(lse[finite], lse_oracle[finite], rtol=1e-4, atol=1e-4), "lse"

    dout = _layout(torch.randn(b, hq, nq, dv).to(dtype), layout)
    grads = ops.attention_bwd(dout, q, k, v, out, lse, mask_view, scale, causal, dropout_p, seed_t)
    grads_oracle = torch.autograd.grad(oracle, leaves64, dout.double())
    grads_naive = torch.autograd.grad(naive, leaves, dout)
    for name, got, want, ref in zip(("dq", "dk", "dv"), grads, grads_oracle, grads_naive):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert_rule(got, ref, want, k=3, name=name)


def test_attention_gqa_group_of_four_causal_long(ops, emulated_sm):
    """Several key blocks and query blocks per head, GQA 4:1, causal with Nq > Nk."""
    emulated_sm(80)
    q = torch.randn(1, 4, 150, 32).half()
    k = torch.randn(1, 1, 130, 32).half()
    v = torch.randn(1, 1, 130, 32).half()
    out, lse = ops.attention_fwd(q, k, v, None, 0.2, True, 0.0, None)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    oracle = reference.attention(*leaves64, None, 0.0, True, 0.2, True)
    naive = reference.attention(q, k, v, None, 0.0, True, 0.2, True)
    assert_rule(out, naive, oracle, k=2)
    dout = torch.randn_like(out)
    dq, dk, dv = ops.attention_bwd(dout, q, k, v, out, lse, None, 0.2, True, 0.0, None)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    naive = reference.attention(*leaves, None, 0.0, True, 0.2, True)
    for got, want, ref in zip(
        (dq, dk, dv), torch.autograd.grad(oracle, leaves64, dout.double()), torch.autograd.grad(naive, leaves, dout)
    ):
        assert_rule(got, ref, want, k=3)


@pytest.mark.parametrize("sm,dtype_name", [(80, "fp16"), (80, "bf16"), (75, "fp16"), (80, "fp32")])
def test_attention_backward_is_deterministic(ops, emulated_sm, sm, dtype_name):
    """Two backward calls on the same inputs give bitwise-equal gradients. The emulator runs the
    blocks of a launch in a new shuffled order on every call, so a gradient summed across blocks
    in block order (float atomics) differs between the calls; each dQ, dK and dV element must have
    one owner that sums in a fixed order. Several key and query blocks, GQA 2:1, causal, a mask and
    dropout, so every path that adds into a gradient takes part."""
    emulated_sm(sm)
    dtype = DTYPES[dtype_name]
    b, hq, hkv, nq, nk, d = 1, 4, 2, 97, 161, 64
    q = torch.randn(b, hq, nq, d).to(dtype)
    k = torch.randn(b, hkv, nk, d).to(dtype)
    v = torch.randn(b, hkv, nk, d).to(dtype)
    mask = _attention_mask("key_padding", b, hq, nq, nk, dtype).expand(b, hq, nq, nk)
    seed = torch.tensor([4242])
    out, lse = ops.attention_fwd(q, k, v, mask, 0.125, True, 0.1, seed)
    dout = torch.randn_like(out)
    first = ops.attention_bwd(dout, q, k, v, out, lse, mask, 0.125, True, 0.1, seed)
    second = ops.attention_bwd(dout, q, k, v, out, lse, mask, 0.125, True, 0.1, seed)
    for name, x, y in zip(("dq", "dk", "dv"), first, second):
        assert not torch.isnan(x).any(), name
        assert torch.equal(x, y), f"{name}: two runs differ in {(x != y).sum().item()} elements"


@pytest.mark.parametrize("dtype_name,d", [("fp16", 64), ("bf16", 128)])
def test_attention_vectorized_stores(ops, emulated_sm, monkeypatch, dtype_name, d):
    """The forward's out and the backward's dq are stored two elements at a time when the output is
    4-byte aligned; the odd guard band of the other tests (67 elements) never is, so this test
    allocates the outputs behind a 64-element band. Ragged Nq/Nk, causal, GQA 2:1."""
    emulated_sm(80)
    monkeypatch.setenv("FASTATTN_GUARD_OUTPUTS", "64")
    raw = ops._ops
    dtype = DTYPES[dtype_name]
    q = torch.randn(1, 2, 67, d).to(dtype)
    k = torch.randn(1, 1, 75, d).to(dtype)
    v = torch.randn(1, 1, 75, d).to(dtype)
    out, lse = raw.attention_fwd(q, k, v, None, 0.1, True, 0.0, None)
    dout = torch.randn_like(out)
    grads = raw.attention_bwd(dout, q, k, v, out, lse, None, 0.1, True, 0.0, None)
    for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert t.storage_offset() * t.element_size() % 4 == 0, f"{name}: not 4-byte aligned, the test misses its point"
        assert_guards_intact(t, name, guard=64)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    oracle = reference.attention(*leaves64, None, 0.0, True, 0.1, True)
    naive = reference.attention(*leaves, None, 0.0, True, 0.1, True)
    assert_rule(out, naive, oracle, k=2, name="out")
    for name, got, want, ref in zip(("dq", "dk", "dv"), grads, torch.autograd.grad(oracle, leaves64, dout.double()),
                                    torch.autograd.grad(naive, leaves, dout)):
        assert_rule(got, ref, want, k=3, name=name)


def test_attention_rejects_bad_arguments(ops):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="k's head dim"):
        ops.attention_fwd(q, torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 8), None, 1.0, False, 0.0, None)
    with pytest.raises(ValueError, match="multiple of k's heads"):
        ops.attention_fwd(q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8), None, 1.0, False, 0.0, None)
    with pytest.raises(ValueError, match="head dims up to 256"):
        big = torch.randn(1, 1, 2, 300)
        ops.attention_fwd(big, big, big, None, 1.0, False, 0.0, None)
    with pytest.raises(ValueError, match="mask must be a"):
        ops.attention_fwd(q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool), 1.0, False, 0.0, None)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention_fwd(q, q, q, None, 1.0, False, 1.0, None)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        ops.attention_fwd(q.double(), q.double(), q.double(), None, 1.0, False, 0.0, None)


@pytest.mark.parametrize("sm", [80, 75])
def test_attention_nan_query_row_or_scale_gives_nan(ops, emulated_sm, sm):
    """NaN in, NaN out (as torch's SDPA): a NaN query row gives a NaN output row and NaN gradients,
    a NaN scale NaN everywhere; a fully masked row still gives zeros."""
    emulated_sm(sm)
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    q[0, 1, 4] = float("nan")
    mask = torch.ones(1, 2, 9, 9, dtype=torch.bool)
    mask[:, :, 6] = False
    out, lse = ops.attention_fwd(q, k, v, mask, 0.25, False, 0.0, None)
    assert torch.isnan(out[0, 1, 4]).all() and torch.isnan(lse[0, 1, 4])
    assert torch.equal(out[:, :, 6], torch.zeros(1, 2, 16))
    finite = torch.ones(1, 2, 9, dtype=torch.bool)
    finite[0, 1, 4] = False
    finite[:, :, 6] = False
    assert torch.isfinite(out[finite]).all()
    dq, dk, dv = ops.attention_bwd(torch.randn_like(out), q, k, v, out, lse, mask, 0.25, False, 0.0, None)
    assert torch.isnan(dq[0, 1, 4]).all() and torch.isnan(dk[0, 1]).all() and torch.isfinite(dk[0, 0]).all()
    out, lse = ops.attention_fwd(torch.randn(1, 2, 9, 16), k, v, mask, float("nan"), False, 0.0, None)
    assert torch.isnan(out[finite]).all() and torch.equal(out[:, :, 6], torch.zeros(1, 2, 16))


def test_ffn_relu_propagates_nan(ops):
    h = torch.randn(3, 40)
    h[1, 5] = float("nan")
    a = ops.ffn_act_fwd(h, None, "relu", 0.0, None)
    assert torch.isnan(a[1, 5]) and torch.equal(a.isnan(), h.isnan())
    dh = ops.ffn_act_bwd(torch.ones(3, 40), h, None, "relu", 0.0, None)
    assert dh[1, 5] == 1.0  # torch.relu's backward passes the gradient at NaN


def test_attention_no_keys_gives_zeros(ops):
    q = torch.randn(1, 2, 5, 16)
    kv = torch.randn(1, 2, 0, 16)
    out, lse = ops.attention_fwd(q, kv, kv, None, 1.0, False, 0.0, None)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isposinf(lse).all()
    dq, dk, dv = ops.attention_bwd(torch.randn_like(out), q, kv, kv, out, lse, None, 1.0, False, 0.0, None)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.numel() == 0 and dv.numel() == 0


# ---------------------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------------------


# The emulated grids are capped at 3 blocks, so these rows also run the kernels' grid-stride loops.
SOFTMAX_CASES = [
    # dtype, shape, transpose x, mask, causal, log, scale
    ("fp32", (3, 5, 37), True, None, False, False, 1.0),
    ("fp32", (7, 1100), False, "bool", False, False, 1.0),
    ("fp16", (2, 6, 33), False, "bool", True, False, 0.5),
    ("bf16", (4, 70), False, "float", False, True, 2.0),
    ("fp32", (2, 3, 1500), False, "bool_rows", False, True, 1.0),
    ("fp16", (3, 2100), True, "float", True, False, 1.0),
    ("fp32", (2, 1, 1, 1, 1, 1, 1, 1, 1, 3, 9), False, "bool", True, False, 1.0),
    # ragged rows and row counts around the warp (32 lanes), the 8 rows of a warp-per-row block,
    # 256-thread blocks and the 3-block grid cap
    ("fp32", (7, 31), False, None, False, False, 1.0),
    ("fp16", (9, 33), False, "bool", True, False, 1.0),
    ("bf16", (17, 63), False, None, False, True, 1.0),
    ("fp32", (25, 65), True, None, False, False, 1.0),
    ("fp16", (3, 255), False, "bool", False, True, 1.0),
    ("fp32", (4, 257), False, None, True, False, 1.0),
    ("fp32", (2, 1023), False, None, False, False, 1.0),
    ("bf16", (2, 1025), False, "bool", False, False, 1.0),
]


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[3]}-c{c[4]}-l{c[5]}")
def test_softmax(ops, case):
    dtype_name, shape, transposed, mask_kind, causal, log, scale = case
    dtype = DTYPES[dtype_name]
    x = torch.randn(*shape).to(dtype) * 3
    if transposed:  # same shape, rows not contiguous
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(shape[-1]) > 0.3  # broadcast over rows, stride 0
    elif mask_kind == "bool_rows":
        mask = torch.rand(*shape) > 0.5
        mask[..., 0, :] = False  # fully masked rows
    elif mask_kind == "float":
        mask = torch.randn(shape[-2], shape[-1]).masked_fill(torch.rand(shape[-2], shape[-1]) < 0.2, float("-inf"))
        mask[0] = float("-inf")
    mask_view = None if mask is None else mask.expand(shape)
    y = ops.softmax_fwd(x, mask_view, scale, causal, log)
    x64 = x.double().requires_grad_()
    xl = x.clone().requires_grad_()
    mask64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    oracle = reference.softmax(x64, -1, scale, mask64, causal, log)
    naive = reference.softmax(xl, -1, scale, mask, causal, log)
    assert y.dtype == dtype and y.shape == x.shape
    assert_rule(y, naive, oracle, k=2, name="y")
    dy = torch.randn(*shape).to(dtype)
    dx = ops.softmax_bwd(dy, y, scale, log)  # takes y only: log_softmax gives dy·scale at every -inf y ...
    if log:  # ... and the autograd (fastattn/ext.py) zeroes what the bool or causal mask hides
        dx = zero_hidden_scores(dx, mask_view if mask is not None and mask.dtype == torch.bool else None, causal)
    assert_rule(dx, torch.autograd.grad(naive, xl, dy)[0], torch.autograd.grad(oracle, x64, dy.double())[0], k=3)


def test_softmax_nan_row_gives_nan(ops):
    """NaN in, NaN out (as torch.softmax); a fully masked row still gives zeros (log: -inf)."""
    x = torch.randn(4, 40)
    x[1] = float("nan")
    x[2, 7] = float("nan")
    mask = torch.ones(4, 40, dtype=torch.bool)
    mask[3] = False
    for log in (False, True):
        y = ops.softmax_fwd(x, mask, 1.0, False, log)
        assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all(), log
        assert torch.equal(y[3], torch.full((40,), float("-inf") if log else 0.0))
        assert torch.isfinite(y[0]).all()


# ---------------------------------------------------------------------------------------------
# FFN epilogue
# ---------------------------------------------------------------------------------------------


FFN_SHAPES = [(37, 24), (31, 66), (33, 130), (2, 514)]  # (rows, columns of h): ragged around 32/64/128/256


@pytest.mark.parametrize("shape", FFN_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("dtype_name,dropout_p,bias", [("fp32", 0.0, True), ("fp16", 0.25, True), ("bf16", 0.0, False)])
def test_ffn_act(ops, activation, dtype_name, dropout_p, bias, shape):
    dtype = DTYPES[dtype_name]
    rows, cols = shape
    h = (torch.randn(rows, cols) * 3).to(dtype)
    h = h.t().contiguous().t()  # column-major storage
    b = torch.randn(cols).to(dtype) if bias else None
    seed = 987654321
    seed_t = torch.tensor([seed]) if dropout_p > 0 else None
    out = ops.ffn_act_fwd(h, b, activation, dropout_p, seed_t)
    hidden = cols // 2 if activation in reference.GATED_ACTIVATIONS else cols
    drop = keep_mask(seed, (rows, hidden), dropout_p).double() / (1 - dropout_p) if dropout_p > 0 else 1.0

    def run_reference(hh, bb):
        pre = hh if bb is None else hh + bb
        return reference.activate(pre, activation) * (drop if isinstance(drop, float) else drop.to(hh.dtype))

    h64, b64 = h.double().requires_grad_(), None if b is None else b.double()
    hl, bl = h.clone().requires_grad_(), b
    oracle, naive = run_reference(h64, b64), run_reference(hl, bl)
    assert out.shape == (rows, hidden) and out.dtype == dtype
    assert_rule(out, naive, oracle, k=2)
    grad = torch.randn(rows, hidden).to(dtype)
    dh = ops.ffn_act_bwd(grad, h, b, activation, dropout_p, seed_t)
    assert_rule(dh, torch.autograd.grad(naive, hl, grad)[0], torch.autograd.grad(oracle, h64, grad.double())[0], k=3)


# ---------------------------------------------------------------------------------------------
# norms
# ---------------------------------------------------------------------------------------------


NORM_CASES = [
    # dtype, M, N, residual, weight, bias, transposed
    ("fp32", 6, 40, False, True, True, False),
    ("fp16", 5, 300, True, True, False, True),
    ("bf16", 9, 64, True, False, False, False),
    ("fp32", 3, 9000, True, True, True, False),  # N beyond the register partials
    ("fp16", 40, 96, False, True, True, False),  # more rows than partial-sum blocks
    # ragged columns around the warp, the block and kColsInRegisters·blockDim (register partials)
    ("fp32", 7, 31, True, True, True, False),
    ("bf16", 5, 33, False, True, False, False),
    ("fp16", 3, 255, True, True, True, True),
    ("fp32", 9, 257, False, True, True, False),
    ("fp32", 2, 2047, True, True, True, False),
    ("fp16", 2, 2049, False, True, True, False),
]


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-r{c[3]}-w{c[4]}-b{c[5]}-t{c[6]}")
def test_norm(ops, case, rms):
    dtype_name, m, n, with_residual, with_weight, with_bias, transposed = case
    dtype = DTYPES[dtype_name]
    with_bias = with_bias and not rms
    x = (torch.randn(m, n) * 2 + 1).to(dtype)
    if transposed:
        x = x.t().contiguous().t()
    residual = torch.randn(m, n).to(dtype) if with_residual else None
    weight = (1 + torch.randn(n) * 0.1).to(dtype) if with_weight else None
    bias = torch.randn(n).to(dtype) if with_bias else None
    eps = 1e-5
    if rms:
        y, residual_out, rstd = ops.rms_norm_fwd(x, residual, weight, eps)
    else:
        y, residual_out, mean, rstd = ops.layer_norm_fwd(x, residual, weight, bias, eps)

    s = x if residual is None else x + residual  # rounded to dtype, as the kernel's residual_out
    s64 = s.double().requires_grad_()
    sl = s.clone().requires_grad_()
    params64 = [None if t is None else t.double().requires_grad_() for t in (weight, bias)]
    params = [None if t is None else t.clone().requires_grad_() for t in (weight, bias)]
    if rms:
        oracle = reference.rms_norm(s64, (n,), params64[0], eps)
        naive = reference.rms_norm(sl, (n,), params[0], eps)
    else:
        oracle = reference.layer_norm(s64, (n,), params64[0], params64[1], eps)
        naive = reference.layer_norm(sl, (n,), params[0], params[1], eps)
    assert_rule(y, naive, oracle, k=2, name="y")
    if residual is not None:
        assert torch.equal(residual_out, s), "residual_out"
    else:
        assert residual_out.numel() == 0
    s_d = s.double()
    var = s_d.var(dim=-1, unbiased=False) if not rms else s_d.pow(2).mean(dim=-1)
    assert torch.allclose(rstd.double(), torch.rsqrt(var + eps), rtol=1e-4), "rstd"
    if not rms:
        assert torch.allclose(mean.double(), s_d.mean(dim=-1), rtol=1e-4, atol=1e-5), "mean"

    dy = torch.randn(m, n).to(dtype)
    if rms:
        ds, dweight = ops.rms_norm_bwd(dy, s, weight, rstd)
        dbias = None
    else:
        ds, dweight, dbias = ops.layer_norm_bwd(dy, s, weight, mean, rstd, with_bias)
    inputs64 = [s64] + [t for t in params64 if t is not None]
    inputs = [sl] + [t for t in params if t is not None]
    g64 = torch.autograd.grad(oracle, inputs64, dy.double())
    g = torch.autograd.grad(naive, inputs, dy)
    assert_rule(ds, g[0], g64[0], k=3, name="ds")
    rest = [t for t in (dweight if with_weight else None, dbias if with_bias else None) if t is not None]
    for got, ref, want in zip(rest, g[1:], g64[1:]):
        assert_rule(got, ref, want, k=3, name="dparam")
    if not with_weight:
        assert dweight.numel() == 0
    if dbias is not None and not with_bias:
        assert dbias.numel() == 0


# ---------------------------------------------------------------------------------------------
# the guard bands themselves
# ---------------------------------------------------------------------------------------------


def test_guard_bands_catch_a_write_past_either_end(ops):
    """The check the GuardedOps wrapper runs on every output fails on one element written just
    before or just after an output."""
    y = ops.softmax_fwd(torch.randn(3, 5), None, 1.0, False, False)
    assert y.storage_offset() == GUARD and not torch.isnan(y).any()
    flat = torch.empty(0, dtype=y.dtype).set_(y.untyped_storage(), 0, (y.numel() + 2 * GUARD,))
    for index in (GUARD - 1, GUARD + y.numel()):
        flat[index] = 0.0
        with pytest.raises(AssertionError, match="written"):
            assert_guards_intact(y, "y")
        flat[index] = float("nan")
    assert_guards_intact(y, "y")
