"""Second derivatives (issue 16 item 11): torch.autograd.grad(..., create_graph=True) through every
fastattn op on every backend available here is either correct or raises DoubleBackwardError,
never a silent zero or None.

- the kernel backends (cpu extension, triton under the interpreter): the first-order gradients
  taken with create_graph=True are the ordinary ones, and differentiating them again (a gradient
  penalty) raises DoubleBackwardError, a RuntimeError naming the op, as torch's fused attention
  kernels do;
- the reference backend (plain PyTorch) is differentiable twice: gradgradcheck in float64.
"""

from __future__ import annotations

import pytest
import torch
from helpers import backend_params

import fastattn
from fastattn.errors import DoubleBackwardError

KERNEL_BACKENDS = backend_params("triton", "cpu")


def _inputs(op, dtype):
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    if op == "attention":
        return [t(1, 2, 5, 8), t(1, 2, 7, 8), t(1, 2, 7, 8)]
    if op in ("softmax", "log_softmax"):
        return [t(4, 9)]
    if op == "layer_norm":
        return [t(4, 16), t(16), t(16)]
    if op == "rms_norm":
        return [t(4, 16), t(16)]
    if op == "layer_norm_residual":
        return [t(4, 16), t(16), t(16), t(4, 16)]
    if op == "feed_forward":
        return [t(3, 8), t(16, 8), t(16), t(8, 16), t(8)]
    if op == "feed_forward_swiglu":
        return [t(3, 8), t(32, 8), t(8, 16)]
    raise AssertionError(op)


def _call(op, tensors):
    if op == "attention":
        return fastattn.scaled_dot_product_attention(*tensors, is_causal=True)
    if op == "softmax":
        return fastattn.softmax(tensors[0], -1)
    if op == "log_softmax":
        return fastattn.log_softmax(tensors[0], -1)
    if op == "layer_norm":
        x, w, b = tensors
        return fastattn.layer_norm(x, (x.size(-1),), w, b)
    if op == "rms_norm":
        x, w = tensors
        return fastattn.rms_norm(x, (x.size(-1),), w, 1e-5)
    if op == "layer_norm_residual":
        x, w, b, r = tensors
        y, s = fastattn.layer_norm(x, (x.size(-1),), w, b, residual=r)
        return y * s  # both outputs used downstream
    if op == "feed_forward":
        return fastattn.feed_forward(*tensors, activation="gelu")
    if op == "feed_forward_swiglu":
        x, w1, w2 = tensors
        return fastattn.feed_forward(x, w1, None, w2, None, activation="swiglu")
    raise AssertionError(op)


OPS = [
    "attention",
    "softmax",
    "log_softmax",
    "layer_norm",
    "rms_norm",
    "layer_norm_residual",
    "feed_forward",
    "feed_forward_swiglu",
]

OP_NAME = {  # the op the error message names
    "log_softmax": "softmax",
    "layer_norm_residual": "layer_norm",
    "feed_forward_swiglu": "feed_forward",
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_kernel_backends_raise_on_second_derivative(backend, op):
    tensors = _inputs(op, torch.float32)
    with fastattn.use_backend(backend):
        out = _call(op, tensors)
        weight = torch.randn_like(out)
        plain = torch.autograd.grad((out * weight).sum(), tensors, retain_graph=True)
        grads = torch.autograd.grad((out * weight).sum(), tensors, create_graph=True)
        for g, p in zip(grads, plain):  # create_graph=True keeps the first derivative right
            torch.testing.assert_close(g, p, rtol=0, atol=0)
            assert g.requires_grad  # tied to the graph: differentiating it cannot pass silently
        penalty = sum(g.square().sum() for g in grads)
        with pytest.raises(DoubleBackwardError, match=rf"derivative of fastattn's {OP_NAME.get(op, op)}"):
            penalty.backward()
        with pytest.raises(RuntimeError, match="not implemented"):  # torch's flash kernels raise RuntimeError
            torch.autograd.grad(grads[0].sum(), tensors[0], allow_unused=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_create_graph_without_second_derivative_still_works(backend):
    """Hessian-free uses (create_graph=True, the gradients only read) are unaffected."""
    q, k, v = _inputs("attention", torch.float32)
    with fastattn.use_backend(backend):
        out = fastattn.scaled_dot_product_attention(q, k, v)
        (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    q_ref = q.detach().requires_grad_()
    (dq_ref,) = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(q_ref, k, v).sum(), q_ref)
    torch.testing.assert_close(dq.detach(), dq_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", OPS)
def test_reference_backend_second_derivative_is_correct(op):
    tensors = _inputs(op, torch.float64)

    def f(*ts):
        with fastattn.use_backend("reference"):
            return _call(op, ts)

    assert torch.autograd.gradgradcheck(f, tensors, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_float64_automatic_selection_is_twice_differentiable():
    """float64 runs on the reference backend under automatic selection: a gradient penalty works."""
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fastattn.rms_norm(x, (16,), w).square().sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(g.square().sum(), w)
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    (g2,) = torch.autograd.grad(torch.nn.functional.rms_norm(x2, (16,), w2).square().sum(), x2, create_graph=True)
    (gw2,) = torch.autograd.grad(g2.square().sum(), w2)
    torch.testing.assert_close(gw, gw2)
