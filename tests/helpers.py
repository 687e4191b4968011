"""The numerics rule and input helpers shared by the kernel tests.

A fast path passes when its error against the float64 oracle is at most k times the error of the
naive implementation run in the same precision (k = 2 for outputs, 3 for gradients), plus a floor
of a few units in the last place of the output's dtype at the oracle's magnitude.
"""

from __future__ import annotations

import math
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


# --------------------------------------------------------------------------------------------
# the dropout RNG's oracle: Philox 4x32-10 from the published algorithm (Salmon et al., SC'11),
# in NumPy, written apart from the kernels; checked against Random123's known-answer vectors in
# tests/test_dropout_rng.py
# --------------------------------------------------------------------------------------------

_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments (golden ratio, sqrt(3) - 1)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox 4x32 with 10 rounds on uint32 arrays (broadcasting); returns the 4 output words."""
    import numpy as np

    u32, u64 = np.uint32, np.uint64
    c = [np.asarray(x, dtype=u64) & u64(0xFFFFFFFF) for x in (c0, c1, c2, c3)]
    k = [u64(int(k0) & 0xFFFFFFFF), u64(int(k1) & 0xFFFFFFFF)]
    for _ in range(10):
        prod0 = u64(_PHILOX_M0) * c[0]  # exact: both factors < 2^32
        prod1 = u64(_PHILOX_M1) * c[2]
        hi0, lo0 = prod0 >> u64(32), prod0 & u64(0xFFFFFFFF)
        hi1, lo1 = prod1 >> u64(32), prod1 & u64(0xFFFFFFFF)
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
        k = [(k[0] + u64(_PHILOX_W0)) & u64(0xFFFFFFFF), (k[1] + u64(_PHILOX_W1)) & u64(0xFFFFFFFF)]
    return [x.astype(u32) for x in c]


def dropout_keep_oracle(seed: int, shape, p: float) -> torch.Tensor:
    """The documented dropout scheme (csrc/dropout_rng.h) computed from the oracle: shape read as
    (S, R, C); element (s, r, c) takes word c % 4 of philox(counter (c // 4, r, s, 0), key (seed lo,
    seed hi)) and is kept iff word >= min(ceil(float32(p) * 2^32), 2^32 - 256)."""
    import numpy as np

    shape = tuple(shape)
    cols = shape[-1] if len(shape) >= 1 else 1
    rows = shape[-2] if len(shape) >= 2 else 1
    streams = int(np.prod(shape[:-2], dtype=np.int64))
    s, r, c = np.meshgrid(np.arange(streams), np.arange(rows), np.arange(cols), indexing="ij")
    seed64 = int(seed) & (2**64 - 1)
    words = philox4x32_10(c // 4, r, s, np.zeros_like(c), seed64 & 0xFFFFFFFF, seed64 >> 32)
    lane = c % 4
    bits = np.choose(lane, words)
    threshold = min(math.ceil(float(np.float32(p)) * 2.0**32), 2**32 - 256)
    return torch.from_numpy(bits.astype(np.int64) >= threshold).reshape(shape)
