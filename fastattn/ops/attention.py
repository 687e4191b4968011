"""The attention op, whatever computes it: softmax(q·kᵀ·scale + mask)·v with dropout on the weights.

Tensors as every provider receives them: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv),
any strides, Hq % Hkv == 0 (query head h reads K/V head h // (Hq // Hkv)). The forward returns
out (B, Hq, Nq, Dv) and lse (B, Hq, Nq), float32 natural log, +inf on a row with no visible key
(whose output is 0). Everything else is in ``AttentionParams``.

Provider protocol (see fastattn/ops/__init__.py):
    supports(call: AttentionCall) -> None | str
    forward(params, q, k, v) -> (out, lse)
    backward(params, dout, q, k, v, out, lse, need_dq, need_dkdv) -> (dq, dk, dv)
    dropout_keep_mask(shape (B, Hq, Nq, Nk), dropout_p, seed, device) -> bool, True = kept
    forward_op: "namespace::name" of its torch op (q, k, v, mask, scale, is_causal, dropout_p, seed)
The backward is deterministic on every backend (no atomics: FlashAttention-2's dK/dV and dQ split).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastattn import dispatch
from fastattn.ops import below_autograd, claim_op, device_type_of, mask_kind, records_graph
from fastattn.utils import no_double_backward

FAMILY = "attention"
_BelowAutograd = torch._C._AutoDispatchBelowAutograd


class AttentionParams(NamedTuple):
    """Everything about an attention call except q, k, v; built and checked once by the public
    function (fastattn.functional), read as is by every kernel."""

    scale: float
    is_causal: bool = False  # top-left aligned (torch): query i sees keys j <= i
    dropout_p: float = 0.0
    mask: torch.Tensor | None = None  # (B, Hq, Nq, Nk) view (stride 0 where broadcast): bool True = attend, float added
    seed: torch.Tensor | None = None  # dropout RNG seed, one int64 element on q's device (None without dropout)
    # Room for flash-attn's features (no provider takes them yet: supports() says so).
    causal_align: str = "top_left"  # "bottom_right": query i sees keys j <= i + Nk - Nq
    window: tuple[int, int] = (-1, -1)  # (left, right) keys around the diagonal, -1 unbounded
    softcap: float = 0.0  # scores -> softcap·tanh(scores / softcap) when > 0
    alibi_slopes: torch.Tensor | None = None  # (Hq,) or (B, Hq) float32


class AttentionCall(NamedTuple):
    """The facts of a call that decide which kernels can serve it (hashable: selection is cached on it)."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    head_dim_v: int
    mask: str  # "none", "bool" or "float"
    mask_needs_grad: bool
    is_causal: bool
    dropout: bool
    causal_align: str
    window: tuple[int, int]
    softcap: bool
    alibi: bool


def call_facts(p: AttentionParams, q: torch.Tensor, v: torch.Tensor) -> AttentionCall:
    mask = p.mask
    return _new_call(AttentionCall, (
        device_type_of(q), q.dtype, q.shape[-1], v.shape[-1], mask_kind(mask),
        mask is not None and mask.requires_grad and torch.is_grad_enabled(),
        p.is_causal, p.dropout_p > 0.0, p.causal_align, p.window, p.softcap > 0.0, p.alibi_slopes is not None,
    ))  # fmt: skip


_new_call = tuple.__new__  # a NamedTuple built without its generated __new__ (one Python frame less per call)


def unsupported_feature(call: AttentionCall) -> str | None:
    """The reason every provider gives today for the features no kernel has yet, or None."""
    if call.causal_align != "top_left":
        return f"no kernel for {call.causal_align} causal alignment"
    if call.window != (-1, -1):
        return "no kernel for windowed attention"
    if call.softcap:
        return "no kernel for softcap"
    if call.alibi:
        return "no kernel for ALiBi"
    return None


def attention(p: AttentionParams, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out (B, Hq, Nq, Dv) from the selected backend, differentiable in q, k and v."""
    kernels = dispatch.kernels(FAMILY, call_facts(p, q, v))
    if kernels.native_autograd:
        return kernels.forward(p, q, k, v)[0]
    if not records_graph(q, k, v):
        with _BelowAutograd():  # (records_graph is True under torch.compile)
            return kernels.forward(p, q, k, v)[0]
    return kernels.function.apply(q, k, v, p.mask, p.seed, p.scale, p.is_causal, p.dropout_p)


def attention_head_dim_0(p: AttentionParams, q, k, v) -> torch.Tensor:
    """D = 0 (Dv > 0): every score is 0, so each row averages the values it sees (masks, causal
    and dropout apply), as torch gives. No kernel takes D = 0; the op's own math runs, the same on
    every backend, differentiated by torch, with the one dropout RNG."""
    from fastattn import reference

    keep = None
    if p.dropout_p > 0.0:
        keep = reference.dropout_keep(p.seed, (*q.shape[:-1], k.size(-2)), p.dropout_p).to(q.device)
    return reference.attention(q, k, v, p.mask, p.dropout_p, p.is_causal, p.scale, q.size(1) != k.size(1), keep)


# --------------------------------------------------------------------------------------------
# autograd, written once: a Function per provider, and the same backward on its torch op
# --------------------------------------------------------------------------------------------


def _params(saved_mask, saved_seed, scalars) -> AttentionParams:
    scale, is_causal, dropout_p = scalars
    return AttentionParams(scale, is_causal, dropout_p, saved_mask, saved_seed)


def _backward(kernels, ctx, dout):
    """(dq, dk, dv) for the tensors saved as (q, k, v, out, lse, mask, seed) and ctx.scalars."""
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    if dout is None or not (need_q or need_k or need_v):
        return None, None, None
    p = _params(mask, seed, ctx.scalars)
    dq, dk, dv = kernels.backward(p, dout, q, k, v, out, lse, need_q, need_k or need_v)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None)


def _make_function(kernels):
    class AttentionFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, mask, seed, scale, is_causal, dropout_p):
            with below_autograd():
                out, lse = kernels.forward(AttentionParams(scale, is_causal, dropout_p, mask, seed), q, k, v)
            ctx.save_for_backward(q, k, v, out, lse, mask, seed)
            ctx.scalars = (scale, is_causal, dropout_p)
            return out

        @staticmethod
        @no_double_backward("attention")
        def backward(ctx, dout):
            return (*_backward(kernels, ctx, dout), None, None, None, None, None)

    return AttentionFunction



def bind(kernels):
    """Make ``kernels`` (a provider object) ready to serve: its autograd Function, and the same
    backward registered on its forward torch op when it has one. Returns the provider."""
    kernels.function = _make_function(kernels)
    if getattr(kernels, "forward_op", None) and claim_op(kernels.forward_op):
        register_op_autograd(kernels)
    return kernels

def register_op_autograd(kernels) -> None:
    """The backward above on the provider's forward op (for a direct call of the torch op)."""

    def setup_context(ctx, inputs, output):
        q, k, v, mask, scale, is_causal, dropout_p, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, mask, seed)
        ctx.scalars = (scale, is_causal, dropout_p)
        ctx.mark_non_differentiable(lse)

    @no_double_backward("attention")
    def backward(ctx, dout, _dlse):
        return (*_backward(kernels, ctx, dout), None, None, None, None, None)

    torch.library.register_autograd(kernels.forward_op, backward, setup_context=setup_context)


# --------------------------------------------------------------------------------------------
# fake (meta) functions of the extension's ops (fastattn::attention_fwd / attention_bwd)
# --------------------------------------------------------------------------------------------


def fake_forward(q, k, v, mask, scale, is_causal, dropout_p, seed):
    b, h, n_q, _ = q.shape
    return q.new_empty(b, h, n_q, v.shape[-1]), q.new_empty(b, h, n_q, dtype=torch.float32)


def fake_backward(dout, q, k, v, out, lse, mask, scale, is_causal, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
