"""The C++/CUDA extension ``fastattn._C`` as dispatch backends ``cpu`` and ``cuda``.

The extension registers its ops with TORCH_LIBRARY (schemas in csrc/fastattn.cpp, kernels per
dispatch key); this file registers their fake (meta) implementations (written by the op families,
fastattn/ops/) and provides the families' kernels (the protocols in fastattn/ops/<family>.py).
The same Python serves both backends: only the device of the tensors (and so the kernels the
dispatcher picks) differs. The autograd, and what it saves, is the family's, the same on every
backend: the FFN's backward recomputes h = x·w1ᵀ and the activation (only x is kept).

``dropout_mask(shape, p, seed, device)`` returns the keep mask the kernels draw (csrc/dropout_rng.h:
Philox 4x32-10, the one scheme of every backend, so Triton and the reference drop the same
elements), so that tests can reproduce a kernel's dropout exactly with the reference implementation.

The dropout seed is a one-element int64 tensor on the inputs' device (None without dropout; see
functional._dropout_seed); the autograd saves it with the tensors, so the backward draws the
forward's mask.
"""

from __future__ import annotations

import threading

import torch

from fastattn.ops import attention as attention_op
from fastattn.ops import feed_forward as feed_forward_op
from fastattn.ops import norms
from fastattn.ops import softmax as softmax_op
from fastattn.reference import GATED_ACTIVATIONS
from fastattn.utils import no_double_backward

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


def unavailable_reason(backend: str, device_type: str | None = None) -> str | None:
    """Why backend ``cpu`` or ``cuda`` of the extension cannot run here (on ``device_type``), or None."""
    if device_type is not None and device_type != _DEVICE[backend]:
        return f"the {backend} backend runs on {_DEVICE[backend].upper()} tensors only, not {device_type}"
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
# (the family modules own them; the fused FFN epilogue and the dropout mask are this backend's)
# --------------------------------------------------------------------------------------------


def _register_fakes() -> None:
    register = torch.library.register_fake
    register("fastattn::attention_fwd")(attention_op.fake_forward)
    register("fastattn::attention_bwd")(attention_op.fake_backward)
    register("fastattn::softmax_fwd")(softmax_op.fake_forward)
    register("fastattn::softmax_bwd")(softmax_op.fake_backward)
    register("fastattn::layer_norm_fwd")(norms.fake_layer_norm_forward)
    register("fastattn::layer_norm_bwd")(norms.fake_layer_norm_backward)
    register("fastattn::rms_norm_fwd")(norms.fake_rms_norm_forward)
    register("fastattn::rms_norm_bwd")(norms.fake_rms_norm_backward)

    @register("fastattn::dropout_mask")
    def _(like, p, seed):
        return like.new_empty(like.shape, dtype=torch.bool)

    @register("fastattn::ffn_act_fwd")
    def _(h, bias, activation, dropout_p, seed):
        gated = activation in GATED_ACTIVATIONS
        return h.new_empty(h.shape[0], h.shape[1] // 2 if gated else h.shape[1])

    @register("fastattn::ffn_act_bwd")
    def _(grad, h, bias, activation, dropout_p, seed):
        return h.new_empty(h.shape)


# --------------------------------------------------------------------------------------------
# autograd of the fused FFN epilogue op (an op of this backend only; the families' autograd is
# registered by fastattn.ops.<family>.bind below)
# --------------------------------------------------------------------------------------------


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


def _register_dropout_mask_fallbacks() -> None:
    """dropout_mask on devices whose kernels lack it: draw on the CPU (same RNG) and move the mask."""

    def on_cpu(like, p, seed):
        cpu_like = torch.empty((), device="cpu").expand(like.shape)
        return torch.ops.fastattn.dropout_mask(cpu_like, p, seed.cpu()).to(like.device)

    if not _has_kernel("dropout_mask", "CUDA"):
        torch.library.impl("fastattn::dropout_mask", "CUDA")(on_cpu)


if _import_error is None:
    _register_fakes()
    torch.library.register_autograd("fastattn::ffn_act_fwd", _ffn_act_backward, setup_context=_ffn_act_setup)
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
# the kernel providers (protocols in fastattn/ops/<family>.py)
# --------------------------------------------------------------------------------------------


_ops = torch.ops.fastattn  # (a module global: one attribute lookup less per call)


class _Provider:
    native_autograd = False
    forward_op = None

    def __init__(self, backend: str):
        self.backend = backend

    def _reason(self, family: str, kernel: str, dtype: torch.dtype) -> str | None:
        if not _has_kernel(kernel, self.backend.upper()):
            return f"the {self.backend} extension has no {family} kernel"
        if dtype not in _DTYPES:
            return f"{self.backend} kernels take float16, bfloat16 or float32 (compute in float32), not {dtype}"
        return None


class _Attention(_Provider):
    forward_op = "fastattn::attention_fwd"

    def supports(self, call) -> str | None:
        reason = self._reason("attention", "attention_fwd", call.dtype) or attention_op.unsupported_feature(call)
        if reason is not None:
            return reason
        limit = _MAX_HEAD_DIM[self.backend]
        if limit is not None and max(call.head_dim, call.head_dim_v) > limit:
            return f"{self.backend} attention supports head dims up to {limit}, got {max(call.head_dim, call.head_dim_v)}"
        if call.mask_needs_grad:
            return f"{self.backend} attention computes no gradient for attn_mask, and this mask requires grad"
        return None

    def forward(self, p, q, k, v):
        return _ops.attention_fwd.default(q, k, v, p.mask, p.scale, p.is_causal, p.dropout_p, p.seed)

    def backward(self, p, dout, q, k, v, out, lse, need_dq, need_dkdv):
        return torch.ops.fastattn.attention_bwd.default(
            dout, q, k, v, out, lse, p.mask, p.scale, p.is_causal, p.dropout_p, p.seed
        )

    def dropout_keep_mask(self, shape, dropout_p, seed, device):
        return dropout_mask(shape, dropout_p, seed, device)


class _Softmax(_Provider):
    forward_op = "fastattn::softmax_fwd"

    def supports(self, call) -> str | None:
        return self._reason("softmax", "softmax_fwd", call.dtype)

    def forward(self, p, x):
        return _ops.softmax_fwd.default(x, p.mask, p.scale, p.is_causal, p.log)

    def backward(self, p, dy, y, scale):
        return torch.ops.fastattn.softmax_bwd.default(dy, y, scale, p.log)


class _FeedForward(_Provider):
    """BLAS GEMMs around the fused epilogue act(h + b1) (with dropout); h = x·w1ᵀ is recomputed in
    the backward, so only x is kept (the family's autograd saves x and the parameters)."""

    def supports(self, call) -> str | None:
        return self._reason("feed_forward", "ffn_act_fwd", call.dtype)

    def forward(self, p, x, w1, b1, w2, b2):
        a = torch.ops.fastattn.ffn_act_fwd.default(torch.mm(x, w1.t()), b1, p.activation, p.dropout_p, p.seed)
        return torch.mm(a, w2.t()) if b2 is None else torch.addmm(b2, a, w2.t())

    def backward(self, p, dout, x, w1, b1, w2, need_dx, need_dw1, need_db1, need_dw2, need_db2):
        h = torch.mm(x, w1.t())
        dx = dw1 = db1 = dw2 = db2 = None
        if need_dw2:
            dw2 = dout.t().mm(torch.ops.fastattn.ffn_act_fwd.default(h, b1, p.activation, p.dropout_p, p.seed))
        if need_db2:
            db2 = dout.sum(0)
        if need_dx or need_dw1 or need_db1:
            dh = torch.ops.fastattn.ffn_act_bwd.default(dout.mm(w2), h, b1, p.activation, p.dropout_p, p.seed)
            dx = dh.mm(w1) if need_dx else None
            dw1 = dh.t().mm(x) if need_dw1 else None
            db1 = dh.sum(0) if need_db1 else None
        return dx, dw1, db1, dw2, db2

    def dropout_keep_mask(self, shape, dropout_p, seed, device):
        return dropout_mask(shape, dropout_p, seed, device)


class _Norm(_Provider):
    def __init__(self, backend: str, rms: bool):
        super().__init__(backend)
        self.rms = rms
        self.family = "rms_norm" if rms else "layer_norm"
        self.forward_op = f"fastattn::{self.family}_fwd"

    def supports(self, call) -> str | None:
        return self._reason(self.family, self.forward_op.split("::")[1], call.dtype)

    def forward(self, p, x, weight, bias, residual):
        if self.rms:
            y, s, rstd = torch.ops.fastattn.rms_norm_fwd.default(x, residual, weight, p.eps)
            return y, s, rstd.new_empty(0), rstd
        return torch.ops.fastattn.layer_norm_fwd.default(x, residual, weight, bias, p.eps)

    def backward(self, p, dy, s, weight, mean, rstd, need_dweight, need_dbias):
        if self.rms:
            ds, dweight = torch.ops.fastattn.rms_norm_bwd.default(dy, s, weight, rstd)
            return ds, (dweight if need_dweight else None), None
        ds, dweight, dbias = torch.ops.fastattn.layer_norm_bwd.default(dy, s, weight, mean, rstd, need_dbias)
        return ds, (dweight if need_dweight else None), (dbias if need_dbias else None)


def load_kernels(backend: str):
    """op family -> provider, for the extension's ``backend`` ("cpu" or "cuda")."""
    if _import_error is not None:
        raise ImportError(_import_error)
    with _bind_lock:
        if backend not in _bound:
            _bound[backend] = {
                "attention": attention_op.bind(_Attention(backend)),
                "softmax": softmax_op.bind(_Softmax(backend)),
                "feed_forward": feed_forward_op.bind(_FeedForward(backend)),
                "layer_norm": norms.bind(_Norm(backend, rms=False)),
                "rms_norm": norms.bind(_Norm(backend, rms=True)),
            }
        return _bound[backend]


# cpu and cuda share the torch ops (the dispatcher picks the kernel by device): the op autograd is
# registered by the first backend loaded (fastattn.ops.claim_op).
_bind_lock = threading.Lock()
_bound: dict[str, dict] = {}
