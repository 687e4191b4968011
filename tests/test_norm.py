"""fastattn.layer_norm / rms_norm (with the fused residual add) on every backend against the float64
oracle, with the numerics rule.

Each check runs one call three ways: on the backend under test in the input's dtype, on the
"reference" backend in the same dtype (the naive error) and on the reference in float64 on the CPU
(the oracle). Outputs (y, and the sum s = x + residual) pass with k = 2; the gradients of x,
weight, bias and residual with k = 3. Without a GPU the Triton kernels run in the interpreter:
shapes stay small except where a test is about size, and the streamed (long-row) kernels are also
reached on small rows by shrinking their thresholds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_rule, backend_params, gpu_time_ms

import fastattn
from fastattn import dispatch
from fastattn.ops.norms import NormCall

BACKENDS = backend_params("triton", "cpu", "cuda", "reference")
ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
OPS = ["layer_norm", "rms_norm"]


def _require_kernel(backend: str, op: str) -> None:
    """Skip (with the reason) a backend that cannot run on this device or has no kernel for this op yet."""
    reason = dispatch.backend_unavailable_reason(backend, DEVICE)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    with fastattn.use_backend(backend):
        try:
            dispatch.select(op, NormCall(torch.device(DEVICE).type, torch.float32, op == "rms_norm"))
        except fastattn.BackendError as exc:
            if f"has no {op} kernel" in str(exc):
                pytest.skip(str(exc))
            raise


def norm(op, x, shape, weight=None, bias=None, residual=None, eps=None):
    """One call of the public function; eps None keeps each function's default."""
    kwargs = {} if eps is None else {"eps": eps}
    if op == "layer_norm":
        return fastattn.layer_norm(x, shape, weight, bias, residual=residual, **kwargs)
    assert bias is None
    return fastattn.rms_norm(x, shape, weight, residual=residual, **kwargs)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _run(backend, fn, tensors, grad_outs):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    with fastattn.use_backend(backend):
        outs = _as_tuple(fn(*leaves))
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, used, [g.to(o.device, o.dtype) for g, o in zip(grad_outs, outs)])
    return [o.detach() for o in outs], list(grads)


def check(backend, fn, *tensors):
    """The numerics rule for fn(*tensors) (None entries allowed) on ``backend``: every output, then
    the gradient of every tensor given. Returns the backend's outputs and gradients."""
    dtype = tensors[0].dtype
    with torch.no_grad(), fastattn.use_backend("reference"):
        shapes = [o.shape for o in _as_tuple(fn(*tensors))]
    grad_outs = [torch.randn(s, device=DEVICE, dtype=dtype) for s in shapes]
    outs, grads = _run(backend, fn, tensors, grad_outs)
    naive, naive_grads = _run("reference", fn, tensors, grad_outs)
    oracle_in = [None if t is None else t.detach().cpu().double() for t in tensors]
    oracle, oracle_grads = _run("reference", fn, oracle_in, [g.cpu().double() for g in grad_outs])
    for i, (o, n, r) in enumerate(zip(outs, naive, oracle)):
        assert o.dtype == dtype and o.shape == r.shape
        assert_rule(o, n, r, k=2, name=f"output {i}", dtype=dtype)
    for i, (g, n, r) in enumerate(zip(grads, naive_grads, oracle_grads)):
        assert g.shape == r.shape
        assert_rule(g, n, r, k=3, name=f"gradient {i}", dtype=dtype)
    return outs, grads


def rand(*shape, dtype=torch.float32, scale=1.0, offset=0.0):
    return torch.randn(*shape, device=DEVICE, dtype=dtype) * scale + offset


def _inputs(op, shape, normalized, dtype, weight, bias, residual):
    x = rand(*shape, dtype=dtype, scale=2.0, offset=0.5)
    w = rand(*normalized, dtype=dtype, offset=1.0) if weight else None
    b = rand(*normalized, dtype=dtype) if bias and op == "layer_norm" else None
    r = rand(*shape, dtype=dtype) if residual else None
    return x, w, b, r


# --------------------------------------------------------------------------------------------
# values and gradients
# --------------------------------------------------------------------------------------------


AFFINE = {"plain": (False, False), "weight": (True, False), "weight_bias": (True, True)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_configurations(backend, op, dtype, affine, residual):
    if op == "rms_norm" and affine == "weight_bias":
        pytest.skip("rms_norm has no bias")
    _require_kernel(backend, op)
    weight, bias = AFFINE[affine]
    x, w, b, r = _inputs(op, (6, 37), (37,), dtype, weight, bias, residual)
    check(backend, lambda x, w, b, r: norm(op, x, (37,), w, b, r), x, w, b, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "shape, normalized, dtype",
    [
        ((1, 1), (1,), torch.float32),
        ((1, 5), (5,), torch.float16),
        ((9, 1), (1,), torch.bfloat16),
        ((2, 3, 4, 50), (4, 50), torch.float32),  # normalised over two dims
        ((1823, 781), (781,), torch.float32),
        ((1823, 781), (781,), torch.bfloat16),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_shapes(backend, op, shape, normalized, dtype):
    _require_kernel(backend, op)
    x, w, b, r = _inputs(op, shape, normalized, dtype, True, True, True)
    check(backend, lambda x, w, b, r: norm(op, x, normalized, w, b, r, eps=1e-5), x, w, b, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_of_70k(backend, op, dtype):
    """Longer than the fused limit: rows streamed in chunks, forward and backward."""
    _require_kernel(backend, op)
    x, w, b, r = _inputs(op, (2, 70_000), (70_000,), dtype, True, True, True)
    check(backend, lambda x, w, b, r: norm(op, x, (70_000,), w, b, r), x, w, b, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_keeps_float32_precision(backend):
    """Rows far from zero: the variance must not cancel (two-pass / merged statistics)."""
    _require_kernel(backend, "layer_norm")
    x, w, b, _ = _inputs("layer_norm", (4, 300), (300,), torch.float32, True, True, False)
    check(backend, lambda x, w, b: fastattn.layer_norm(x, (300,), w, b), x + 1000.0, w, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs_and_gradients(backend, op):
    """x transposed, residual and weight strided views, and a transposed incoming gradient."""
    _require_kernel(backend, op)
    base_x, base_w, base_b, base_r = _inputs(op, (48, 10), (96,), torch.float16, True, True, True)
    base_r = rand(10, 96, dtype=torch.float16)

    def fn(x, w, b, r):
        y, s = norm(op, x.t()[:, ::2], (24,), w[::4], None if b is None else b[1::4], r[:, 1::4])
        return y.t(), s  # the gradient of y arrives transposed (strided rows)

    check(backend, fn, base_x, base_w, base_b, base_r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_residual_gets_the_same_gradient_as_x(backend, op):
    _require_kernel(backend, op)
    x, w, b, r = _inputs(op, (5, 40), (40,), torch.float32, True, True, True)
    _, grads = check(backend, lambda x, w, b, r: norm(op, x, (40,), w, b, r), x, w, b, r)
    torch.testing.assert_close(grads[0], grads[-1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_only_the_sum_is_used(backend, op):
    """No gradient flows into y: x and residual get exactly the sum's gradient, weight zero."""
    _require_kernel(backend, op)
    x, w, _, r = _inputs(op, (3, 20), (20,), torch.float32, True, False, True)
    x, w, r = (t.requires_grad_() for t in (x, w, r))
    with fastattn.use_backend(backend):
        _, s = norm(op, x, (20,), w, residual=r)
    g = torch.randn_like(s)
    dx, dw, dr = torch.autograd.grad(s, (x, w, r), g, allow_unused=True)
    torch.testing.assert_close(dx, g)
    torch.testing.assert_close(dr, g)
    assert dw is None or torch.all(dw == 0)


# --------------------------------------------------------------------------------------------
# the streamed path and the two-stage weight reduction on small rows
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small_tiles(monkeypatch):
    """Rows longer than 32 (16 in the backward) stream in chunks of 16; several tiles and rows per
    backward program, so that each program's partial row of dweight/dbias sums many rows."""
    if fastattn.backends()["triton"] is not None:
        pytest.skip(fastattn.backends()["triton"])
    from fastattn.triton import norm as triton_norm

    monkeypatch.setattr(triton_norm, "MAX_FUSED_N", 32)
    monkeypatch.setattr(triton_norm, "MAX_FUSED_N_BWD", 16)
    monkeypatch.setattr(triton_norm, "LONG_BLOCK_N", 16)
    monkeypatch.setattr(triton_norm, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(triton_norm, "REDUCE_BLOCK_N", 16)
    monkeypatch.setattr(triton_norm, "_backward_programs", lambda device, work: min(work, 3))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [12, 30, 45], ids=["fused", "fused_fwd_streamed_bwd", "streamed"])
def test_streamed_and_multi_row_paths(small_tiles, op, n):
    x, w, b, r = _inputs(op, (11, n), (n,), torch.float16, True, True, True)
    check("triton", lambda x, w, b, r: norm(op, x, (n,), w, b, r), x, w, b, r)
    x, w, b, _ = _inputs(op, (11, n), (n,), torch.float32, True, True, False)
    check("triton", lambda x, w, b: norm(op, x + 100.0, (n,), w, b), x, w, b)


# --------------------------------------------------------------------------------------------
# special values, empty inputs, bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_nan_propagates_to_its_row_only(backend, op):
    _require_kernel(backend, op)
    x = rand(4, 16)
    x[2, 5] = float("nan")
    w = rand(16)
    with fastattn.use_backend(backend):
        y = norm(op, x, (16,), w, eps=1e-6)
    expected = F.layer_norm(x, (16,), w, eps=1e-6) if op == "layer_norm" else F.rms_norm(x, (16,), w, eps=1e-6)
    assert y[2].isnan().all()
    torch.testing.assert_close(y[[0, 1, 3]], expected[[0, 1, 3]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_empty_input_gives_empty_output(backend, op):
    _require_kernel(backend, op)
    x, r, w = rand(0, 8).requires_grad_(), rand(0, 8), rand(8).requires_grad_()
    with fastattn.use_backend(backend):
        y, s = norm(op, x, (8,), w, residual=r)
        (y.sum() + s.sum()).backward()
    assert y.shape == s.shape == (0, 8)
    assert x.grad.shape == (0, 8) and (w.grad is None or torch.all(w.grad == 0))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: fastattn.layer_norm(x.int(), (6,)), TypeError, "x must be"),
        (lambda x: fastattn.layer_norm(x, (5,)), ValueError, "normalized_shape"),
        (lambda x: fastattn.rms_norm(x, (4, 7)), ValueError, "normalized_shape"),
        (lambda x: fastattn.layer_norm(x, (6,), torch.ones(5)), ValueError, "weight must have shape"),
        (lambda x: fastattn.layer_norm(x, (6,), None, torch.ones(6, dtype=torch.float64)), TypeError, "bias"),
        (lambda x: fastattn.rms_norm(x, (6,), [1.0] * 6), TypeError, "weight must be a torch.Tensor"),
        (lambda x: fastattn.rms_norm(x, (6,), residual=torch.ones(4, 5)), ValueError, "residual must have"),
        (lambda x: fastattn.layer_norm(x, (6,), residual=x.half()), TypeError, "residual"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 6, device=DEVICE))


def test_triton_declines_float64_with_a_reason():
    if fastattn.backends()["triton"] is not None:
        pytest.skip(fastattn.backends()["triton"])
    with fastattn.use_backend("triton"):
        with pytest.raises(fastattn.BackendError, match="triton.*float64"):
            fastattn.rms_norm(rand(3, 4).double(), (4,))


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _compiled_matches(backend):
    def block(x, r, w, b, g):
        y, s = fastattn.layer_norm(x, (32,), w, b, residual=r)
        return fastattn.rms_norm(y * 2, (32,), g) + s

    x, r, w, b, g = rand(4, 5, 32), rand(4, 5, 32), rand(32), rand(32), rand(32)
    compiled = torch.compile(block, fullgraph=True)
    results = []
    for fn in (compiled, block):
        leaves = [t.clone().requires_grad_() for t in (x, r, w, b, g)]
        with fastattn.use_backend(backend):
            out = fn(*leaves)
            out.sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_compile_fullgraph(backend):
    if DEVICE != "cpu":
        pytest.skip("the CPU backends")
    _require_kernel(backend, "layer_norm")
    _require_kernel(backend, "rms_norm")
    _compiled_matches(backend)


@pytest.mark.gpu
def test_compile_fullgraph_triton():
    _compiled_matches("triton")


# --------------------------------------------------------------------------------------------
# GPU only: size and bandwidth
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", [65_536, 262_144])
def test_gpu_long_rows(op, n):
    x, w, b, r = _inputs(op, (6, n), (n,), torch.bfloat16, True, True, True)
    check("triton", lambda x, w, b, r: norm(op, x, (n,), w, b, r), x, w, b, r)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_many_rows(op):
    x, w, b, r = _inputs(op, (8192, 4096), (4096,), torch.float16, True, True, True)
    check("triton", lambda x, w, b, r: norm(op, x, (4096,), w, b, r), x, w, b, r)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(16384, 4096), (4096, 16384), (256, 65536)])
def test_gpu_bandwidth_sanity(op, shape):
    """The kernels must move their bytes at a fair share of a plain copy's bandwidth on this GPU.
    Bytes counted as the kernels move them: forward with residual x, r in and y, s out (streamed
    rows read x and r twice); backward dy, s, and the sum's gradient in, ds out (streamed rows read
    dy and s twice)."""
    from fastattn.triton import norm as triton_norm

    m, n = shape
    x, w, b, r = _inputs(op, shape, (n,), torch.bfloat16, True, True, True)
    b = b if op == "layer_norm" else None
    fwd_op = triton_norm._layer_norm_fwd if op == "layer_norm" else triton_norm._rms_norm_fwd
    fwd_args = (x, w, b, 1e-5, r) if op == "layer_norm" else (x, w, 1e-5, r)
    outs = fwd_op(*fwd_args)
    mean, rstd = (outs[2], outs[3]) if op == "layer_norm" else (outs[2], outs[2])
    dy = torch.randn_like(x)
    fwd = gpu_time_ms(lambda: fwd_op(*fwd_args))
    bwd = gpu_time_ms(lambda: triton_norm._norm_bwd(dy, dy, outs[1], w, mean, rstd, True, b is not None,
                                                 op == "rms_norm"))
    copy = gpu_time_ms(lambda: x.clone())
    gbps = lambda ms, passes: passes * x.numel() * x.element_size() / ms / 1e6  # noqa: E731
    fwd_gbps = gbps(fwd, 6 if n > triton_norm.MAX_FUSED_N else 4)
    bwd_gbps = gbps(bwd, 6 if n > triton_norm.MAX_FUSED_N_BWD else 4)
    copy_gbps = gbps(copy, 2)
    print(f"{op} {shape}: fwd {fwd_gbps:.0f} GB/s, bwd {bwd_gbps:.0f} GB/s, copy {copy_gbps:.0f} GB/s")
    assert fwd_gbps > 0.5 * copy_gbps
    assert bwd_gbps > 0.5 * copy_gbps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_empty_input_keeps_the_graph(backend, op, with_residual):
    """An empty batch stays connected to weight, bias and residual: backward gives zero gradients
    of the right shapes, as torch's norms do."""
    _require_kernel(backend, op)
    x, w = rand(0, 8).requires_grad_(), rand(8).requires_grad_()
    b = rand(8).requires_grad_() if op == "layer_norm" else None
    r = rand(0, 8).requires_grad_() if with_residual else None
    with fastattn.use_backend(backend):
        result = norm(op, x, (8,), w, b, residual=r)
    y = result[0] if with_residual else result
    leaves = [t for t in (x, w, b, r) if t is not None]
    grads = torch.autograd.grad(y.sum(), leaves)
    for t, g in zip(leaves, grads):
        assert g.shape == t.shape and torch.all(g == 0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: fastattn.layer_norm(x, None), "normalized_shape"),
        (lambda x: fastattn.layer_norm(x, (6.0,)), "normalized_shape"),
        (lambda x: fastattn.layer_norm(x, (6,), eps=None), "eps"),
        (lambda x: fastattn.layer_norm(x, (6,), eps="a"), "eps"),
        (lambda x: fastattn.rms_norm(x, (6,), eps="a"), "eps"),
    ],
)
def test_bad_shape_and_eps_name_the_argument(call, match):
    with pytest.raises(TypeError, match=match):
        call(rand(3, 6))


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("residual_dtype", [None, torch.float32], ids=["plain", "fp32-residual"])
def test_cpu_autocast_returns_torchs_dtype(x_dtype, residual_dtype):
    """CPU autocast leaves torch's norms in their input's dtype (unlike CUDA's, which use float32):
    fastattn's functions and modules return what torch's do there, with torch's values."""
    import fastattn.nn as fnn

    x, w, b = torch.randn(4, 16, dtype=x_dtype), torch.randn(16) + 1, torch.randn(16)
    r = None if residual_dtype is None else torch.randn(4, 16, dtype=residual_dtype)
    s = x if r is None else x + r
    ln, rms = torch.nn.LayerNorm(16), torch.nn.RMSNorm(16)
    fast_ln, fast_rms = fnn.LayerNorm(16), fnn.RMSNorm(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pairs = [
            (fastattn.layer_norm(x, (16,), w, b, residual=r), F.layer_norm(s, (16,), w, b)),
            (fastattn.rms_norm(x, (16,), w, residual=r), F.rms_norm(s, (16,), w)),
        ]
        if r is None:
            pairs += [(fast_ln(x), ln(x)), (fast_rms(x), rms(x))]
    for out, expected in pairs:
        if r is not None:
            out, total = out
            assert total.dtype == s.dtype
        assert out.dtype == expected.dtype
        torch.testing.assert_close(out, expected)
