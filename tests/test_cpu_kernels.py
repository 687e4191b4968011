"""The cpu backend's vectorised row kernels (csrc/cpu/avx2.h, softmax.cpp, norm.cpp) at the edges
the 8-lane code adds: every row length around the vector width (tails), 16-bit rounding of the
8-lane stores, NaN and fully -inf rows on the unmasked fast path, the fused residual's rounding.
Oracles: float64 torch ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastattn

pytestmark = pytest.mark.skipif(
    fastattn.dispatch.backend_unavailable_reason("cpu", "cpu") is not None, reason="the cpu extension is not built"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# float32 kernels against float64: the exp polynomial is within ~1e-7 relative
TOL = {torch.float32: dict(rtol=2e-6, atol=1e-7)}


def _close_to_rounded(out, oracle64, dtype, atol=0.0):
    """out (dtype) against the float64 oracle: float32 within TOL, 16-bit within one unit in the
    last place of the rounded oracle (the float32 result may sit on the other side of a tie); plus
    ``atol``, the float32 cancellation of log_softmax's x - logsumexp (a few ulps of the inputs)."""
    inf = oracle64.isinf()
    assert torch.equal(out.double()[inf], oracle64[inf])
    out, oracle64 = out.double().masked_fill(inf, 0), oracle64.masked_fill(inf, 0)
    if dtype == torch.float32:
        torch.testing.assert_close(out, oracle64, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] + atol)
        return
    rounded = oracle64.to(dtype)
    ulp = torch.finfo(dtype).eps * rounded.double().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((out - rounded.double()).abs() <= ulp + atol + 1e-30).all()


def _log_atol(scores: torch.Tensor) -> float:
    """8 float32 ulps of the largest finite score: what x - logsumexp(x) may lose in float32."""
    finite = scores[scores.isfinite()]
    return 8 * torch.finfo(torch.float32).eps * (finite.abs().max().item() if finite.numel() else 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_every_tail(dtype, log):
    torch.manual_seed(0)
    fn = fastattn.log_softmax if log else fastattn.softmax
    ref = torch.log_softmax if log else torch.softmax
    for n in list(range(1, 41)) + [63, 64, 65, 127, 129, 1000]:
        x = (torch.randn(5, n) * 4).to(dtype)
        with fastattn.use_backend("cpu"):
            y = fn(x, -1, scale=0.7)
        assert y.dtype == dtype
        s = x.double() * 0.7
        _close_to_rounded(y, ref(s, -1), dtype, _log_atol(s) if log else 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_causal_every_tail(dtype, log):
    torch.manual_seed(1)
    fn = fastattn.log_softmax if log else fastattn.softmax
    for n in (7, 8, 9, 33):
        x = torch.randn(2, n, n).to(dtype)
        with fastattn.use_backend("cpu"):
            y = fn(x, -1, is_causal=True)
        keep = torch.ones(n, n, dtype=torch.bool).tril()
        s = x.double().masked_fill(~keep, float("-inf"))
        _close_to_rounded(y, torch.log_softmax(s, -1) if log else torch.softmax(s, -1), dtype,
                          _log_atol(s) if log else 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_nan_and_minus_inf_rows(dtype):
    n = 37
    x = torch.randn(4, n).to(dtype)
    x[0, 20] = float("nan")  # a NaN among finite values: NaN row (as torch)
    x[1] = float("-inf")  # all -inf: zeros (softmax), -inf (log), never NaN
    x[2] = float("-inf")
    x[2, 33] = float("nan")  # -inf and a NaN (in the scalar tail): NaN row
    with fastattn.use_backend("cpu"):
        y, ly = fastattn.softmax(x, -1), fastattn.log_softmax(x, -1)
    assert y[0].isnan().all() and ly[0].isnan().all()
    assert (y[1] == 0).all() and (ly[1] == float("-inf")).all()
    assert y[2].isnan().all() and ly[2].isnan().all()
    _close_to_rounded(y[3], torch.softmax(x[3].double(), -1), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_norm_every_tail(dtype, op, affine):
    torch.manual_seed(2)
    for n in list(range(1, 41)) + [127, 1000]:
        x = (torch.randn(6, n) * 3 + 5).to(dtype)
        w = (1 + 0.2 * torch.randn(n)).to(dtype) if affine != "none" else None
        b = (0.1 * torch.randn(n)).to(dtype) if affine == "both" and op == "layer_norm" else None
        with fastattn.use_backend("cpu"):
            if op == "layer_norm":
                y = fastattn.layer_norm(x, (n,), w, b, 1e-5)
                ref = F.layer_norm(x.double(), (n,), None if w is None else w.double(),
                                   None if b is None else b.double(), 1e-5)
            else:
                y = fastattn.rms_norm(x, (n,), w, 1e-5)
                ref = F.rms_norm(x.double(), (n,), None if w is None else w.double(), 1e-5)
        if dtype == torch.float32:
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=2e-5)
        else:
            torch.testing.assert_close(y.float(), ref.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_residual_is_rounded_sum(dtype):
    """s = x + residual exactly as torch's x + residual in dtype (8-lane and tail columns): the
    16-bit stores round to nearest even (sums of two 16-bit values are often ties), overflow to inf
    and keep NaN; and the norm is of that rounded s."""
    torch.manual_seed(3)
    big = torch.finfo(dtype).max
    for n in (5, 8, 29, 256):
        x, r = torch.randn(7, n).to(dtype), (torch.randn(7, n) * 2**-6).to(dtype)
        w, b = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
        specials = x.clone(), r.clone()
        specials[0][0, : min(n, 4)] = torch.tensor([float("nan"), big, float("inf"), -0.0])[: min(n, 4)].to(dtype)
        specials[1][0, : min(n, 4)] = torch.tensor([1.0, big, 1.0, -0.0])[: min(n, 4)].to(dtype)
        with fastattn.use_backend("cpu"):
            y, s = fastattn.layer_norm(x, (n,), w, b, 1e-5, residual=r)
            _, s_special = fastattn.layer_norm(*specials[:1], (n,), w, b, 1e-5, residual=specials[1])
        assert torch.equal(s, x + r)
        torch.testing.assert_close(s_special, specials[0] + specials[1], rtol=0, atol=0, equal_nan=True)
        ref = F.layer_norm((x + r).double(), (n,), w.double(), b.double(), 1e-5)
        tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2 * torch.finfo(dtype).eps, atol=2e-2)
        torch.testing.assert_close(y.double(), ref, **tol)
