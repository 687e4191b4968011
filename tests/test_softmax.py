"""fastattn.softmax / log_softmax on every backend against the float64 oracle, with the numerics rule.

Each check runs one call three ways: on the backend under test in the input's dtype, on the
"reference" backend in the same dtype (the naive error), and on the reference in float64 on the
CPU (the oracle); outputs pass with k = 2, gradients (of x, and of a float mask) with k = 3.
Without a GPU the Triton kernels run in the interpreter: shapes stay small except where a test is
about size, and the long-row path is also reached on small rows by shrinking its threshold.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_rule, backend_params, gpu_time_ms

import fastattn
from fastattn import dispatch
from fastattn.ops.softmax import SoftmaxCall

BACKENDS = backend_params("triton", "cpu", "cuda", "reference")
LOW = [torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _require_kernel(backend: str, op: str = "softmax") -> None:
    """Skip (with the reason) a backend that cannot run on this device or has no kernel for this op yet."""
    reason = dispatch.backend_unavailable_reason(backend, DEVICE)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    with fastattn.use_backend(backend):
        try:
            dispatch.select(op, SoftmaxCall(torch.device(DEVICE).type, torch.float32, None, False, False))
        except fastattn.BackendError as exc:
            if f"has no {op} kernel" in str(exc):
                pytest.skip(str(exc))
            raise


def _oracle_copy(t):
    if t is None or not isinstance(t, torch.Tensor):
        return t
    t = t.detach().cpu()
    return t.double() if t.is_floating_point() else t


def _run(backend, fn, tensors, grad_on, grad_out):
    """fn(*tensors) on ``backend``; returns the output and the gradients of tensors[i], i in grad_on."""
    leaves = [t.detach().clone().requires_grad_(i in grad_on) if isinstance(t, torch.Tensor) else t
              for i, t in enumerate(tensors)]
    with fastattn.use_backend(backend):
        out = fn(*leaves)
    if not grad_on:
        return out.detach(), []
    grads = torch.autograd.grad(out, [leaves[i] for i in grad_on], grad_out.to(out.device, out.dtype))
    return out.detach(), list(grads)


def check(backend, fn, *tensors, grad_on=(0,), rows=None):
    """The numerics rule for fn(*tensors) on ``backend``: output, then each gradient.

    ``rows``: an optional bool selector (over the output) of the elements to compare, for cases
    whose oracle gradient is NaN by construction elsewhere (fully masked rows of a float mask).
    """
    dtype = tensors[0].dtype
    with torch.no_grad(), fastattn.use_backend("reference"):
        shape = fn(*tensors).shape
    grad_out = torch.randn(shape, device=tensors[0].device, dtype=dtype)
    out, grads = _run(backend, fn, tensors, grad_on, grad_out)
    naive, naive_grads = _run("reference", fn, tensors, grad_on, grad_out)
    oracle, oracle_grads = _run("reference", fn, [_oracle_copy(t) for t in tensors], grad_on, grad_out.cpu().double())
    assert out.dtype == dtype and out.shape == oracle.shape
    pick = (lambda t: t) if rows is None else (lambda t: t[rows.to(t.device)])
    assert_rule(pick(out), pick(naive), pick(oracle), k=2, name="output", dtype=dtype)
    for i, g, g_naive, g_oracle in zip(grad_on, grads, naive_grads, oracle_grads):
        select = pick if g.shape == out.shape else (lambda t: t)
        assert_rule(select(g), select(g_naive), select(g_oracle), k=3, name=f"grad of argument {i}", dtype=dtype)
    return out, grads


def rand(*shape, dtype=torch.float32, scale=3.0):
    return torch.randn(*shape, device=DEVICE, dtype=dtype) * scale


# --------------------------------------------------------------------------------------------
# values and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (3, 37), (2, 3, 130)])
def test_small_shapes(backend, log, dtype, shape):
    _require_kernel(backend)
    fn = fastattn.log_softmax if log else fastattn.softmax
    check(backend, lambda x: fn(x, dim=-1, scale=0.8), rand(*shape, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odd_large_shape(backend, dtype):
    _require_kernel(backend)
    check(backend, lambda x: fastattn.softmax(x, dim=-1), rand(1823, 781, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log, dtype", [(False, torch.float32), (True, torch.float16)], ids=["softmax-fp32", "log-fp16"])
def test_rows_of_70k(backend, log, dtype):
    """Longer than the fused limit: the long-row kernels, with the row cut in segments."""
    _require_kernel(backend)
    fn = fastattn.log_softmax if log else fastattn.softmax
    check(backend, lambda x: fn(x, dim=-1), rand(2, 70_001, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_and_1d(backend):
    _require_kernel(backend)
    check(backend, lambda x: fastattn.softmax(x, dim=0), rand(11))
    out, _ = check(backend, lambda x: fastattn.softmax(x, dim=0), rand(()))
    assert out.item() == 1.0


# --------------------------------------------------------------------------------------------
# layouts: strides, dims other than the last
# --------------------------------------------------------------------------------------------


LAYOUTS = {
    "transposed": (lambda x: x.transpose(0, 1), (40, 33), -1),
    "dim0_contiguous": (lambda x: x, (70, 45), 0),  # rows are columns: the tall-tile path
    "dim1_of_3d": (lambda x: x, (3, 50, 20), 1),
    "sliced_step": (lambda x: x[:, ::3], (9, 60), -1),
    "permuted_4d": (lambda x: x.permute(2, 0, 3, 1), (2, 5, 3, 7), 2),
    "expanded": (lambda x: x.expand(4, 6, 19), (1, 6, 19), -1),
    "six_dims": (lambda x: x.permute(5, 3, 1, 0, 4, 2), (2, 3, 2, 3, 9, 2), -2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_layouts(backend, layout, log):
    _require_kernel(backend)
    view, shape, dim = LAYOUTS[layout]
    fn = fastattn.log_softmax if log else fastattn.softmax
    check(backend, lambda x: fn(view(x), dim=dim, scale=0.5), rand(*shape, dtype=torch.float16))


def test_strided_rows_are_read_in_place(monkeypatch):
    """Softmax over dim 0 of a contiguous tensor: the kernel gets x itself (no copy) and returns y
    in x's layout."""
    if fastattn.backends()["triton"] is not None:
        pytest.skip(fastattn.backends()["triton"])
    from fastattn.triton import softmax as triton_softmax

    seen = []
    launch = triton_softmax._launch_forward
    monkeypatch.setattr(triton_softmax, "_launch_forward",
                        lambda x, mask, y, *a: (seen.append((x.data_ptr(), x.stride(), y.stride())), launch(x, mask, y, *a)))
    x = rand(64, 48)
    with fastattn.use_backend("triton"):
        y = fastattn.softmax(x, dim=0)
    assert seen == [(x.data_ptr(), (1, 48), (1, 48))]
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, torch.softmax(x, dim=0))


# --------------------------------------------------------------------------------------------
# masks and causal
# --------------------------------------------------------------------------------------------


def _key_padding(b, n, fully_masked_batch=None):
    keep = torch.rand(b, 1, 1, n, device=DEVICE) > 0.4
    keep[..., 0] = True
    if fully_masked_batch is not None:
        keep[fully_masked_batch] = False
    return keep


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_key_padding_mask_with_a_fully_masked_row(backend, log, dtype):
    _require_kernel(backend)
    fn = fastattn.log_softmax if log else fastattn.softmax
    keep = _key_padding(3, 21, fully_masked_batch=1)
    out, (dx,) = check(backend, lambda x, m: fn(x, mask=m), rand(3, 2, 5, 21, dtype=dtype), keep)
    assert torch.all(out[1] == (float("-inf") if log else 0.0))
    assert torch.all(dx[1] == 0)
    assert not out[0].isnan().any() and not dx.isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_float_mask_broadcast_and_its_gradient(backend, log):
    _require_kernel(backend)
    fn = fastattn.log_softmax if log else fastattn.softmax
    bias = rand(1, 5, 33, scale=1.0)  # broadcast over batch and heads
    check(backend, lambda x, m: fn(x, mask=m, scale=0.3), rand(2, 3, 5, 33), bias, grad_on=(0, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_float_mask_with_minus_inf_rows(backend, log):
    """-inf in a float mask masks like False in a bool one: zeros (log: -inf), a fully masked row
    included (torch's softmax of an all -inf row is NaN). The rule runs on the live elements; the
    masked ones are checked exactly: softmax passes no gradient there, log_softmax passes dy (torch's
    dy - exp(y)·Σdy at y = -inf; test_log_softmax_gradient_at_minus_inf checks those against torch)."""
    _require_kernel(backend)
    fn = fastattn.log_softmax if log else fastattn.softmax
    bias = rand(4, 1, 17, scale=1.0)
    bias[:, :, ::3] = float("-inf")
    bias[2] = float("-inf")
    x = rand(4, 3, 17, dtype=torch.float16)
    live = torch.isfinite(bias).expand(4, 3, 17)
    out, (dx,) = check(backend, lambda x, m: fn(x, mask=m), x, bias.half(), rows=live)
    assert torch.all(out[~live] == (float("-inf") if log else 0.0))
    if not log:
        assert torch.all(dx[~live] == 0)


def _torch_log_softmax_grads(x, dy, scale, bias=None, keep=None, causal=False):
    """dx of torch's log_softmax(x·scale + bias), x·scale masked_fill'ed where ``keep`` is False or
    above the diagonal (the composition a torch user writes), in float64."""
    x = x.detach().cpu().double().requires_grad_()
    s = x * scale
    if bias is not None:
        s = s + bias.cpu().double()
    if keep is not None:
        s = s.masked_fill(~keep.cpu(), float("-inf"))
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    (dx,) = torch.autograd.grad(torch.log_softmax(s, -1), x, dy.cpu().double())
    return dx


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_softmax_gradient_at_minus_inf(backend):
    """One answer on every backend, torch's: at an output of -inf, dx = dy·scale when the -inf comes
    from x or from a float mask (dy - exp(y)·Σdy with exp(y) = 0), a fully masked row included; 0
    where a bool mask or is_causal hides the score (x does not reach the output there). Was 0 on the
    kernels for a float -inf and dy on the reference (issue 16, item 14)."""
    _require_kernel(backend)
    x = rand(3, 5, 11)
    x[0, 1, 4] = float("-inf")
    bias = rand(1, 5, 11, scale=1.0)
    bias[..., 2::4] = float("-inf")  # column 0 stays live: causal row 0 sees only it
    full_bias = bias.expand(3, 5, 11).clone()
    full_bias[1, 2] = float("-inf")  # a fully masked row
    keep = torch.rand(3, 1, 11, device=DEVICE) > 0.4
    keep[..., 0] = True
    dy = torch.randn(3, 5, 11, device=DEVICE)
    for kwargs, torch_kwargs in (
        (dict(mask=bias, scale=0.5), dict(bias=bias, scale=0.5)),
        (dict(mask=keep, scale=0.7), dict(keep=keep, scale=0.7)),
        (dict(is_causal=True, scale=1.3), dict(causal=True, scale=1.3)),
        (dict(mask=bias, is_causal=True, scale=1.0), dict(bias=bias, causal=True, scale=1.0)),
    ):
        xx = x.clone().requires_grad_()
        with fastattn.use_backend(backend):
            (dx,) = torch.autograd.grad(fastattn.log_softmax(xx, **kwargs), xx, dy)
        expected = _torch_log_softmax_grads(x, dy, **torch_kwargs)
        torch.testing.assert_close(dx.cpu().double(), expected, rtol=1e-5, atol=1e-5, msg=lambda m, kw=kwargs: f"{kw}: {m}")
    xx = x.clone().requires_grad_()
    with fastattn.use_backend(backend):  # the fully masked row (torch: NaN) gets dy·scale, torch's formula
        (dx,) = torch.autograd.grad(fastattn.log_softmax(xx, mask=full_bias, scale=0.5), xx, dy)
    torch.testing.assert_close(dx[1, 2], dy[1, 2] * 0.5)
    live = torch.ones(3, 5, dtype=torch.bool)
    live[1, 2] = False
    expected = _torch_log_softmax_grads(x, dy, 0.5, bias=full_bias)
    torch.testing.assert_close(dx.cpu().double()[live], expected[live], rtol=1e-5, atol=1e-5)
    # along another dim the causal mask is built as a mask: still no gradient to the hidden x
    x8 = rand(8, 8).requires_grad_()
    fmask = rand(8, 8, scale=1.0)
    dy8 = torch.randn(8, 8, device=DEVICE)
    with fastattn.use_backend(backend):
        (dx,) = torch.autograd.grad(fastattn.log_softmax(x8, dim=0, mask=fmask, is_causal=True), x8, dy8)
    x64 = x8.detach().cpu().double().requires_grad_()
    s = (x64 + fmask.cpu().double()).masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf"))
    (expected,) = torch.autograd.grad(torch.log_softmax(s, 0), x64, dy8.cpu().double())
    assert torch.all(dx.cpu()[torch.ones(8, 8, dtype=torch.bool).triu(1)] == 0)
    torch.testing.assert_close(dx.cpu().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("n_q, n_k", [(6, 6), (9, 5), (4, 40)])
def test_causal(backend, log, n_q, n_k):
    _require_kernel(backend)
    fn = fastattn.log_softmax if log else fastattn.softmax
    check(backend, lambda x: fn(x, is_causal=True, scale=0.7), rand(2, 3, n_q, n_k, dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_mask_and_other_dim(backend):
    _require_kernel(backend)
    keep = _key_padding(2, 12).squeeze(1)  # (2, 1, 12)
    check(backend, lambda x, m: fastattn.softmax(x, mask=m, is_causal=True), rand(2, 7, 12), keep)
    check(backend, lambda x: fastattn.log_softmax(x, dim=0, is_causal=True), rand(8, 8, dtype=torch.float16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_of_one_row_broadcast_everywhere(backend):
    _require_kernel(backend)
    keep = torch.rand(50, device=DEVICE) > 0.5
    keep[3] = True
    check(backend, lambda x, m: fastattn.softmax(x, mask=m), rand(4, 6, 50), keep)


def test_key_padding_mask_is_not_materialised(monkeypatch):
    """The (B, 1, 1, N) mask reaches the kernel as a stride-0 view of the caller's tensor."""
    if fastattn.backends()["triton"] is not None:
        pytest.skip(fastattn.backends()["triton"])
    from fastattn.triton import softmax as triton_softmax

    seen = []
    launch = triton_softmax._launch_forward
    monkeypatch.setattr(triton_softmax, "_launch_forward",
                        lambda x, mask, *a: (seen.append((mask.data_ptr(), mask.stride())), launch(x, mask, *a)))
    keep = _key_padding(2, 30)
    with fastattn.use_backend("triton"):
        fastattn.softmax(rand(2, 4, 8, 30), mask=keep)
    (ptr, strides), = seen
    assert ptr == keep.data_ptr()
    assert strides[1] == 0 and strides[2] == 0


# --------------------------------------------------------------------------------------------
# the long-row path on small rows, and its segment split
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_long_path(monkeypatch):
    """Rows longer than 32 take the streamed kernels in chunks of 16, cut into segments."""
    if fastattn.backends()["triton"] is not None:
        pytest.skip(fastattn.backends()["triton"])
    from fastattn.triton import softmax as triton_softmax

    monkeypatch.setattr(triton_softmax, "MAX_FUSED_N", 32)
    monkeypatch.setattr(triton_softmax, "LONG_BLOCK_N", 16)
    monkeypatch.setattr(triton_softmax, "TILE_ELEMENTS", 256)
    monkeypatch.setattr(triton_softmax, "_target_programs", lambda device: 8)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_long_path_with_masks_and_causal(tiny_long_path, log):
    fn = fastattn.log_softmax if log else fastattn.softmax
    keep = _key_padding(2, 50, fully_masked_batch=1)
    check("triton", lambda x, m: fn(x, mask=m, is_causal=True, scale=0.6), rand(2, 1, 3, 50, dtype=torch.float16), keep)
    bias = rand(1, 1, 50, scale=2.0)
    check("triton", lambda x, m: fn(x, mask=m), rand(2, 2, 50), bias, grad_on=(0, 1))
    check("triton", lambda x: fn(x, dim=0), rand(40, 20, dtype=torch.bfloat16))  # tall tiles, streamed
    if log:  # the segmented backward gives torch's dy·scale at a -inf (float mask) output too
        bias[..., 1::5] = float("-inf")
        x = rand(2, 2, 50).requires_grad_()
        dy = torch.randn(2, 2, 50, device=DEVICE)
        with fastattn.use_backend("triton"):
            (dx,) = torch.autograd.grad(fn(x, mask=bias, scale=0.5), x, dy)
        expected = _torch_log_softmax_grads(x, dy, 0.5, bias=bias)
        torch.testing.assert_close(dx.cpu().double(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# special values, empty inputs, bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_nan_propagates_to_its_row_only(backend, log):
    _require_kernel(backend)
    fn = fastattn.log_softmax if log else fastattn.softmax
    x = rand(4, 9)
    x[1, 3] = float("nan")
    with fastattn.use_backend(backend):
        out = fn(x)
    expected = torch.log_softmax(x, -1) if log else torch.softmax(x, -1)
    assert out[1].isnan().all()
    torch.testing.assert_close(out[[0, 2, 3]], expected[[0, 2, 3]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_all_nan_row_gives_nan_and_masked_row_zeros(backend, log):
    """NaN in, NaN out, as torch: an all-NaN row (the cpu backend gave zeros, issue 16 item 12) and a
    NaN row with masked entries; a fully masked row still gives zeros (log: -inf), never NaN."""
    _require_kernel(backend)
    fn = fastattn.log_softmax if log else fastattn.softmax
    x = rand(5, 40)
    x[1] = float("nan")
    x[2, ::2] = float("nan")
    keep = torch.ones(5, 40, dtype=torch.bool, device=DEVICE)
    keep[2, 1::2] = False  # row 2: its NaNs are the only live values
    keep[3] = False
    with fastattn.use_backend(backend):
        out = fn(x, mask=keep)
        plain = fn(x)
    assert out[1].isnan().all() and out[2].isnan().all() and plain[1].isnan().all()
    assert torch.all(out[3] == (float("-inf") if log else 0.0))
    expected = torch.log_softmax(x, -1) if log else torch.softmax(x, -1)
    torch.testing.assert_close(out[[0, 4]], expected[[0, 4]])
    torch.testing.assert_close(plain, expected, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, dim", [((0, 5), -1), ((3, 0), -1), ((4, 0, 2), 0)])
def test_empty_input_gives_empty_output(backend, shape, dim):
    _require_kernel(backend)
    x = rand(*shape).requires_grad_()
    with fastattn.use_backend(backend):
        y = fastattn.softmax(x, dim=dim)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: fastattn.softmax(x.int()), TypeError, "x must be"),
        (lambda x: fastattn.softmax([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda x: fastattn.softmax(x, dim=3), IndexError, "dim 3"),
        (lambda x: fastattn.softmax(x, dim=1.5), ValueError, "dim"),
        (lambda x: fastattn.softmax(x, scale="big"), TypeError, "scale"),
        (lambda x: fastattn.softmax(x, mask=torch.ones(3, 5)), ValueError, "mask of shape"),
        (lambda x: fastattn.softmax(x, mask=torch.ones(4, 6, dtype=torch.int32)), TypeError, "mask must be bool"),
        (lambda x: fastattn.softmax(x, mask=[[True]]), TypeError, "mask must be a torch.Tensor"),
        (lambda x: fastattn.softmax(x[0], is_causal=True), ValueError, "is_causal"),
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
            fastattn.softmax(rand(3, 4).double())


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _compiled_matches(backend):
    def f(x, m):
        return fastattn.softmax(x, dim=-1, mask=m, scale=0.5) * 2 + fastattn.log_softmax(x, dim=1, is_causal=True)

    x, keep = rand(2, 3, 8, 8), _key_padding(2, 8)
    compiled = torch.compile(f, fullgraph=True)
    with fastattn.use_backend(backend):
        xc = x.clone().requires_grad_()
        out = compiled(xc, keep)
        out.sum().backward()
        xe = x.clone().requires_grad_()
        expected = f(xe, keep)
        expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_compile_fullgraph(backend):
    if DEVICE != "cpu":
        pytest.skip("the CPU backends")
    _require_kernel(backend)
    _compiled_matches(backend)


@pytest.mark.gpu
def test_compile_fullgraph_triton():
    _compiled_matches("triton")


# --------------------------------------------------------------------------------------------
# GPU only: size and bandwidth
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n", [262_144, 1_000_003])
def test_gpu_very_long_rows(n):
    check("triton", lambda x: fastattn.softmax(x), rand(3, n, dtype=torch.bfloat16))
    check("triton", lambda x: fastattn.log_softmax(x), rand(2, n))


@pytest.mark.gpu
def test_gpu_large_batch_against_oracle():
    keep = _key_padding(4, 1000, fully_masked_batch=3)
    check("triton", lambda x, m: fastattn.softmax(x, mask=m, is_causal=True), rand(4, 8, 1000, 1000, dtype=torch.float16),
          keep)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16384, 4096), (4096, 32768), (64, 1_048_576)])
def test_gpu_bandwidth_sanity(shape):
    """The kernels must move their bytes at a fair share of a plain copy's bandwidth on this GPU.
    Bytes counted as the kernels move them: forward x in, y out (long rows read x twice); backward
    y and dy in, dx out (long rows read y and dy twice)."""
    from fastattn.triton import softmax as triton_softmax

    x = rand(*shape, dtype=torch.float16)
    dy = torch.randn_like(x)
    long_rows = shape[-1] > triton_softmax.MAX_FUSED_N
    with fastattn.use_backend("triton"):
        y = fastattn.softmax(x)
        fwd = gpu_time_ms(lambda: fastattn.softmax(x))
        bwd = gpu_time_ms(lambda: triton_softmax._softmax_bwd_op(dy, y, 1.0, False))
    copy = gpu_time_ms(lambda: x.clone())  # reads and writes one tensor
    gbps = lambda ms, passes: passes * x.numel() * x.element_size() / ms / 1e6  # noqa: E731
    fwd_gbps, bwd_gbps, copy_gbps = gbps(fwd, 3 if long_rows else 2), gbps(bwd, 5 if long_rows else 3), gbps(copy, 2)
    print(f"softmax {shape}: fwd {fwd_gbps:.0f} GB/s, bwd {bwd_gbps:.0f} GB/s, copy {copy_gbps:.0f} GB/s")
    assert fwd_gbps > 0.5 * copy_gbps
    assert bwd_gbps > 0.5 * copy_gbps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cpu_autocast_returns_torchs_dtype(dtype):
    """CPU autocast leaves torch's (log_)softmax in the input's dtype: fastattn's do the same."""
    x = torch.randn(4, 33, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pairs = [
            (fastattn.log_softmax(x, -1), torch.log_softmax(x, -1)),
            (fastattn.softmax(x, -1), torch.softmax(x, -1)),
            (fastattn.log_softmax(x[:0], -1), torch.log_softmax(x[:0], -1)),
        ]
    for out, expected in pairs:
        assert out.dtype == expected.dtype
        torch.testing.assert_close(out, expected)
