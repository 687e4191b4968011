"""Plain PyTorch versions of every op: the benchmarks' "naive" baseline and, run in float64 on the
CPU, the tests' oracle.

They are written for clarity, not speed: attention materialises the (Nq, Nk) scores, the FFN
stores its pre-activation, softmax runs in the input's dtype. Run in fp16/bf16 they are also the
"naive low-precision version" whose error the numerics rule compares a kernel's error against.

The bottom of the file makes them the "reference" backend's kernel providers (the protocols of
fastattn/ops/<family>.py); torch differentiates them, so they also serve double backward.
"""

from __future__ import annotations

import math
import struct

import torch
import torch.nn.functional as F

# The activation table is fastattn/activations.py (one for every backend), re-exported here where the
# FFN's callers import it from. Gated: the first half of h's columns (w1's first rows) is the gate,
# act(gate)·up.
from fastattn.activations import ACTIVATIONS, GATED_ACTIVATIONS
from fastattn.activations import base_function as _gate_function

# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def causal_mask(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """Bool (n_q, n_k), True = attend: query i sees keys j <= i (top-left aligned, as torch)."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()


def attention_scores(query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """Masked, scaled scores (..., Hq, Nq, Nk) in the inputs' dtype; masked entries are -inf."""
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and key.size(-3) != query.size(-3):
        key = key.repeat_interleave(query.size(-3) // key.size(-3), dim=-3)
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        scores = scores.masked_fill(~causal_mask(query.size(-2), key.size(-2), query.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    return scores


def masked_softmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax whose fully masked rows (all -inf) give zeros instead of NaN, and zero gradients
    (the softmax of such a row is taken of zeros, so no NaN enters its backward either)."""
    fully_masked = (scores == float("-inf")).all(dim=dim, keepdim=True)
    probs = torch.softmax(scores.masked_fill(fully_masked, 0.0), dim=dim)
    return probs.masked_fill(fully_masked, 0.0)


def attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    dropout_mask=None,
):
    """Naive scaled dot-product attention with torch SDPA's semantics.

    query (..., Hq, Nq, D), key (..., Hkv, Nk, D), value (..., Hkv, Nk, Dv). ``dropout_mask``
    (bool, broadcastable to (..., Hq, Nq, Nk), True = kept) replaces the random draw, so a test can
    reproduce a kernel's dropout exactly.
    """
    probs = masked_softmax(attention_scores(query, key, attn_mask, is_causal, scale, enable_gqa))
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    if enable_gqa and value.size(-3) != query.size(-3):
        value = value.repeat_interleave(query.size(-3) // value.size(-3), dim=-3)
    return probs @ value


# --------------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------------


def softmax(x, dim=-1, scale=None, mask=None, is_causal=False, log=False):
    """softmax(x·scale + mask) along ``dim``; ``is_causal`` masks j > i over the last two dims.

    A fully masked row gives zeros (softmax) or -inf (log_softmax, the log of those zeros). A NaN
    in a row makes the row NaN, as torch.
    """
    s = x * scale if scale is not None else x
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    if is_causal:  # after the mask: a float mask gets no gradient where the causal mask hides it
        s = s.masked_fill(~causal_mask(x.size(-2), x.size(-1), x.device), float("-inf"))
    if not log:
        return masked_softmax(s, dim)
    # s - logsumexp(s), with a fully masked row's logsumexp taken as 0 (its output the log of zeros):
    # the gradient is torch's dy - exp(y)·Σdy everywhere, so dy at a -inf score (of x or of a float
    # mask), fully masked rows included; positions hidden by the bool mask or is_causal get 0 through
    # masked_fill. No NaN enters the backward.
    fully_masked = (s == float("-inf")).all(dim=dim, keepdim=True)
    lse = torch.logsumexp(s.masked_fill(fully_masked, 0.0), dim=dim, keepdim=True)
    return s - lse.masked_fill(fully_masked, 0.0)


def log_softmax(x, dim=-1, scale=None, mask=None, is_causal=False):
    return softmax(x, dim, scale, mask, is_causal, log=True)


# --------------------------------------------------------------------------------------------
# feed-forward
# --------------------------------------------------------------------------------------------


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The FFN's activation. Gated ones split h's last dim: the gate's half first, act(gate)·up.
    ``gelu`` and ``geglu`` use the exact (erf) gelu, ``gelu_tanh`` and ``geglu_tanh`` its tanh form."""
    if activation in GATED_ACTIVATIONS:
        gate, up = h.chunk(2, dim=-1)
        return activate(gate, _gate_function(activation)) * up
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def feed_forward(x, w1, b1=None, w2=None, b2=None, activation="gelu", dropout_p=0.0, dropout_mask=None):
    """act(x·w1ᵀ + b1)·w2ᵀ + b2 with dropout on the activation, weights laid out as nn.Linear's."""
    a = activate(F.linear(x, w1, b1), activation)
    if dropout_mask is not None:
        a = a * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        a = F.dropout(a, p=dropout_p)
    return F.linear(a, w2, b2)


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, residual=None):
    """F.layer_norm; with ``residual``, returns (layer_norm(x + residual), x + residual)."""
    if residual is None:
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    s = x + residual
    return F.layer_norm(s, normalized_shape, weight, bias, eps), s


def rms_norm(x, normalized_shape, weight=None, eps=None, residual=None):
    """x / sqrt(mean(x²) + eps) · weight over ``normalized_shape``; eps None: finfo(dtype).eps."""
    s = x if residual is None else x + residual
    eps = torch.finfo(s.dtype).eps if eps is None else eps
    dims = tuple(range(-len(normalized_shape), 0))
    y = s * torch.rsqrt(s.pow(2).mean(dim=dims, keepdim=True) + eps)
    y = y if weight is None else y * weight
    return y if residual is None else (y, s)


# --------------------------------------------------------------------------------------------
# the "reference" backend: the providers of fastattn/ops/<family>.py over the functions above
# --------------------------------------------------------------------------------------------


_MASK32 = 0xFFFFFFFF


def dropout_threshold(dropout_p: float) -> int:
    """csrc/dropout_rng.h's threshold: draws (uint32) below it are dropped. min(ceil(f·2^32),
    2^32 - 256) with f = dropout_p rounded to float32, as every backend computes it (exact)."""
    f = struct.unpack("<f", struct.pack("<f", float(dropout_p)))[0]
    return min(math.ceil(f * 4294967296.0), 4294967296 - 256)


def _mulhilo32(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a·x, a a uint32 constant, x uint32 values held in int64: a is
    split into 16-bit halves so that no int64 product overflows."""
    p_lo, p_hi = x * (a & 0xFFFF), x * (a >> 16)  # a·x = p_hi·2^16 + p_lo, both < 2^48
    return (p_hi + (p_lo >> 16)) >> 16, (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32


def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox 4x32-10 on uint32 values held in int64 tensors (broadcasting)."""
    for _ in range(10):
        hi0, lo0 = _mulhilo32(0xD2511F53, c0)
        hi1, lo1 = _mulhilo32(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def dropout_keep(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """The keep mask (bool, True = kept) of csrc/dropout_rng.h for the seed tensor (one int64
    element) and ``shape``, read as (S, R, C) (last dim C, the one before R, S the product of the
    others: (B, Hq, Nq, Nk) for attention, (M, hidden) for the FFN): element (s, r, c) takes output
    c % 4 of Philox 4x32-10 at counter (c // 4, r, s, 0), key the seed's low and high words, and is
    kept iff it is >= ``dropout_threshold(dropout_p)``. The extension's and the Triton kernels'
    mask, computed with torch ops so that torch.compile keeps it in the graph (no .item()). The
    reference backend uses it, so it drops the same elements as every other backend."""
    shape = tuple(int(n) for n in shape)
    if math.prod(shape) == 0:
        return torch.zeros(shape, dtype=torch.bool, device=seed.device)
    cols = shape[-1] if len(shape) >= 1 else 1
    rows = shape[-2] if len(shape) >= 2 else 1
    streams = math.prod(shape[:-2])
    quads = (cols + 3) // 4

    def index(n, view):
        return torch.arange(n, dtype=torch.int64, device=seed.device).view(view)

    key = seed.reshape(()).to(torch.int64)
    c0 = index(quads, (1, 1, quads)).expand(streams, rows, quads)
    c1, c2 = index(rows, (1, rows, 1)), index(streams, (streams, 1, 1))
    draws = _philox4x32_10(c0, c1, c2, torch.zeros_like(c0), key & _MASK32, (key >> 32) & _MASK32)
    bits = torch.stack(draws, dim=-1).reshape(streams, rows, 4 * quads)[..., :cols].reshape(shape)
    return bits >= dropout_threshold(dropout_p)


class _Provider:
    """The reference as a kernel provider (protocols in fastattn/ops/<family>.py): plain PyTorch,
    differentiated by torch itself (float64, double backward, any device)."""

    native_autograd = True

    def supports(self, call) -> str | None:
        return None


class _Attention(_Provider):
    def supports(self, call) -> str | None:
        from fastattn.ops.attention import unsupported_feature

        return unsupported_feature(call)

    def forward(self, p, q, k, v):
        dropout_mask = None
        if p.dropout_p > 0.0:
            dropout_mask = self.dropout_keep_mask((*q.shape[:-1], k.size(-2)), p.dropout_p, p.seed, q.device)
        return attention(q, k, v, p.mask, p.dropout_p, p.is_causal, p.scale, q.size(1) != k.size(1), dropout_mask), None

    def dropout_keep_mask(self, shape, dropout_p, seed, device):
        return dropout_keep(seed, shape, dropout_p).to(device)


class _Softmax(_Provider):
    def forward(self, p, x):
        return softmax(x, -1, p.scale, p.mask, p.is_causal, p.log)


class _FeedForward(_Provider):
    def forward(self, p, x, w1, b1, w2, b2):
        dropout_mask = None
        if p.dropout_p > 0.0:
            dropout_mask = self.dropout_keep_mask((x.size(0), w2.size(1)), p.dropout_p, p.seed, x.device)
        return feed_forward(x, w1, b1, w2, b2, p.activation, p.dropout_p, dropout_mask)

    def dropout_keep_mask(self, shape, dropout_p, seed, device):
        return dropout_keep(seed, shape, dropout_p).to(device)


class _Norm(_Provider):
    def forward(self, p, x, weight, bias, residual):
        if p.rms:
            out = rms_norm(x, (x.size(-1),), weight, p.eps, residual)
        else:
            out = layer_norm(x, (x.size(-1),), weight, bias, p.eps, residual)
        return out if residual is not None else (out, None)


KERNELS = {
    "attention": _Attention(),
    "softmax": _Softmax(),
    "feed_forward": _FeedForward(),
    "layer_norm": _Norm(),
    "rms_norm": _Norm(),
}


def unavailable_reason(backend: str = "reference", device_type: str | None = None) -> str | None:
    return None
