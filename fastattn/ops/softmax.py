"""The softmax op, whatever computes it: y = softmax(x·scale + mask) (or its log) along x's last dim.

Tensors as every provider receives them: x (..., N), any strides; the mask (in the params) a view
of x's shape, bool (True = keep) or floating (added). ``is_causal`` hides column j > row i, i the
index along dim -2. A fully masked row gives zeros (log: -inf).

Provider protocol (see fastattn/ops/__init__.py):
    supports(call: SoftmaxCall) -> None | str
    forward(params, x) -> y
    backward(params, dy, y, scale) -> d(x·scale + mask) · scale   (the gradient of x when scale is
        the params' scale, of the scores when 1.0)
    forward_op: "namespace::name" of its torch op (x, mask, scale, is_causal, log) -> y

One gradient policy for every backend (here): a float mask that requires grad gets the scores'
gradient (one backward launch, the x gradient is that times the scale); for log_softmax, the
scores a bool mask or is_causal hides get zero gradient (x does not reach them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastattn import dispatch
from fastattn.ops import below_autograd, claim_op, device_type_of, records_graph
from fastattn.utils import no_double_backward, zero_hidden_scores

FAMILY = "softmax"


_BelowAutograd = torch._C._AutoDispatchBelowAutograd


class SoftmaxParams(NamedTuple):
    scale: float = 1.0
    is_causal: bool = False
    log: bool = False
    mask: torch.Tensor | None = None  # a view of x's shape


class SoftmaxCall(NamedTuple):
    device_type: str
    dtype: torch.dtype
    mask_dtype: torch.dtype | None
    is_causal: bool
    log: bool


def call_facts(p: SoftmaxParams, x: torch.Tensor) -> SoftmaxCall:
    return SoftmaxCall(device_type_of(x), x.dtype, None if p.mask is None else p.mask.dtype, p.is_causal, p.log)


def softmax(p: SoftmaxParams, x: torch.Tensor) -> torch.Tensor:
    kernels = dispatch.kernels(FAMILY, call_facts(p, x))
    if kernels.native_autograd:
        return kernels.forward(p, x)
    if not records_graph(x, p.mask):
        with _BelowAutograd():  # (records_graph is True under torch.compile)
            return kernels.forward(p, x)
    return kernels.function.apply(x, p.mask, p.scale, p.is_causal, p.log)


def _setup(ctx, x, mask, scale, is_causal, log, y):
    # log_softmax: the bool mask marks the scores x does not reach (their gradient is zero)
    hidden = mask if log and mask is not None and mask.dtype == torch.bool else None
    ctx.save_for_backward(y, hidden)
    ctx.params = SoftmaxParams(scale, is_causal, log)
    ctx.mask_dtype = None if mask is None else mask.dtype


def _backward(kernels, ctx, dy):
    """(dx, dmask)."""
    y, hidden = ctx.saved_tensors
    p = ctx.params
    need_x, need_mask = ctx.needs_input_grad[:2]
    dx = dmask = None
    if need_mask:  # the float mask is added to the scaled scores: its gradient is the scores'
        dmask = kernels.backward(p, dy, y, 1.0)
        dx = dmask * p.scale if need_x else None
    elif need_x:
        dx = kernels.backward(p, dy, y, p.scale)
    if p.log:
        dx = None if dx is None else zero_hidden_scores(dx, hidden, p.is_causal)
        dmask = None if dmask is None else zero_hidden_scores(dmask, None, p.is_causal)
    return dx, (None if dmask is None else dmask.to(ctx.mask_dtype))


def _make_function(kernels):
    class SoftmaxFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, mask, scale, is_causal, log):
            with below_autograd():
                y = kernels.forward(SoftmaxParams(scale, is_causal, log, mask), x)
            _setup(ctx, x, mask, scale, is_causal, log, y)
            return y

        @staticmethod
        @no_double_backward("softmax")
        def backward(ctx, dy):
            return (*_backward(kernels, ctx, dy), None, None, None)

    return SoftmaxFunction



def bind(kernels):
    """Make ``kernels`` (a provider object) ready to serve: its autograd Function, and the same
    backward registered on its forward torch op when it has one. Returns the provider."""
    kernels.function = _make_function(kernels)
    if getattr(kernels, "forward_op", None) and claim_op(kernels.forward_op):
        register_op_autograd(kernels)
    return kernels

def register_op_autograd(kernels) -> None:
    def setup_context(ctx, inputs, output):
        _setup(ctx, *inputs, output)

    @no_double_backward("softmax")
    def backward(ctx, dy):
        return (*_backward(kernels, ctx, dy), None, None, None)

    torch.library.register_autograd(kernels.forward_op, backward, setup_context=setup_context)


def fake_forward(x, mask, scale, is_causal, log):
    return x.new_empty(x.shape)


def fake_backward(dy, y, scale, log):
    return y.new_empty(y.shape)
