"""Public functions. Each checks its arguments (errors name the argument), brings the tensors to
the form the op families take (fastattn/ops/<family>.py: shapes, layouts) and builds the family's
params object once; the family selects the backend and runs it. Nothing downstream re-validates.
"""

from __future__ import annotations

import math
import numbers

import torch

from fastattn import reference
from fastattn.errors import ArgumentError, ArgumentTypeError
from fastattn.ops import attention as attention_op
from fastattn.ops import device_type_of, norms
from fastattn.ops import feed_forward as feed_forward_op
from fastattn.ops import softmax as softmax_op
from fastattn.ops.attention import AttentionParams
from fastattn.ops.feed_forward import FeedForwardParams
from fastattn.ops.norms import NormParams
from fastattn.ops.softmax import SoftmaxParams
from fastattn.reference import ACTIVATIONS, GATED_ACTIVATIONS

try:  # torch >= 2.3: the attn_mask subclass of causal_upper_left() / causal_lower_right()
    from torch.nn.attention.bias import CausalBias as _CausalBias
    from torch.nn.attention.bias import CausalVariant as _CausalVariant
except ImportError:  # pragma: no cover
    _CausalBias = _CausalVariant = None

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DimError(IndexError, ValueError):
    """A ``dim`` out of range (an IndexError as in torch, and a ValueError)."""


# --------------------------------------------------------------------------------------------
# argument checks shared by the ops
# --------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, ndim_min: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ArgumentTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() < ndim_min:
        raise ArgumentError(f"{name} must have at least {ndim_min} dims, got shape {tuple(t.shape)}")


def _check_like(name: str, t, ref_name: str, ref: torch.Tensor, same_dtype: bool = True) -> None:
    """``t`` is a tensor of ``ref``'s device (and dtype, when ``same_dtype``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if same_dtype and t.dtype != ref.dtype:
        raise ArgumentTypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")
    if not (t.is_cpu and ref.is_cpu) and t.device != ref.device:  # (two CPU tensors: no torch.device built)
        raise ArgumentError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def _check_dropout(dropout_p) -> float:
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _check_mask(name: str, mask, target_shape, device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ArgumentTypeError(f"{name} must be bool (True = keep) or floating (added), got {mask.dtype}")
    if mask.device != device:
        raise ArgumentError(f"{name} is on {mask.device} but the inputs are on {device}")
    try:
        ok = len(mask.shape) <= len(target_shape) and torch.broadcast_shapes(mask.shape, target_shape) == target_shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ArgumentError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {tuple(target_shape)}")


def _dropout_seed(dropout_p: float, device) -> torch.Tensor | None:
    """The seed of the kernels' counter-based RNG: a one-element int64 tensor drawn on ``device``
    from torch's generator of that device, so torch.manual_seed makes dropout reproducible (on the
    CPU it is the number the earlier int seed was). A tensor, not a Python int: torch.compile keeps
    the draw in the graph (no .item(), no graph break), and on CUDA nothing waits for the GPU (the
    kernels read the seed from device memory; CUDA graphs replay a fresh draw). The autograd saves
    it, so the backward regenerates the forward's mask. None, and no draw, without dropout."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


# --------------------------------------------------------------------------------------------
# the autocast policy, in one place (applied by the public functions before their dtype checks;
# the modules and layers add nothing): as torch's own ops under torch.autocast,
# - matmul-like (attention, feed_forward): floating inputs cast to the autocast dtype;
# - softmax and norms: computed in float32; returned in float32 under CUDA autocast, in the
#   input's dtype under CPU autocast (CPU autocast does not list them).
# --------------------------------------------------------------------------------------------


def _autocast(device_type: str, *tensors):
    """Matmul-like ops: floating tensors cast to the autocast dtype when autocast is on."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def _autocast_float32(device_type: str, x, residual=None, params=()):
    """Softmax and norms under autocast: (x, residual, params) in float32 and the dtype to return
    (CPU: x's, or that of x + residual; CUDA: None, float32 stays). Without autocast: as given, None."""
    if not torch.is_autocast_enabled(device_type):
        return x, residual, params, None
    out_dtype = None
    if device_type == "cpu":
        out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    residual = None if residual is None else residual.float()
    return x.float(), residual, [None if p is None else p.float() for p in params], out_dtype


def _empty_like_graph(shape, like: torch.Tensor, *inputs) -> torch.Tensor:
    """Zeros of ``shape`` that stay connected to ``inputs`` in autograd (zero gradients)."""
    out = like.new_zeros(shape)
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            out = out + t.sum() * 0
    return out


def _plain_tensor_types() -> tuple[type, ...]:
    """Tensor types an attn_mask may have: plain tensors and parameters, and the wrappers torch's
    own tracing passes (torch.compile / torch.export: FakeTensor, FunctionalTensor)."""
    types: list[type] = [torch.Tensor, torch.nn.Parameter]
    try:
        from torch._subclasses.fake_tensor import FakeTensor

        types.append(FakeTensor)
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch._subclasses.functional_tensor import FunctionalTensor

        types.append(FunctionalTensor)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_PLAIN_TENSOR_TYPES = _plain_tensor_types()


def causal_bias_variant(mask) -> str | None:
    """"upper_left" or "lower_right" when ``mask`` is a ``torch.nn.attention.bias.CausalBias``
    (whose tensor payload is uninitialised memory: only its variant and lengths mean anything),
    else None."""
    if _CausalBias is None or not isinstance(mask, _CausalBias):
        return None
    if mask.variant == _CausalVariant.UPPER_LEFT:
        return "upper_left"
    if mask.variant == _CausalVariant.LOWER_RIGHT:
        return "lower_right"
    raise ArgumentError(f"attn_mask is a CausalBias of unknown variant {mask.variant!r}")


def check_plain_mask(name: str, mask) -> None:
    """Refuse a torch.Tensor subclass whose values fastattn cannot trust (a mask is read as data)."""
    if isinstance(mask, torch.Tensor) and type(mask) not in _PLAIN_TENSOR_TYPES:
        raise ArgumentTypeError(
            f"{name} is a {type(mask).__module__}.{type(mask).__qualname__}, a torch.Tensor subclass fastattn "
            "cannot read as a mask; pass a plain bool or floating tensor, or "
            "torch.nn.attention.bias.causal_upper_left / causal_lower_right"
        )


def causal_bias_keep(n_q: int, n_k: int, device) -> torch.Tensor:
    """Bool (n_q, n_k), True = attend: the bottom-right aligned causal mask (query i sees keys
    j <= i + n_k - n_q), flash-attention's convention and CausalBias LOWER_RIGHT's."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)


def _resolve_attn_mask(name, mask, is_causal, n_q, n_k, device):
    """(mask, is_causal) as the kernels take them: a CausalBias becomes is_causal (upper-left, or
    lower-right with Nq == Nk) or an explicit bottom-right bool mask; other subclasses are refused."""
    if mask is None:
        return None, is_causal
    variant = causal_bias_variant(mask)
    if variant is None:
        check_plain_mask(name, mask)
        return mask, is_causal
    if is_causal:
        raise ArgumentError(
            f"{name} is a CausalBias and is_causal=True; CausalBias should not be used with causal=True: "
            "pass only one of them"
        )
    if (mask.seq_len_q, mask.seq_len_kv) != (n_q, n_k):
        raise ArgumentError(
            f"{name} is a CausalBias for (seq_len_q, seq_len_kv) = ({mask.seq_len_q}, {mask.seq_len_kv}) "
            f"but query and key have lengths ({n_q}, {n_k})"
        )
    if variant == "upper_left" or n_q == n_k:
        return None, True
    return causal_bias_keep(n_q, n_k, device), False


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale + mask)·V with dropout on the weights; torch SDPA's signature and semantics.

    Shapes::

        query (..., Hq,  Nq, D)      out (..., Hq, Nq, Dv)
        key   (..., Hkv, Nk, D)      Hq == Hkv, or Hq % Hkv == 0 with enable_gqa=True (GQA/MQA:
        value (..., Hkv, Nk, Dv)     query head h reads key/value head h // (Hq // Hkv))

    ``is_causal`` is top-left aligned as in torch: query i attends keys j <= i. For Nq=3, Nk=5::

        keys   0 1 2 3 4
        q0     x . . . .
        q1     x x . . .
        q2     x x x . .

    ``attn_mask`` broadcasts to (..., Hq, Nq, Nk): bool (True = attend) or floating (added to the
    scores). A key-padding mask is (B, 1, 1, Nk); it is read in place, never expanded. A query row
    with no key left to attend gives zeros (and zero gradients), not NaN. Combined with
    ``is_causal``, both apply (a superset of torch, which raises for an explicit mask with
    ``is_causal=True``).

    ``attn_mask`` may also be ``torch.nn.attention.bias.causal_upper_left(Nq, Nk)`` (the same as
    ``is_causal=True``) or ``causal_lower_right(Nq, Nk)`` (bottom-right aligned: query i attends
    keys j <= i + Nk - Nq; a query row left with no key gives zeros where torch gives NaN); with
    ``is_causal=True`` these raise, as in torch. Any other torch.Tensor subclass is refused.

    ``dropout_p`` drops attention weights with a counter-based RNG seeded from torch's generator
    (``torch.manual_seed`` reproduces it) and scales the kept ones by 1/(1 - dropout_p); the backward
    regenerates the same mask. ``scale`` defaults to 1/sqrt(D).

    NaN in, NaN out, as torch (a NaN query row, a NaN scale), except that a row the bool mask or
    ``is_causal`` leaves without a key stays zeros. Head dim D = 0 (Dv > 0): every score is 0, so a
    row is the mean of the values it sees, as torch gives.

    The backend is chosen by ``fastattn.use_backend`` / ``FASTATTN_BACKEND``, else automatically.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t, ndim_min=2)
    if torch.is_autocast_enabled(device_type_of(query)):
        query, key, value = _autocast(device_type_of(query), query, key, value)
    _check_like("key", key, "query", query)
    _check_like("value", value, "query", query)
    ndim = query.dim()
    if not (ndim == key.dim() == value.dim()):
        raise ArgumentError(
            f"query, key and value must have the same number of dims, got {query.dim()}, {key.dim()}, {value.dim()}"
        )
    if ndim == 2:  # (N, D): one head, no batch
        out = scaled_dot_product_attention(
            query[None], key[None], value[None], attn_mask, dropout_p, is_causal, scale, enable_gqa
        )
        return out[0]
    q_shape, k_shape, v_shape = query.shape, key.shape, value.shape
    batch, (h_q, n_q, d) = q_shape[:-3], q_shape[-3:]
    h_kv, n_k, d_v = k_shape[-3], k_shape[-2], v_shape[-1]
    if k_shape[:-3] != batch or v_shape[:-3] != batch:
        raise ArgumentError(
            f"batch dims differ: query {tuple(batch)}, key {tuple(k_shape[:-3])}, value {tuple(v_shape[:-3])}"
        )
    if k_shape[-1] != d:
        raise ArgumentError(f"key head dim {k_shape[-1]} must equal query head dim {d}")
    if v_shape[-3:-1] != k_shape[-3:-1]:
        raise ArgumentError(
            f"value (heads, length) {tuple(v_shape[-3:-1])} must equal key's {tuple(k_shape[-3:-1])}"
        )
    if h_kv != h_q:
        if not enable_gqa:
            raise ArgumentError(f"query has {h_q} heads but key/value {h_kv}; pass enable_gqa=True for GQA/MQA")
        if h_kv == 0 or h_q % h_kv != 0:
            raise ArgumentError(f"query heads ({h_q}) must be a multiple of key/value heads ({h_kv}) for GQA")
    if dropout_p.__class__ is not float or not 0.0 <= dropout_p < 1.0:  # the check, past the usual 0.0
        dropout_p = _check_dropout(dropout_p)
    device = query.device
    if attn_mask is not None:
        attn_mask, is_causal = _resolve_attn_mask("attn_mask", attn_mask, is_causal, n_q, n_k, device)
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    elif not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if attn_mask is not None:
        _check_mask("attn_mask", attn_mask, (*batch, h_q, n_q, n_k), device)

    if d == 0 and n_q > 0 and n_k > 0 and value.numel() > 0:
        out_shape = (*batch, h_q, n_q, d_v)
        return _attention_head_dim_0(query, key, value, attn_mask, dropout_p, is_causal, scale, out_shape)
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        # Nq = 0 or B = 0: nothing to compute; Nk = 0: every row is fully masked, so zeros.
        return _empty_like_graph((*batch, h_q, n_q, d_v), query, query, key, value)

    if ndim == 4:  # (B, H, N, D) already: no reshapes
        q, k, v, b = query, key, value, q_shape[0]
    else:
        b = math.prod(batch)
        q = query.reshape(b, h_q, n_q, d)
        k = key.reshape(b, h_kv, n_k, d)
        v = value.reshape(b, h_kv, n_k, d_v)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(*batch, h_q, n_q, n_k)
        if ndim != 4:
            mask = mask.reshape(b, h_q, n_q, n_k)
    seed = _dropout_seed(dropout_p, device) if dropout_p else None
    out = attention_op.attention(AttentionParams(scale, bool(is_causal), dropout_p, mask, seed), q, k, v)
    return out if ndim == 4 else out.reshape(*batch, h_q, n_q, d_v)


def _attention_head_dim_0(query, key, value, attn_mask, dropout_p, is_causal, scale, out_shape):
    """Head dim 0 (D = 0, Dv > 0): every score is 0, so each row averages the values it sees (masks
    and is_causal apply), as torch does. No kernel takes D = 0: the reference math runs, on any
    backend, with its gradients and the kernels' dropout RNG."""
    batch, (h_q, n_q), (h_kv, n_k) = query.shape[:-3], query.shape[-3:-1], key.shape[-3:-1]
    b = math.prod(batch)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(*batch, h_q, n_q, n_k).reshape(b, h_q, n_q, n_k)
    params = AttentionParams(scale, bool(is_causal), dropout_p, mask, _dropout_seed(dropout_p, query.device))
    q, k = query.reshape(b, h_q, n_q, 0), key.reshape(b, h_kv, n_k, 0)
    return attention_op.attention_head_dim_0(params, q, k, value.reshape(b, h_kv, n_k, value.size(-1))).reshape(out_shape)


# --------------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------------


def _softmax(x, dim, scale, mask, is_causal, log):
    _check_tensor("x", x, ndim_min=0)
    ndim = x.dim()
    if dim.__class__ is not int or not -max(ndim, 1) <= dim < max(ndim, 1):
        if not isinstance(dim, int) or not -max(ndim, 1) <= dim < max(ndim, 1):
            raise DimError(f"dim {dim!r} is out of range for x with {ndim} dims")
    if scale is not None and not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if is_causal and ndim < 2:
        raise ValueError(f"is_causal needs x with at least 2 dims, got shape {tuple(x.shape)}")
    if mask is not None:
        _check_mask("mask", mask, x.shape, x.device)
    if ndim == 0:
        return _softmax(x[None], 0, scale, None if mask is None else mask[None], False, log)[0]
    x, _, _, out_dtype = _autocast_float32(device_type_of(x), x)
    dim = dim % ndim
    if x.numel() == 0:
        return reference.softmax(x, dim, scale, mask, is_causal, log).to(out_dtype or x.dtype)
    last = dim == ndim - 1
    if is_causal and not last:  # the kernels' causal mask runs along rows; build it otherwise
        causal = reference.causal_mask(x.size(-2), x.size(-1), x.device)
        if mask is None:
            mask = causal
        elif mask.dtype == torch.bool:
            mask = mask & causal
        else:
            mask = mask.masked_fill(~causal, float("-inf"))
            if log and x.requires_grad:  # x does not reach the hidden scores: no gradient there, as for dim=-1
                x = torch.where(causal, x, x.detach())
        is_causal = False
    x_rows = x if last else x.movedim(dim, -1)
    mask_rows = None
    if mask is not None:
        mask_rows = mask.expand(x.shape) if last else mask.expand(x.shape).movedim(dim, -1)
    scale = 1.0 if scale is None else float(scale)
    y = softmax_op.softmax(SoftmaxParams(scale, bool(is_causal), log, mask_rows), x_rows)
    y = y if last else y.movedim(-1, dim)
    return y if out_dtype is None else y.to(out_dtype)


def softmax(x, dim=-1, *, scale=None, mask=None, is_causal=False):
    """softmax(x·scale + mask) along ``dim``, computed in float32, returned in x's dtype.

    ``mask`` broadcasts to x: bool (True = keep) or floating (added). ``is_causal`` masks
    x[..., i, j] for j > i over x's last two dims. A fully masked row gives zeros, never NaN.
    Any dim and strides: rows are read in place where the layout allows.
    """
    return _softmax(x, dim, scale, mask, is_causal, log=False)


def log_softmax(x, dim=-1, *, scale=None, mask=None, is_causal=False):
    """log(softmax(x·scale + mask)) along ``dim``; a fully masked row gives -inf (log of zeros).

    The gradient is torch's dy - exp(y)·Σdy (times scale) on every backend: dy·scale at a -inf
    output that comes from x or a float mask (a fully masked row included), 0 where the bool mask or
    ``is_causal`` hides the score."""
    return _softmax(x, dim, scale, mask, is_causal, log=True)


# --------------------------------------------------------------------------------------------
# feed-forward
# --------------------------------------------------------------------------------------------


def feed_forward(x, w1, b1=None, w2=None, b2=None, *, activation="gelu", dropout_p=0.0):
    """act(x·w1ᵀ + b1)·w2ᵀ + b2, weights laid out as nn.Linear's, biases optional.

    Shapes: x (..., d_model); w1 (hidden, d_model), or (2·hidden, d_model) for the gated
    ``swiglu``/``geglu`` whose first ``hidden`` rows are the gate's (act(gate)·up); b1 (w1 rows,);
    w2 (d_out, hidden); b2 (d_out,). Activations: relu, gelu (exact, erf), gelu_tanh (tanh
    approximation), silu, and the gated swiglu (silu gate), geglu (exact erf-gelu gate) and geglu_tanh
    (tanh-gelu gate: Hugging Face's gelu_pytorch_tanh as in Gemma, Liger-Kernel's GEGLU).
    ``dropout_p`` drops the activation (before the second GEMM), as nn.Transformer does.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    _check_tensor("x", x)
    if w1 is None:
        raise TypeError("w1 is required")
    if w2 is None:
        raise TypeError("w2 is required")
    device_type = device_type_of(x)
    if torch.is_autocast_enabled(device_type):
        x, w1, b1, w2, b2 = _autocast(device_type, x, w1, b1, w2, b2)
    for name, t in (("w1", w1), ("w2", w2), ("b1", b1), ("b2", b2)):
        if t is not None:
            _check_like(name, t, "x", x)
    if w1.dim() != 2 or w1.size(1) != x.size(-1):
        raise ValueError(f"w1 must have shape (hidden, {x.size(-1)}) for x of shape {tuple(x.shape)}, got {tuple(w1.shape)}")
    hidden = w1.size(0) // 2 if activation in GATED_ACTIVATIONS else w1.size(0)
    if activation in GATED_ACTIVATIONS and w1.size(0) % 2:
        raise ValueError(f"w1 must have an even number of rows (gate, then up) for {activation}, got {w1.size(0)}")
    if w2.dim() != 2 or w2.size(1) != hidden:
        raise ValueError(f"w2 must have shape (d_out, {hidden}) to follow w1 of shape {tuple(w1.shape)}, got {tuple(w2.shape)}")
    if b1 is not None and b1.shape != (w1.size(0),):
        raise ValueError(f"b1 must have shape ({w1.size(0)},), got {tuple(b1.shape)}")
    if b2 is not None and b2.shape != (w2.size(0),):
        raise ValueError(f"b2 must have shape ({w2.size(0)},), got {tuple(b2.shape)}")
    if dropout_p.__class__ is not float or not 0.0 <= dropout_p < 1.0:  # the check, past the usual 0.0
        dropout_p = _check_dropout(dropout_p)
    if x.numel() == 0 or w1.numel() == 0:
        return reference.feed_forward(x, w1, b1, w2, b2, activation).reshape(*x.shape[:-1], w2.size(0))
    rows = x.dim() == 2
    seed = _dropout_seed(dropout_p, x.device) if dropout_p else None
    out = feed_forward_op.feed_forward(
        FeedForwardParams(activation, dropout_p, seed), x if rows else x.reshape(-1, x.size(-1)), w1, b1, w2, b2
    )
    return out if rows else out.reshape(*x.shape[:-1], w2.size(0))


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------


def _check_norm(x, normalized_shape, params, residual):
    _check_tensor("x", x)
    # Under autocast the norm runs in float32 whatever the dtypes (as torch's: a bf16 x with float32
    # weights and a float32 residual stream is the usual mixed-precision case), so only devices must match.
    same_dtype = not torch.is_autocast_enabled(device_type_of(x))
    if normalized_shape.__class__ is tuple and len(normalized_shape) == 1 and normalized_shape[0].__class__ is int:
        shape = normalized_shape  # a module's own (n,): the common case, checked without the loop below
    elif isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        shape = (normalized_shape,)
    elif isinstance(normalized_shape, (tuple, list, torch.Size)) and all(
        isinstance(d, int) and not isinstance(d, bool) for d in normalized_shape
    ):
        shape = tuple(normalized_shape)
    else:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    x_shape = x.shape
    if len(shape) == 0 or len(shape) > len(x_shape) or x_shape[-len(shape):] != shape:
        raise ValueError(f"normalized_shape {shape} does not match the last dims of x {tuple(x.shape)}")
    for name, t in params:
        if t is not None:
            _check_like(name, t, "x", x, same_dtype)
            if t.shape != shape:
                raise ValueError(f"{name} must have shape {shape} (normalized_shape), got {tuple(t.shape)}")
    if residual is not None:
        _check_like("residual", residual, "x", x, same_dtype)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    return shape


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__} {eps!r}")
    return float(eps)


def _norm(op, x, shape, params, eps, residual):
    n = math.prod(shape)
    x, residual, params, out_dtype = _autocast_float32(device_type_of(x), x, residual, params)
    flat_rows = x.dim() == 2 and len(shape) == 1  # (M, N) over N: no reshapes
    x2 = x if flat_rows else x.reshape(-1, n)
    r2 = None if residual is None or flat_rows else residual.reshape(-1, n)
    r2 = residual if flat_rows else r2
    flat = params if len(shape) == 1 else [None if p is None else p.reshape(n) for p in params]
    if x.numel() == 0:
        # zeros still connected to x, residual and the parameters: backward gives zero gradients
        y, s = _empty_like_graph(x.shape, x, x, residual, *params), (None if residual is None else x + residual)
    else:
        weight, bias = flat if len(flat) == 2 else (flat[0], None)
        y, s = norms.norm(NormParams(eps, op == "rms_norm"), x2, weight, bias, r2)
    if not flat_rows:
        y = y.reshape(x.shape)
        s = None if s is None else s.reshape(x.shape)
    if out_dtype is not None:
        y, s = y.to(out_dtype), (None if s is None else s.to(out_dtype))
    return y if residual is None else (y, s)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, residual=None):
    """F.layer_norm over ``normalized_shape``. With ``residual``: s = x + residual is fused in and
    ``(layer_norm(s), s)`` is returned (the pre-norm block's pattern)."""
    shape = _check_norm(x, normalized_shape, (("weight", weight), ("bias", bias)), residual)
    return _norm("layer_norm", x, shape, [weight, bias], _check_eps(eps), residual)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, residual=None):
    """F.rms_norm: x / sqrt(mean(x²) + eps) · weight; eps None means torch.finfo(x.dtype).eps.
    With ``residual``: ``(rms_norm(x + residual), x + residual)``."""
    shape = _check_norm(x, normalized_shape, (("weight", weight),), residual)
    if eps is None:  # the dtype of x + residual, which torch's rms_norm would be given
        eps = torch.finfo(x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)).eps
    else:
        eps = _check_eps(eps)
    return _norm("rms_norm", x, shape, [weight], eps, residual)
