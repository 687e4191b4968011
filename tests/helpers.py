"""The numerics rule and input helpers shared by the kernel tests.

A fast path passes when its error against the float64 oracle is at most k times the error of the
naive implementation run in the same precision (k = 2 for outputs, 3 for gradients), plus a floor
of a few units in the last place of the output's dtype at the oracle's magnitude.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastattn

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Relative floor per dtype: float32 must agree with the oracle to about 1e-5 relative.
FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-12}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, NaN-aware (a NaN where the oracle has none is infinite error)."""
    a, b = a.double().cpu(), b.double().cpu()
    same_nan = torch.isnan(a) & torch.isnan(b)
    diff = (a - b).abs().masked_fill(same_nan, 0.0)
    # equal infinities are no error; a NaN left is an infinite one
    diff = diff.masked_fill((a == b), 0.0).nan_to_num(nan=float("inf"))
    return diff.max().item() if diff.numel() else 0.0


def assert_rule(out, naive, oracle, k=2.0, name="output", dtype=None):
    """|out - oracle| <= k·|naive - oracle| + floor, elementwise maxima."""
    dtype = dtype or out.dtype
    scale = max(oracle.double().abs().nan_to_num(posinf=0, neginf=0).max().item() if oracle.numel() else 0.0, 1.0)
    err, err_naive = max_err(out, oracle), max_err(naive, oracle)
    bound = k * err_naive + FLOOR[dtype] * scale
    assert err <= bound, f"{name}: error {err:.3g} > {k}×naive {err_naive:.3g} + floor ({bound:.3g})"


def backend_params(*names):
    """pytest params for backends, each skipped with its reason when it cannot serve here."""
    params = []
    for name in names:
        reason = fastattn.backends()[name]
        if name == "triton" and reason is None and not (HAS_CUDA or INTERPRETING):
            reason = "needs a GPU or TRITON_INTERPRET=1"
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        if name == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def gpu_time_ms(fn, reps=20):
    """Mean milliseconds of one ``fn()`` on the GPU, timed with CUDA events after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
