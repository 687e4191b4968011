"""What feed_forward keeps for its backward: only x, on every backend (issue 13 item 4).

Saved-tensor hooks see every tensor autograd saves during the forward, including those saved inside
custom ops' autograd (the Triton op, the extension's autograd.Function and its epilogue op). The
parameters (w1, b1, w2, b2) and the dropout seed (a one-element int64 tensor) are not activation
memory; everything else saved must be x, byte for byte. The gradients of the same calls are checked
against the float64 oracle, so a backend cannot pass by saving less and computing wrong gradients.
"""

from __future__ import annotations

import helpers
import pytest
import torch

import fastattn
from fastattn import reference
from fastattn.reference import GATED_ACTIVATIONS

BACKENDS = helpers.backend_params("cpu", "triton", "cuda")


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and helpers.HAS_CUDA) else "cpu"


def _saved(fn, params):
    """(activation tensors, seed tensors) that autograd saves while fn() runs: each as
    (data_ptr, shape, dtype, bytes), deduplicated; tensors sharing a parameter's storage are left out."""
    param_storages = {p.untyped_storage().data_ptr() for p in params if p is not None}
    activations, seeds = {}, {}

    def pack(t):
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.untyped_storage().data_ptr() in param_storages:
            return t
        if t.dtype == torch.int64 and t.numel() == 1:
            seeds[key] = t.numel() * t.element_size()
        else:
            activations[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, activations, seeds


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_backward_saves_only_x(backend, activation, dropout_p, bias):
    device = _device(backend)
    rows, d_model, hidden, d_out = 37, 24, 40, 19
    width = 2 * hidden if activation in GATED_ACTIVATIONS else hidden
    x = torch.randn(rows, d_model, device=device, requires_grad=True)
    w1 = (torch.randn(width, d_model, device=device) / d_model**0.5).requires_grad_()
    w2 = (torch.randn(d_out, hidden, device=device) / hidden**0.5).requires_grad_()
    b1 = torch.randn(width, device=device).requires_grad_() if bias else None
    b2 = torch.randn(d_out, device=device).requires_grad_() if bias else None
    params = (w1, b1, w2, b2)

    def run():
        with fastattn.use_backend(backend):
            return fastattn.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p)

    torch.manual_seed(1234)
    out, activations, seeds = _saved(run, params)
    x_key = (x.data_ptr(), tuple(x.shape), x.dtype)
    assert activations == {x_key: x.numel() * x.element_size()}, f"saved besides x: {activations}"
    assert len(seeds) == (1 if dropout_p else 0)

    # the same call's output and gradients against the oracle (with dropout, tests/test_ffn.py replays
    # each backend's mask through the oracle)
    if dropout_p:
        return
    dout = torch.randn_like(out)
    leaves = [t for t in (x, w1, b1, w2, b2) if t is not None]
    grads = torch.autograd.grad(out, leaves, dout)
    oracle_args = [t.detach().cpu().double().requires_grad_() if t is not None else None for t in (x, w1, b1, w2, b2)]
    oracle = reference.feed_forward(*oracle_args, activation, 0.0, None)
    oracle_leaves = [t for t in oracle_args if t is not None]
    oracle_grads = torch.autograd.grad(oracle, oracle_leaves, dout.cpu().double())
    torch.testing.assert_close(out.detach().cpu().double(), oracle.detach(), rtol=1e-4, atol=1e-4)
    for g, want in zip(grads, oracle_grads):
        torch.testing.assert_close(g.cpu().double(), want, rtol=1e-4, atol=1e-4)


def test_saved_bytes_hook_sees_what_torch_saves():
    """The counter is not blind: torch's own Linear -> gelu -> Linear saves more than x."""
    x = torch.randn(8, 6, requires_grad=True)
    w1, w2 = torch.randn(10, 6, requires_grad=True), torch.randn(5, 10, requires_grad=True)
    _, activations, _ = _saved(lambda: torch.nn.functional.linear(torch.nn.functional.gelu(x @ w1.t()), w2), (w1, w2))
    assert sum(activations.values()) > x.numel() * x.element_size()
