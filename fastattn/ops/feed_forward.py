"""The feed-forward op, whatever computes it: out = dropout(act(x·w1ᵀ + b1))·w2ᵀ + b2.

Tensors as every provider receives them: x (M, K), w1 (H or 2·H for a gated activation, K),
b1 (w1 rows,) or None, w2 (N, H), b2 (N,) or None, all of one dtype and device.

Provider protocol (see fastattn/ops/__init__.py):
    supports(call: FeedForwardCall) -> None | str
    forward(params, x, w1, b1, w2, b2) -> out
    backward(params, dout, x, w1, b1, w2, need_dx, need_dw1, need_db1, need_dw2, need_db2)
        -> (dx, dw1, db1, dw2, db2), None where not needed
    dropout_keep_mask((M, H), dropout_p, seed, device) -> bool, True = kept

The autograd saves x and the parameters only, on every backend: h = x·w1ᵀ and the activation are
recomputed in the backward (one GEMM more for a (M, H) tensor less per layer).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastattn import dispatch
from fastattn.ops import below_autograd, claim_op, device_type_of, records_graph
from fastattn.utils import no_double_backward

FAMILY = "feed_forward"


_BelowAutograd = torch._C._AutoDispatchBelowAutograd


class FeedForwardParams(NamedTuple):
    activation: str  # a name of fastattn.reference.ACTIVATIONS
    dropout_p: float = 0.0
    seed: torch.Tensor | None = None  # dropout RNG seed (one int64 element on x's device)


class FeedForwardCall(NamedTuple):
    device_type: str
    dtype: torch.dtype
    activation: str
    dropout: bool


def call_facts(p: FeedForwardParams, x: torch.Tensor) -> FeedForwardCall:
    return FeedForwardCall(device_type_of(x), x.dtype, p.activation, p.dropout_p > 0.0)


def feed_forward(p: FeedForwardParams, x, w1, b1, w2, b2) -> torch.Tensor:
    kernels = dispatch.kernels(FAMILY, call_facts(p, x))
    if kernels.native_autograd:
        return kernels.forward(p, x, w1, b1, w2, b2)
    if not records_graph(x, w1, b1, w2, b2):
        with _BelowAutograd():  # (records_graph is True under torch.compile)
            return kernels.forward(p, x, w1, b1, w2, b2)
    return kernels.function.apply(x, w1, b1, w2, b2, p.activation, p.dropout_p, p.seed)


def _backward(kernels, ctx, dout):
    x, w1, b1, w2, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    if dout is None or not any(needs):
        return None, None, None, None, None
    p = FeedForwardParams(ctx.activation, ctx.dropout_p, seed)
    return kernels.backward(p, dout, x, w1, b1, w2, *needs)


def _setup(ctx, x, w1, b1, w2, activation, dropout_p, seed):
    ctx.save_for_backward(x, w1, b1, w2, seed)  # x is the only activation memory kept
    ctx.activation, ctx.dropout_p = activation, dropout_p


def _make_function(kernels):
    class FeedForwardFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w1, b1, w2, b2, activation, dropout_p, seed):
            with below_autograd():
                out = kernels.forward(FeedForwardParams(activation, dropout_p, seed), x, w1, b1, w2, b2)
            _setup(ctx, x, w1, b1, w2, activation, dropout_p, seed)
            return out

        @staticmethod
        @no_double_backward("feed_forward")
        def backward(ctx, dout):
            return (*_backward(kernels, ctx, dout), None, None, None)

    return FeedForwardFunction



def bind(kernels):
    """Make ``kernels`` (a provider object) ready to serve: its autograd Function, and the same
    backward registered on its forward torch op when it has one. Returns the provider."""
    kernels.function = _make_function(kernels)
    if getattr(kernels, "forward_op", None) and claim_op(kernels.forward_op):
        register_op_autograd(kernels)
    return kernels

def register_op_autograd(kernels) -> None:
    """For a provider with a single forward op (x, w1, b1, w2, b2, activation, dropout_p, seed)."""

    def setup_context(ctx, inputs, output):
        x, w1, b1, w2, _b2, activation, dropout_p, seed = inputs
        _setup(ctx, x, w1, b1, w2, activation, dropout_p, seed)

    @no_double_backward("feed_forward")
    def backward(ctx, dout):
        return (*_backward(kernels, ctx, dout), None, None, None)

    torch.library.register_autograd(kernels.forward_op, backward, setup_context=setup_context)
