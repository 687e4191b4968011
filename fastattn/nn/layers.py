"""Drop-in layers: Softmax, LayerNorm, RMSNorm (torch's twins) and FeedForward (no torch twin).

The twins subclass the torch module they replace and add no state: the constructor, parameters,
buffers and state_dict keys are torch's own, only ``forward`` runs through ``fastattn.functional``.
That is also what lets ``fastattn.patch`` swap an existing module's class in place.

The helpers at the bottom (``apply_norm``, ``fused_activation``, ``feed_forward_block``) are what the
Transformer layers use to run a torch-built norm or FFN through fastattn, with the residual add
fused into the norm.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastattn import functional
from fastattn.ops import device_type_of
from fastattn.reference import ACTIVATIONS, GATED_ACTIVATIONS

__all__ = ["FeedForward", "LayerNorm", "RMSNorm", "Softmax"]


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax(dim)`` computed by ``fastattn.softmax`` (in float32, returned in the input's
    dtype; float32 under CUDA autocast, the input's dtype under CPU autocast, as torch's)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002  (torch's argument name)
        return functional.softmax(input, _softmax_dim(self.dim, input))


def _softmax_dim(dim: int | None, x: torch.Tensor) -> int:
    """The dim itself, or torch's legacy implicit choice (with its deprecation warning) for dim=None."""
    if dim is not None:
        return dim
    warnings.warn(
        "Implicit dimension choice for softmax has been deprecated. Change the call to include dim=X as an argument.",
        stacklevel=3,
    )
    return 0 if x.dim() in (0, 1, 3) else 1


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by ``fastattn.layer_norm`` (under autocast as torch's: float32 on CUDA, the input's dtype on CPU)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        return _fused_norm(self, "layer_norm", input)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by ``fastattn.rms_norm`` (eps None: finfo(input.dtype).eps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fused_norm(self, "rms_norm", x)


class FeedForward(torch.nn.Module):
    """``fc2(dropout(act(fc1(x))))`` as one ``fastattn.feed_forward`` call.

    Weights are two ``nn.Linear``: ``fc1`` (d_model -> hidden, or 2·hidden for the gated ``swiglu`` /
    ``geglu`` / ``geglu_tanh``, gate rows first) and ``fc2`` (hidden -> d_model). ``dropout`` drops the
    activation in training mode, as nn.Transformer's FFN does. ``gelu`` and ``geglu`` use the exact
    (erf) gelu; ``gelu_tanh`` and ``geglu_tanh`` its tanh approximation (``geglu_tanh`` is Hugging
    Face's ``gelu_pytorch_tanh`` gate of Gemma and Liger-Kernel's GEGLU).
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        activation: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        for name, size in (("d_model", d_model), ("hidden", hidden)):
            if not isinstance(size, int) or size <= 0:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        width = 2 * hidden if activation in GATED_ACTIVATIONS else hidden
        self.fc1 = torch.nn.Linear(d_model, width, bias=bias, device=device, dtype=dtype)
        self.fc2 = torch.nn.Linear(hidden, d_model, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        return functional.feed_forward(
            x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, activation=self.activation, dropout_p=dropout_p
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, dropout={self.dropout}"


# --------------------------------------------------------------------------------------------
# helpers shared with the Transformer layers
# --------------------------------------------------------------------------------------------


def _norm_kind(norm: torch.nn.Module) -> str | None:
    """'layer_norm' / 'rms_norm' for a norm whose forward is torch's or fastattn's own (a subclass that
    overrides forward is called as is), else None."""
    forward = getattr(type(norm), "forward", None)
    if isinstance(norm, torch.nn.LayerNorm) and forward in (torch.nn.LayerNorm.forward, LayerNorm.forward):
        return "layer_norm"
    if isinstance(norm, torch.nn.RMSNorm) and forward in (torch.nn.RMSNorm.forward, RMSNorm.forward):
        return "rms_norm"
    return None


def apply_norm(norm: torch.nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None):
    """``norm(x)``, or with ``residual`` the pair ``(norm(x + residual), x + residual)``.

    LayerNorm/RMSNorm (torch's or fastattn's) run as one fastattn call with the add fused in; any
    other norm module is called as is.
    """
    kind = _norm_kind(norm)
    if kind is None:
        if residual is None:
            return norm(x)
        total = x + residual
        return norm(total), total
    return _fused_norm(norm, kind, x, residual)


def _fused_norm(norm: torch.nn.Module, kind: str, x: torch.Tensor, residual: torch.Tensor | None = None):
    """``apply_norm`` for a LayerNorm/RMSNorm: one fastattn call (never ``norm.forward``, which for a
    fastattn twin or its subclass would come back here)."""
    if residual is not None and residual.dtype != x.dtype:  # e.g. a bf16 block output onto an fp32 stream
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    weight, bias = norm.weight, getattr(norm, "bias", None)
    out_dtype = None
    # (autocast is fastattn.functional's: it runs the norm in float32, whatever the dtypes here)
    if weight is not None and weight.dtype != x.dtype and not torch.is_autocast_enabled(device_type_of(x)):
        # torch accepts e.g. bf16 activations with fp32 norm parameters: it computes in the wider
        # dtype and returns the input's; do the same.
        out_dtype, wide = x.dtype, torch.promote_types(x.dtype, weight.dtype)
        x, residual, weight, bias = (None if t is None else t.to(wide) for t in (x, residual, weight, bias))
    if kind == "layer_norm":
        result = functional.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps, residual=residual)
    else:
        result = functional.rms_norm(x, norm.normalized_shape, weight, norm.eps, residual=residual)
    if out_dtype is None:
        return result
    return result.to(out_dtype) if residual is None else tuple(t.to(out_dtype) for t in result)


def fused_activation(activation) -> str | None:
    """fastattn's name for a torch activation (a string, function or module), None if it has none."""
    if isinstance(activation, str):
        return activation if activation in ("relu", "gelu") else None
    if activation in (F.relu, torch.relu) or type(activation) is torch.nn.ReLU:
        return "relu"
    if activation is F.gelu or (type(activation) is torch.nn.GELU and activation.approximate == "none"):
        return "gelu"
    if type(activation) is torch.nn.GELU and activation.approximate == "tanh":
        return "gelu_tanh"
    if activation is F.silu or type(activation) is torch.nn.SiLU:
        return "silu"
    return None


def feed_forward_block(x, linear1, activation, dropout, linear2) -> torch.Tensor:
    """``linear2(dropout(activation(linear1(x))))``: one fastattn.feed_forward call when the pieces are
    plain nn.Linear / nn.Dropout and the activation is one fastattn knows, else torch's own modules."""
    name = fused_activation(activation)
    plain = (
        type(linear1) is torch.nn.Linear
        and type(linear2) is torch.nn.Linear
        and type(dropout) is torch.nn.Dropout
        and name is not None
    )
    if not plain:
        return linear2(dropout(activation(linear1(x))))
    dropout_p = dropout.p if dropout.training else 0.0  # the Dropout module's own mode, as torch's path
    return functional.feed_forward(
        x, linear1.weight, linear1.bias, linear2.weight, linear2.bias, activation=name, dropout_p=dropout_p
    )
