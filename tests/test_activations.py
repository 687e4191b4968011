"""One activation table: fastattn/activations.py and csrc/activations.h agree, and every activation
runs end to end on each backend's epilogue against reference.activate."""

from __future__ import annotations

import re
from pathlib import Path

import helpers
import pytest
import torch

import fastattn
from fastattn import activations, reference

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "activations.h"


def _header_table():
    """(enum name -> code, names in code order, gated enum names) parsed from csrc/activations.h."""
    text = HEADER.read_text()
    enum = re.search(r"enum class Activation : int \{([^}]*)\}", text).group(1)
    codes = {name: int(value) for name, value in re.findall(r"(k\w+)\s*=\s*(\d+)", enum)}
    names_block = re.search(r"kActivationNames\[kNumActivations\] = \{([^}]*)\}", text, re.S).group(1)
    names = re.findall(r'"(\w+)"', names_block)
    count = int(re.search(r"constexpr int kNumActivations = (\d+);", text).group(1))
    gated_body = re.search(r"bool is_gated\(Activation act\) \{(.*?)\}", text, re.S).group(1)
    gated = set(re.findall(r"Activation::(k\w+)", gated_body))
    return codes, names, count, gated


def _enum_name(name: str) -> str:
    return "k" + "".join(part.capitalize() for part in name.split("_"))


def test_python_table_matches_the_cpp_header():
    codes, names, count, gated = _header_table()
    assert count == len(activations.TABLE) == len(names) == len(codes)
    assert names == list(activations.ACTIVATIONS)  # kActivationNames[code] is the name of code
    for name, entry in activations.TABLE.items():
        assert codes[_enum_name(name)] == entry.code == names.index(name), name
        assert (_enum_name(name) in gated) == entry.gated, name
    assert set(reference.GATED_ACTIVATIONS) == {n for n, e in activations.TABLE.items() if e.gated}
    assert reference.ACTIVATIONS is activations.ACTIVATIONS  # re-exported, not restated


def test_triton_codes_come_from_the_table():
    pytest.importorskip("triton")
    from fastattn.triton import ffn

    for name in activations.ACTIVATIONS:
        flags = ffn._kernel_flags(torch.empty(1), name, 0.0, 1, 1)
        assert flags["ACTIVATION"] == activations.TABLE[activations.base_function(name)].code
        assert flags["GATED"] == activations.TABLE[name].gated


def test_bad_name_names_the_choices():
    with pytest.raises(ValueError, match="geglu_tanh"):
        activations.code("swish")


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
def test_cpu_epilogue_every_activation(activation):
    """The extension's epilogue op (activation by name, parsed once in csrc/activation_arg.h)
    against reference.activate, value and gradient, in float32."""
    if fastattn.backends()["cpu"] is not None:
        pytest.skip(f"cpu: {fastattn.backends()['cpu']}")
    h = (torch.randn(9, 14) * 3).requires_grad_()
    bias = torch.randn(14).requires_grad_()
    out = torch.ops.fastattn.ffn_act_fwd(h, bias, activation, 0.0, None)
    hd, bd = h.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    want = reference.activate(hd + bd, activation)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (h, bias), dout)
    expected = torch.autograd.grad(want, (hd, bd), dout.double())
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4)


def test_cpu_epilogue_rejects_unknown_name():
    if fastattn.backends()["cpu"] is not None:
        pytest.skip(f"cpu: {fastattn.backends()['cpu']}")
    with pytest.raises(
        ValueError, match="activation must be one of relu, gelu, gelu_tanh, silu, swiglu, geglu, geglu_tanh"
    ):
        torch.ops.fastattn.ffn_act_fwd(torch.randn(2, 4), None, "swish", 0.0, None)


@pytest.mark.parametrize("backend", helpers.backend_params("cpu", "triton", "cuda"))
@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
def test_every_activation_end_to_end(backend, activation):
    """feed_forward with each activation on each backend matches the float64 oracle (the codes
    reach the kernels: a wrong code would compute another function)."""
    device = "cuda" if backend == "cuda" or (backend == "triton" and helpers.HAS_CUDA) else "cpu"
    width = 2 * 24 if activation in reference.GATED_ACTIVATIONS else 24
    x = torch.randn(11, 16, device=device) * 2
    w1 = torch.randn(width, 16, device=device) / 4
    b1 = torch.randn(width, device=device)
    w2 = torch.randn(8, 24, device=device) / 5
    with fastattn.use_backend(backend):
        out = fastattn.feed_forward(x, w1, b1, w2, None, activation=activation)
    want = reference.feed_forward(*(t.cpu().double() for t in (x, w1, b1, w2)), None, activation)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-4, atol=1e-4)
