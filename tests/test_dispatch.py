"""Backend selection: forcing, reasons, automatic fallback, and errors that name the backend."""

import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import dispatch, reference


def _qkv(d=16):
    return torch.randn(1, 2, 5, d), torch.randn(1, 2, 7, d), torch.randn(1, 2, 7, d)


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
        assert dispatch.select("attention", q.device, q, k, v, None, 0.25, False, 0.0, 0)[0] == "reference"
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
    declining = dispatch.Op(fn=lambda *a: None, supports=lambda *a, **kw: "declined for this test")
    monkeypatch.setitem(dispatch._ops[first], "attention", declining)
    name, _ = dispatch.select("attention", q.device, q, k, v, None, 0.25, False, 0.0, 0)
    assert name != first
    with fastattn.use_backend(first):
        with pytest.raises(fastattn.BackendError, match="declined for this test"):
            fastattn.scaled_dot_product_attention(q, k, v)


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
