"""The norm ops, whatever computes them: layer_norm and rms_norm over the last dim, with an
optional fused residual add (s = x + residual is normalised and also returned).

Tensors as every provider receives them: x (M, N); weight, bias (N,) or None; residual (M, N) or
None. Outputs: y (M, N) and s (M, N) when there is a residual.

Provider protocol (see fastattn/ops/__init__.py), one provider per op name ("layer_norm",
"rms_norm"), with ``params.rms`` telling them apart:
    supports(call: NormCall) -> None | str
    forward(params, x, weight, bias, residual) -> (y, s or an empty tensor, mean (rms: empty), rstd)
        mean and rstd float32 (M,)
    backward(params, dy, s, weight, mean, rstd, need_dweight, need_dbias)
        -> (ds, dweight, dbias), None where not needed; ds excludes the gradient s receives as an output
    forward_op: "namespace::name" of its torch forward op, when it has the layer_norm / rms_norm form
        (x, residual, weight, bias, eps) / (x, residual, weight, eps) of the extension

One policy for unused outputs on every backend: a y whose gradient is None runs no kernel (ds is
then only the gradient of s), and the gradient of s adds to ds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastattn import dispatch
from fastattn.ops import below_autograd, claim_op, device_type_of, records_graph
from fastattn.utils import no_double_backward

_BelowAutograd = torch._C._AutoDispatchBelowAutograd


class NormParams(NamedTuple):
    eps: float
    rms: bool = False


class NormCall(NamedTuple):
    device_type: str
    dtype: torch.dtype
    rms: bool



def family(p: NormParams) -> str:
    return "rms_norm" if p.rms else "layer_norm"


def norm(p: NormParams, x, weight, bias, residual):
    """(y, s or None)."""
    kernels = dispatch.kernels(family(p), NormCall(device_type_of(x), x.dtype, p.rms))
    if kernels.native_autograd:
        return kernels.forward(p, x, weight, bias, residual)
    if not records_graph(x, weight, bias, residual):
        with _BelowAutograd():  # (records_graph is True under torch.compile)
            y, s, _, _ = kernels.forward(p, x, weight, bias, residual)
        return y, (s if residual is not None else None)
    if residual is None:
        return kernels.function.apply(x, weight, bias, None, p.eps, p.rms), None
    return kernels.function.apply(x, weight, bias, residual, p.eps, p.rms)


def _save(ctx, x, weight, bias, residual, s, mean, rstd, p):
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.params, ctx.has_residual, ctx.has_bias = p, residual is not None, bias is not None


def _grads(kernels, ctx, dy, ds_out, need_x, need_w, need_b, need_r):
    """(dx, dweight, dbias, dresidual)."""
    s, weight, mean, rstd = ctx.saved_tensors
    ds = dweight = dbias = None
    if dy is not None and (need_x or need_w or need_b or need_r):
        ds, dweight, dbias = kernels.backward(ctx.params, dy, s, weight, mean, rstd, need_w, need_b and ctx.has_bias)
    if ctx.has_residual and ds_out is not None:
        ds = ds_out if ds is None else ds + ds_out
    return (ds if need_x else None, dweight if need_w else None, dbias if need_b else None,
            ds if need_r else None)  # fmt: skip


def _make_function(kernels):
    op_name = "rms_norm" if kernels.rms else "layer_norm"

    class NormFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, residual, eps, rms):
            p = NormParams(eps, rms)
            with below_autograd():
                y, s, mean, rstd = kernels.forward(p, x, weight, bias, residual)
            _save(ctx, x, weight, bias, residual, s, mean, rstd, p)
            if residual is None:  # one output: y
                return y
            ctx.set_materialize_grads(False)  # an unused output's gradient comes as None
            return y, s

        @staticmethod
        @no_double_backward(op_name)
        def backward(ctx, dy, ds_out=None):
            dx, dweight, dbias, dresidual = _grads(kernels, ctx, dy, ds_out, *ctx.needs_input_grad[:4])
            return dx, dweight, dbias, dresidual, None, None

    return NormFunction



def bind(kernels):
    """Make ``kernels`` (a provider object) ready to serve: its autograd Function, and the same
    backward registered on its forward torch op when it has one. Returns the provider."""
    kernels.function = _make_function(kernels)
    if getattr(kernels, "forward_op", None) and claim_op(kernels.forward_op):
        register_op_autograd(kernels, kernels.rms)
    return kernels

def register_op_autograd(kernels, rms: bool) -> None:
    """The backward above on an extension-form forward op: layer_norm_fwd(x, residual, weight, bias,
    eps) -> (y, s, mean, rstd), rms_norm_fwd(x, residual, weight, eps) -> (y, s, rstd)."""

    def setup_context(ctx, inputs, output):
        if rms:
            (x, residual, weight, eps), bias = inputs, None
            y, s, rstd = output
            mean = rstd.new_empty(0)
            ctx.mark_non_differentiable(rstd)
        else:
            x, residual, weight, bias, eps = inputs
            y, s, mean, rstd = output
            ctx.mark_non_differentiable(mean, rstd)
        _save(ctx, x, weight, bias, residual, s, mean, rstd, NormParams(eps, rms))
        ctx.set_materialize_grads(False)

    @no_double_backward("rms_norm" if rms else "layer_norm")
    def backward(ctx, dy, ds_out, *_stats):
        if rms:
            need_x, need_r, need_w = ctx.needs_input_grad[:3]
            dx, dweight, _, dresidual = _grads(kernels, ctx, dy, ds_out, need_x, need_w, False, need_r)
            return dx, dresidual, dweight, None
        need_x, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        dx, dweight, dbias, dresidual = _grads(kernels, ctx, dy, ds_out, need_x, need_w, need_b, need_r)
        return dx, dresidual, dweight, dbias, None

    torch.library.register_autograd(kernels.forward_op, backward, setup_context=setup_context)


def fake_layer_norm_forward(x, residual, weight, bias, eps):
    stats = (x.shape[0],)
    res = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), res, x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


def fake_layer_norm_backward(dy, s, weight, mean, rstd, has_bias):
    n = s.shape[1]
    return s.new_empty(s.shape), s.new_empty(n if weight is not None else 0), s.new_empty(n if has_bias else 0)


def fake_rms_norm_forward(x, residual, weight, eps):
    res = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), res, x.new_empty((x.shape[0],), dtype=torch.float32)


def fake_rms_norm_backward(dy, s, weight, rstd):
    return s.new_empty(s.shape), s.new_empty(s.shape[1] if weight is not None else 0)
