"""Backend selection: forcing, reasons, automatic fallback, and errors that name the backend."""

import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import dispatch, reference
from fastattn.ops.attention import AttentionParams, call_facts


def _qkv(d=16):
    return torch.randn(1, 2, 5, d), torch.randn(1, 2, 7, d), torch.randn(1, 2, 7, d)


def _facts(q, v, **params):
    return call_facts(AttentionParams(0.25, **params), q, v)


def test_backends_lists_every_backend_with_a_reason_or_none():
    table = fastattn.backends()
    assert set(table) == set(dispatch.BACKENDS)
    assert table["reference"] is None
    for name, reason in table.items():
        assert reason is None or (isinstance(reason, str) and reason), name
    if not torch.cuda.is_available():
        assert table["cuda"] is not None


def test_use_backend_forces_and_restores():
    q, k, v = _qkv()
    with fastattn.use_backend("reference"):
        assert dispatch.forced_backend() == "reference"
        assert dispatch.select("attention", _facts(q, v))[0] == "reference"
        with fastattn.use_backend("auto"):
            assert dispatch.forced_backend() is None
        assert dispatch.forced_backend() == "reference"
    assert dispatch.forced_backend() is None


def test_environment_variable_forces(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    assert dispatch.forced_backend() == "reference"
    with fastattn.use_backend("auto"):  # the context manager wins over the environment
        assert dispatch.forced_backend() is None


def test_unknown_backend_is_an_error(monkeypatch):
    with pytest.raises(fastattn.BackendError, match="unknown backend 'nope'"):
        with fastattn.use_backend("nope"):
            pass
    monkeypatch.setenv("FASTATTN_BACKEND", "nope")
    q, k, v = _qkv()
    with pytest.raises(fastattn.BackendError, match="nope"):
        fastattn.scaled_dot_product_attention(q, k, v)


def test_forced_backend_that_cannot_serve_names_itself_and_the_reason():
    q, k, v = _qkv()
    with fastattn.use_backend("cuda"):
        with pytest.raises(fastattn.BackendError, match=r"backend 'cuda' cannot run attention: .*CUDA"):
            fastattn.scaled_dot_product_attention(q, k, v)


def test_float64_runs_automatically_on_a_backend_that_serves_it():
    q, k, v = (t.double() for t in _qkv())
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = reference.attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected)


def test_automatic_selection_skips_a_backend_that_declines(monkeypatch):
    """A backend whose supports() gives a reason is passed over, and the reason is reported."""
    q, k, v = _qkv()
    first = dispatch.AUTO_ORDER["cpu"][0]
    if fastattn.backends()[first] is not None:
        pytest.skip(f"{first} is not available here")
    provider = dispatch.provider(first, "attention")
    dispatch.refresh()  # choices made before the patch are forgotten (and again after it)
    monkeypatch.setattr(provider, "supports", lambda call: "declined for this test")
    try:
        name, _ = dispatch.select("attention", _facts(q, v))
        assert name != first
        with fastattn.use_backend(first):
            with pytest.raises(fastattn.BackendError, match="declined for this test"):
                fastattn.scaled_dot_product_attention(q, k, v)
    finally:
        monkeypatch.undo()
        dispatch.refresh()


def test_selection_is_cached_and_follows_use_backend():
    """A second call with the same facts reuses the choice; forcing a backend changes it at once."""
    q, k, v = _qkv()
    facts = _facts(q, v, is_causal=True)
    first = dispatch.select("attention", facts)
    assert dispatch.select("attention", facts) is first  # the cached (backend, provider) pair
    with fastattn.use_backend("reference"):
        assert dispatch.select("attention", facts)[0] == "reference"
    assert dispatch.select("attention", facts) is first


def test_reserved_features_are_declined_with_a_reason():
    """Params fields for flash-attn's features exist; no kernel takes them yet, and each says so."""
    q, k, v = _qkv()
    for backend in ("cpu", "reference"):
        if fastattn.backends()[backend] is not None:
            continue
        with fastattn.use_backend(backend):
            with pytest.raises(fastattn.BackendError, match="windowed"):
                dispatch.select("attention", _facts(q, v, window=(4, 0)))
            with pytest.raises(fastattn.BackendError, match="softcap"):
                dispatch.select("attention", _facts(q, v, softcap=30.0))


def test_compiled_call_runs_without_graph_breaks():
    q, k, v = _qkv()
    fn = torch.compile(lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True), fullgraph=True)
    with fastattn.use_backend("reference"):
        torch.testing.assert_close(fn(q, k, v), reference.attention(q, k, v, is_causal=True))


def test_import_is_light():
    """Importing fastattn loads no backend (its Triton kernels, the extension) until a call needs one."""
    code = "import sys, fastattn; print('fastattn.triton' in sys.modules, 'fastattn._C' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------
# torch.compile(dynamic=True): selection accepts symbolic sizes (issue 16, item 16)
# --------------------------------------------------------------------------------------------

_DYNAMIC_CASES = {
    "attention": (
        lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
        lambda n: (torch.randn(2, 2, n, 16), torch.randn(2, 2, n + 3, 16), torch.randn(2, 2, n + 3, 16)),
        lambda q, k, v: reference.attention(q, k, v, is_causal=True),
    ),
    "softmax": (
        lambda x: fastattn.softmax(x, -1),
        lambda n: (torch.randn(n, 2 * n),),
        lambda x: torch.softmax(x, -1),
    ),
    "layer_norm": (
        lambda x, w, b: fastattn.layer_norm(x, (8,), w, b),
        lambda n: (torch.randn(n, 8), torch.randn(8), torch.randn(8)),
        lambda x, w, b: torch.nn.functional.layer_norm(x, (8,), w, b),
    ),
    "rms_norm": (
        lambda x, w: fastattn.rms_norm(x, (8,), w, 1e-6),
        lambda n: (torch.randn(n, 8), torch.randn(8)),
        lambda x, w: torch.nn.functional.rms_norm(x, (8,), w, 1e-6),
    ),
    "feed_forward": (
        lambda x, w1, b1, w2, b2: fastattn.feed_forward(x, w1, b1, w2, b2, activation="gelu"),
        lambda n: (torch.randn(n, 8), torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)),
        lambda x, w1, b1, w2, b2: reference.feed_forward(x, w1, b1, w2, b2, "gelu"),
    ),
}


@pytest.mark.parametrize("op", sorted(_DYNAMIC_CASES))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compile_fullgraph_dynamic_accepts_symbolic_sizes(op, backend):
    """Compiled with symbolic sizes, two shapes match the oracle forward and backward, on the
    backend that was forced. Failed before: "assume_constant_result argument conversion failed"."""
    if fastattn.backends()[backend] is not None:
        pytest.skip(f"{backend}: {fastattn.backends()[backend]}")
    from torch._dynamo.testing import CompileCounterWithBackend

    fn, make, expected = _DYNAMIC_CASES[op]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counter)
    with fastattn.use_backend(backend):
        for n in (5, 9):
            args = [t.requires_grad_() for t in make(n)]
            got = compiled(*args)
            torch.testing.assert_close(got, expected(*args), atol=1e-5, rtol=1e-5)
            grads = torch.autograd.grad(got.sum(), args)
            want = torch.autograd.grad(expected(*args).sum(), args)
            for g, w in zip(grads, want):
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # Not asserted yet: the second size currently makes a second graph (frame_count == 2), cause not found.
    assert counter.frame_count >= 1


def test_compiled_forced_backend_that_cannot_serve_names_itself():
    q = torch.randn(1, 2, 5, 16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q: fastattn.scaled_dot_product_attention(q, q, q), fullgraph=True, dynamic=True)
    with fastattn.use_backend("cuda"), pytest.raises(Exception, match=r"backend 'cuda' cannot run attention"):
        compiled(q)


def test_compiled_float64_module_as_the_first_call_in_a_process():
    """float64 is declined by the cpu kernels, so the trace loads the reference backend: it must be
    in the registry dynamo reads (it was loaded after dynamo's first read: KeyError('reference'))."""
    code = (
        "import torch, fastattn\n"
        "m = fastattn.nn.MultiheadAttention(16, 2, batch_first=True).double()\n"
        "x = torch.randn(2, 5, 16, dtype=torch.float64)\n"
        "pad = torch.zeros(2, 5, dtype=torch.float64)\n"
        "pad[:, -1] = float('-inf')\n"
        "f = torch.compile(lambda x: m(x, x, x, key_padding_mask=pad, need_weights=False)[0], fullgraph=True)\n"
        "got = f(x)\n"
        "want = m(x, x, x, key_padding_mask=pad, need_weights=False)[0]\n"
        "print(float((got - want).abs().max()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-1500:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-10
