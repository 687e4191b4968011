"""One op, one contract: the behaviour the op families own is the same on every backend.

The params objects are immutable and hashable facts drive selection; attention gradients are
deterministic on every backend; an unused norm output and a float-mask gradient follow one policy;
a new attention feature field is declined with a reason by every provider until a kernel takes it.
"""

import dataclasses

import pytest
import torch
from helpers import DEVICE, backend_params

import fastattn
from fastattn import dispatch, reference
from fastattn.ops.attention import AttentionCall, AttentionParams, call_facts

BACKENDS = backend_params("triton", "cpu", "cuda", "reference")


def test_params_are_immutable_and_facts_hashable():
    p = AttentionParams(0.125, is_causal=True)
    with pytest.raises(AttributeError):
        p.scale = 1.0  # NamedTuple: frozen
    q = torch.randn(1, 2, 3, 8)
    facts = call_facts(p, q, q)
    assert isinstance(facts, AttentionCall) and hash(facts) == hash(call_facts(p, q, q))
    assert not dataclasses.is_dataclass(p)  # a plain tuple to torch.compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_backward_is_deterministic(backend):
    """Two backward passes of one forward give bit-identical gradients (no atomics, fixed order)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 4, 37, 32, device=DEVICE)
    with fastattn.use_backend(backend):
        grads = []
        for _ in range(2):
            out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
            grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_with_only_the_residual_sum_used(backend):
    """y unused (its gradient None): every backend gives the residual sum's gradient alone, and
    no gradient (None) for the weights, as the reference does."""
    x, r = (torch.randn(6, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(16, device=DEVICE, requires_grad=True) for _ in range(2))
    ds = torch.randn(6, 16, device=DEVICE)
    with fastattn.use_backend(backend):
        _y, s = fastattn.layer_norm(x, (16,), w, b, residual=r)
        gx, gr, gw, gb = torch.autograd.grad(s, (x, r, w, b), ds, allow_unused=True)
    torch.testing.assert_close(gx, ds)
    torch.testing.assert_close(gr, ds)
    assert gw is None and gb is None


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_gradient_is_the_scores_gradient(backend, log):
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    mask = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    dy = torch.randn(5, 24, device=DEVICE)
    fn = fastattn.log_softmax if log else fastattn.softmax
    with fastattn.use_backend(backend):
        gx, gm = torch.autograd.grad(fn(x, -1, scale=0.5, mask=mask), (x, mask), dy)
    xd, md = x.detach().double().requires_grad_(), mask.detach().double().requires_grad_()
    want_x, want_m = torch.autograd.grad(reference.softmax(xd, -1, 0.5, md, log=log), (xd, md), dy.double())
    torch.testing.assert_close(gx.double(), want_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gm.double(), want_m, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "feature, match",
    [(dict(window=(3, 0)), "window"), (dict(softcap=20.0), "softcap"), (dict(causal_align="bottom_right"), "bottom_right")],
    ids=["window", "softcap", "bottom_right"],
)
def test_reserved_attention_features_are_declined_by_every_provider(backend, feature, match):
    q = torch.randn(1, 2, 4, 16, device=DEVICE)
    with fastattn.use_backend(backend), pytest.raises(fastattn.BackendError, match=match):
        dispatch.select("attention", call_facts(AttentionParams(0.25, **feature), q, q))


def test_no_import_circle_between_dispatch_and_the_backends():
    """dispatch imports no backend module at import time; backends import the families, which
    import dispatch (one direction)."""
    import ast
    import pathlib

    source = pathlib.Path(dispatch.__file__).read_text()
    imported = {
        node.module or "" for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)
    } | {alias.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import) for alias in node.names}
    assert not any(name.startswith("fastattn") for name in imported), imported
