"""The C++/CUDA extension ``fastattn._C`` as dispatch backends ``cpu`` and ``cuda``.

The extension registers its ops with TORCH_LIBRARY (schemas in csrc/fastattn.cpp, kernels per
dispatch key); this file adds their fake (meta) implementations and autograd, and maps them to the
dispatch's canonical op arguments (see fastattn/functional.py). The same Python serves both
backends: only the device of the tensors (and so the kernels the dispatcher picks) differs.

What the autograd saves:
- attention: q, k, v, out and the float32 log-sum-exp (B, Hq, Nq); the backward recomputes the
  weights block by block (no (Nq, Nk) tensor is ever stored) and regenerates the dropout mask.
- softmax: the output only (log_softmax with a bool mask: also that mask, to zero the gradient it
  hides). Norms: s = x (+ residual), weight and the float32 row statistics.
- feed_forward: x, the weights and h = x·w1ᵀ (before bias and activation); the activation
  act(h + b1) is recomputed in the backward by the fused epilogue instead of being kept alive.

``dropout_mask(shape, p, seed, device)`` returns the keep mask the kernels draw (csrc/dropout_rng.h:
Philox 4x32-10, the one scheme of every backend, so Triton and the reference drop the same
elements), so that tests can reproduce a kernel's dropout exactly with the reference implementation.

The dropout seed is a one-element int64 tensor on the inputs' device (None without dropout; see
functional._dropout_seed); the autograd saves it with the tensors, so the backward draws the
forward's mask.
"""

from __future__ import annotations

import torch

from fastattn.reference import GATED_ACTIVATIONS
from fastattn.utils import no_double_backward, zero_hidden_scores

_import_error: str | None = None
try:
    from fastattn import _C  # noqa: F401  (loading it registers torch.ops.fastattn.*)
except ImportError as exc:  # not built, or built against another torch
    _import_error = (
        f"the extension fastattn._C is not built or does not load ({exc}); "
        "build it with `pip install --no-build-isolation -e .`"
    )

# What each backend's kernels accept (they compute in float32; float64 stays on the reference).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = {"cpu": None, "cuda": 256}  # the CPU kernel tiles any head dim; the CUDA one keeps it in registers
_DEVICE = {"cpu": "cpu", "cuda": "cuda"}


@torch._dynamo.assume_constant_result  # a constant of the build: keeps torch.compile from tracing into it
def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", key)


def unavailable_reason(backend: str) -> str | None:
    """Why backend ``cpu`` or ``cuda`` of the extension cannot run here, or None."""
    if _import_error is not None:
        return _import_error
    if backend == "cuda":
        if not _has_kernel("attention_fwd", "CUDA"):
            return "fastattn._C was built without CUDA kernels (no nvcc or CUDA torch at build time, or FASTATTN_SKIP_CUDA=1)"
        if not torch.cuda.is_available():
            return "no CUDA device"
    return None


# --------------------------------------------------------------------------------------------
# fake implementations: shapes, dtypes and (contiguous) layouts of what the kernels return
# --------------------------------------------------------------------------------------------


def _register_fakes() -> None:
    register = torch.library.register_fake

    @register("fastattn::attention_fwd")
    def _(q, k, v, mask, scale, is_causal, dropout_p, seed):
        b, h, n_q, _ = q.shape
        return q.new_empty(b, h, n_q, v.shape[-1]), q.new_empty(b, h, n_q, dtype=torch.float32)

    @register("fastattn::attention_bwd")
    def _(dout, q, k, v, out, lse, mask, scale, is_causal, dropout_p, seed):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @register("fastattn::dropout_mask")
    def _(like, p, seed):
        return like.new_empty(like.shape, dtype=torch.bool)

    @register("fastattn::softmax_fwd")
    def _(x, mask, scale, is_causal, log):
        return x.new_empty(x.shape)

    @register("fastattn::softmax_bwd")
    def _(dy, y, scale, log):
        return y.new_empty(y.shape)

    @register("fastattn::ffn_act_fwd")
    def _(h, bias, activation, dropout_p, seed):
        gated = activation in GATED_ACTIVATIONS
        return h.new_empty(h.shape[0], h.shape[1] // 2 if gated else h.shape[1])

    @register("fastattn::ffn_act_bwd")
    def _(grad, h, bias, activation, dropout_p, seed):
        return h.new_empty(h.shape)

    @register("fastattn::layer_norm_fwd")
    def _(x, residual, weight, bias, eps):
        stats = (x.shape[0],)
        res = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
        return x.new_empty(x.shape), res, x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)

    @register("fastattn::layer_norm_bwd")
    def _(dy, s, weight, mean, rstd, has_bias):
        n = s.shape[1]
        return s.new_empty(s.shape), s.new_empty(n if weight is not None else 0), s.new_empty(n if has_bias else 0)

    @register("fastattn::rms_norm_fwd")
    def _(x, residual, weight, eps):
        res = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
        return x.new_empty(x.shape), res, x.new_empty((x.shape[0],), dtype=torch.float32)

    @register("fastattn::rms_norm_bwd")
    def _(dy, s, weight, rstd):
        return s.new_empty(s.shape), s.new_empty(s.shape[1] if weight is not None else 0)


# --------------------------------------------------------------------------------------------
# autograd of the forward ops (their backward ops have none: a double backward raises
# DoubleBackwardError, see utils.no_double_backward)
# --------------------------------------------------------------------------------------------


def _attention_setup(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.args = (scale, is_causal, dropout_p)
    ctx.mark_non_differentiable(lse)


@no_double_backward("attention")
def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastattn.attention_bwd(dout, q, k, v, out, lse, mask, *ctx.args, seed)
    return dq, dk, dv, None, None, None, None, None


def _softmax_setup(ctx, inputs, output):
    _x, mask, scale, is_causal, log = inputs
    # log_softmax: the bool mask marks the scores x does not reach (zero gradient, utils.zero_hidden_scores)
    hidden = mask if log and mask is not None and mask.dtype == torch.bool else None
    ctx.save_for_backward(output, hidden)
    ctx.args = (scale, log, log and is_causal)


@no_double_backward("softmax")
def _softmax_backward(ctx, dy):
    y, hidden = ctx.saved_tensors
    scale, log, causal = ctx.args
    if not ctx.needs_input_grad[1]:
        dx = torch.ops.fastattn.softmax_bwd(dy, y, scale, log)
        return (zero_hidden_scores(dx, hidden, causal) if log else dx), None, None, None, None
    # A float mask that requires grad is added to the scaled scores: its gradient is the scores'.
    dscores = torch.ops.fastattn.softmax_bwd(dy, y, 1.0, log)
    if log:
        dscores = zero_hidden_scores(dscores, None, causal)
    dx = dscores * scale if ctx.needs_input_grad[0] else None
    return dx, dscores, None, None, None


def _ffn_act_setup(ctx, inputs, output):
    h, bias, activation, dropout_p, seed = inputs
    ctx.save_for_backward(h, bias, seed)
    ctx.args = (activation, dropout_p)


@no_double_backward("feed_forward activation")
def _ffn_act_backward(ctx, grad):
    h, bias, seed = ctx.saved_tensors
    dh = torch.ops.fastattn.ffn_act_bwd(grad, h, bias, *ctx.args, seed)
    dbias = dh.sum(0) if bias is not None and ctx.needs_input_grad[1] else None
    return dh, dbias, None, None, None


def _layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _eps = inputs
    _y, residual_out, mean, rstd = output
    ctx.save_for_backward(residual_out if residual is not None else x, weight, mean, rstd)
    ctx.has_residual, ctx.has_bias = residual is not None, bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, not a tensor of zeros


@no_double_backward("layer_norm")
def _layer_norm_backward(ctx, dy, dresidual_out, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    ds = dweight = dbias = None
    if dy is not None:
        ds, dweight, dbias = torch.ops.fastattn.layer_norm_bwd(dy, s, weight, mean, rstd, ctx.has_bias)
    ds = _add_residual_grad(ds, dresidual_out if ctx.has_residual else None)
    return (
        ds,
        ds if ctx.has_residual else None,
        dweight if weight is not None else None,
        dbias if ctx.has_bias else None,
        None,
    )


def _add_residual_grad(ds, dresidual_out):
    """s = x + residual also leaves the norm (the next block's residual stream): its gradient adds."""
    if dresidual_out is None:
        return ds
    return dresidual_out if ds is None else ds + dresidual_out


def _rms_norm_setup(ctx, inputs, output):
    x, residual, weight, _eps = inputs
    _y, residual_out, rstd = output
    ctx.save_for_backward(residual_out if residual is not None else x, weight, rstd)
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


@no_double_backward("rms_norm")
def _rms_norm_backward(ctx, dy, dresidual_out, _drstd):
    s, weight, rstd = ctx.saved_tensors
    ds = dweight = None
    if dy is not None:
        ds, dweight = torch.ops.fastattn.rms_norm_bwd(dy, s, weight, rstd)
    ds = _add_residual_grad(ds, dresidual_out if ctx.has_residual else None)
    return ds, ds if ctx.has_residual else None, dweight if weight is not None else None, None


def _register_autograd() -> None:
    register = torch.library.register_autograd
    register("fastattn::attention_fwd", _attention_backward, setup_context=_attention_setup)
    register("fastattn::softmax_fwd", _softmax_backward, setup_context=_softmax_setup)
    register("fastattn::ffn_act_fwd", _ffn_act_backward, setup_context=_ffn_act_setup)
    register("fastattn::layer_norm_fwd", _layer_norm_backward, setup_context=_layer_norm_setup)
    register("fastattn::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup)


def _register_dropout_mask_fallbacks() -> None:
    """dropout_mask on devices whose kernels lack it: draw on the CPU (same RNG) and move the mask."""

    def on_cpu(like, p, seed):
        cpu_like = torch.empty((), device="cpu").expand(like.shape)
        return torch.ops.fastattn.dropout_mask(cpu_like, p, seed.cpu()).to(like.device)

    if not _has_kernel("dropout_mask", "CUDA"):
        torch.library.impl("fastattn::dropout_mask", "CUDA")(on_cpu)


if _import_error is None:
    _register_fakes()
    _register_autograd()
    _register_dropout_mask_fallbacks()


def seed_tensor(seed, device="cpu") -> torch.Tensor:
    """An int seed as the ops take it (a one-element int64 tensor on ``device``); a tensor as is."""
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


def dropout_mask(shape, p: float, seed, device="cpu") -> torch.Tensor:
    """The dropout keep mask (bool, True = kept) the extension's kernels draw for ``seed`` (an int,
    or the seed tensor the ops take).

    ``shape`` is (B, Hq, Nq, Nk) for attention weights and (M, hidden) for the FFN's activation.
    """
    if _import_error is not None:
        raise ImportError(_import_error)
    like = torch.empty((), device=device).expand(tuple(shape))
    return torch.ops.fastattn.dropout_mask(like, float(p), seed_tensor(seed, device))


# --------------------------------------------------------------------------------------------
# the canonical ops
# --------------------------------------------------------------------------------------------


def _attention(q, k, v, mask, scale, is_causal, dropout_p, seed):
    return torch.ops.fastattn.attention_fwd(q, k, v, mask, scale, is_causal, dropout_p, seed)[0]


def _softmax(x, mask, scale, is_causal, log):
    return torch.ops.fastattn.softmax_fwd(x, mask, scale, is_causal, log)


class _FeedForward(torch.autograd.Function):
    """act(x·w1ᵀ + b1)·w2ᵀ + b2 with dropout on the activation: BLAS GEMMs around the fused epilogue.

    Saves h = x·w1ᵀ (not the activation, which the backward recomputes from h)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, activation, dropout_p, seed):
        h = torch.mm(x, w1.t())
        a = torch.ops.fastattn.ffn_act_fwd(h, b1, activation, dropout_p, seed)
        out = torch.mm(a, w2.t()) if b2 is None else torch.addmm(b2, a, w2.t())
        ctx.save_for_backward(x, w1, b1, w2, h, seed)
        ctx.args = (activation, dropout_p)
        return out

    @staticmethod
    @no_double_backward("feed_forward")
    def backward(ctx, grad):
        x, w1, b1, w2, h, seed = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        dx = dw1 = db1 = dw2 = db2 = None
        if need_w2:
            a = torch.ops.fastattn.ffn_act_fwd(h, b1, *ctx.args, seed)
            dw2 = grad.t().mm(a)
        if need_b2:
            db2 = grad.sum(0)
        if need_x or need_w1 or need_b1:
            dh = torch.ops.fastattn.ffn_act_bwd(grad.mm(w2), h, b1, *ctx.args, seed)
            dx = dh.mm(w1) if need_x else None
            dw1 = dh.t().mm(x) if need_w1 else None
            db1 = dh.sum(0) if need_b1 else None
        return dx, dw1, db1, dw2, db2, None, None, None


def _feed_forward(x, w1, b1, w2, b2, activation, dropout_p, seed):
    return _FeedForward.apply(x, w1, b1, w2, b2, activation, dropout_p, seed)


def _layer_norm(x, weight, bias, eps, residual):
    y, residual_out, _mean, _rstd = torch.ops.fastattn.layer_norm_fwd(x, residual, weight, bias, eps)
    return y, (residual_out if residual is not None else None)


def _rms_norm(x, weight, eps, residual):
    y, residual_out, _rstd = torch.ops.fastattn.rms_norm_fwd(x, residual, weight, eps)
    return y, (residual_out if residual is not None else None)


# --------------------------------------------------------------------------------------------
# supports(): None when the backend's kernels serve the call, else why not
# --------------------------------------------------------------------------------------------


def _common_reason(backend: str, op: str, kernel: str, *tensors) -> str | None:
    if not _has_kernel(kernel, backend.upper()):
        return f"the {backend} extension has no {op} kernel"
    for t in tensors:
        if t is None:
            continue
        if t.device.type != _DEVICE[backend]:
            return f"the {backend} backend runs on {_DEVICE[backend]} tensors, got {t.device.type}"
        if t.dtype not in _DTYPES:
            return f"{backend} kernels take float16, bfloat16 or float32 (compute in float32), not {t.dtype}"
    return None


def _attention_supports(backend: str):
    def supports(q, k, v, mask, scale, is_causal, dropout_p, seed):
        reason = _common_reason(backend, "attention", "attention_fwd", q, k, v)
        if reason is not None:
            return reason
        limit = _MAX_HEAD_DIM[backend]
        if limit is not None and max(q.size(-1), v.size(-1)) > limit:
            return f"{backend} attention supports head dims up to {limit}, got {max(q.size(-1), v.size(-1))}"
        if mask is not None and mask.device != q.device:
            return f"the mask is on {mask.device}, the inputs on {q.device}"
        if mask is not None and mask.requires_grad and torch.is_grad_enabled():
            return f"{backend} attention computes no gradient for attn_mask, and this mask requires grad"
        return None

    return supports


def _softmax_supports(backend: str):
    def supports(x, mask, scale, is_causal, log):
        return _common_reason(backend, "softmax", "softmax_fwd", x)

    return supports


def _feed_forward_supports(backend: str):
    def supports(x, w1, b1, w2, b2, activation, dropout_p, seed):
        return _common_reason(backend, "feed_forward", "ffn_act_fwd", x, w1, b1, w2, b2)

    return supports


def _layer_norm_supports(backend: str):
    def supports(x, weight, bias, eps, residual):
        return _common_reason(backend, "layer_norm", "layer_norm_fwd", x, weight, bias, residual)

    return supports


def _rms_norm_supports(backend: str):
    def supports(x, weight, eps, residual):
        return _common_reason(backend, "rms_norm", "rms_norm_fwd", x, weight, residual)

    return supports


def load_ops(backend: str):
    """op name -> dispatch.Op for the extension's ``backend`` ("cpu" or "cuda")."""
    if _import_error is not None:
        raise ImportError(_import_error)
    from fastattn.dispatch import Op

    return {
        "attention": Op(_attention, _attention_supports(backend)),
        "softmax": Op(_softmax, _softmax_supports(backend)),
        "feed_forward": Op(_feed_forward, _feed_forward_supports(backend)),
        "layer_norm": Op(_layer_norm, _layer_norm_supports(backend)),
        "rms_norm": Op(_rms_norm, _rms_norm_supports(backend)),
    }
