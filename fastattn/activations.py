"""The FFN's activations, listed once: name -> (code, gated, base function).

``code`` is the number every backend uses for the activation: the C++ enum ``fastattn::Activation``
of csrc/activations.h (CPU and CUDA kernels; the extension's ops take the name and parse it there)
and the Triton kernels' ACTIVATION constexpr (fastattn/triton/ffn.py), which is the code of the
*base* function: the one applied to h, or to the gate of a gated activation.

Gated activations split h's columns, the gate's half first (w1's first rows): act(gate)·up. swiglu
gates with silu, geglu with the exact (erf) gelu, geglu_tanh with gelu's tanh approximation (Hugging
Face's gelu_pytorch_tanh gate of Gemma, Liger-Kernel's GEGLU). tests/test_activations.py checks this
table against csrc/activations.h.
"""

from __future__ import annotations

from typing import NamedTuple


class Activation(NamedTuple):
    code: int  # csrc/activations.h's enum value
    gated: bool  # splits h into gate and up halves
    base: str  # the element-wise function applied to h (gated: to the gate)


TABLE: dict[str, Activation] = {
    "relu": Activation(0, False, "relu"),
    "gelu": Activation(1, False, "gelu"),  # exact: x·Φ(x) with erf
    "gelu_tanh": Activation(2, False, "gelu_tanh"),  # the tanh approximation
    "silu": Activation(3, False, "silu"),
    "swiglu": Activation(4, True, "silu"),
    "geglu": Activation(5, True, "gelu"),
    "geglu_tanh": Activation(6, True, "gelu_tanh"),
}

ACTIVATIONS = tuple(TABLE)
GATED_ACTIVATIONS = tuple(name for name, act in TABLE.items() if act.gated)


def code(name: str) -> int:
    """The activation's code (csrc/activations.h)."""
    return _lookup(name).code


def base_code(name: str) -> int:
    """The code of the function applied to h (to the gate when gated): the Triton ACTIVATION."""
    return TABLE[_lookup(name).base].code


def base_function(name: str) -> str:
    """The name of the element-wise function applied to h (to the gate when gated)."""
    return _lookup(name).base


def _lookup(name: str) -> Activation:
    try:
        return TABLE[name]
    except KeyError:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}") from None
