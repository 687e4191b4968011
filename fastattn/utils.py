"""Small helpers the kernel launchers share."""

import os

import torch


def poisoning() -> bool:
    """True when FASTATTN_POISON_OUTPUTS=1 (the tests set it): outputs start as NaN, so an element
    a kernel forgot to write shows in the comparison instead of passing by luck."""
    return os.environ.get("FASTATTN_POISON_OUTPUTS", "0") == "1"


def empty(*shape, dtype, device) -> torch.Tensor:
    """torch.empty for kernel outputs, NaN-filled under FASTATTN_POISON_OUTPUTS=1."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if poisoning() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_like(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return empty(*t.shape, dtype=dtype or t.dtype, device=t.device)


def seed_arg(seed: torch.Tensor | None, dropout_p: float, like: torch.Tensor) -> torch.Tensor:
    """The Triton kernels' seed pointer: the one-element int64 seed tensor on the inputs' device,
    which the kernels load only when dropping out (any tensor stands in for it otherwise: never read)."""
    if dropout_p == 0.0:
        return like
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != like.device:
        desc = None if seed is None else f"{seed.dtype} of shape {tuple(seed.shape)} on {seed.device}"
        raise ValueError(f"seed must be a one-element int64 tensor on {like.device} when dropout_p > 0, got {desc}")
    return seed


# --------------------------------------------------------------------------------------------
# double backward: never a silent zero
# --------------------------------------------------------------------------------------------


class _NoDoubleBackward(torch.autograd.Function):
    """Passes first-order gradients through unchanged (as copies) and ties them to what they depend
    on, so that differentiating them (a second derivative) reaches ``backward`` and raises."""

    @staticmethod
    def forward(op: str, n_grads: int, *tensors):
        return tuple(t.clone() for t in tensors[:n_grads])

    @staticmethod
    def setup_context(ctx, inputs, output):  # the separate form torch.func transforms require
        ctx.op = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        from fastattn.errors import DoubleBackwardError

        raise DoubleBackwardError(
            f"the derivative of fastattn's {ctx.op} backward is not implemented: a second derivative "
            f"(torch.autograd.grad(..., create_graph=True) then differentiated again) through the fused "
            f"{ctx.op} kernel is not supported. Run that part with fastattn.use_backend('reference') "
            "(plain PyTorch, differentiable twice) or with torch's own op."
        )


def no_double_backward(op: str):
    """Decorator for a kernel's backward(ctx, *grad_outputs): under create_graph=True (grad mode on
    in the backward) the gradients it returns are correct first-order values, and differentiating
    them raises DoubleBackwardError instead of giving zero or None (the kernels' backward ops have
    no autograd of their own). With create_graph=False nothing changes."""

    def decorate(backward):
        def wrapper(ctx, *grad_outputs):
            if not torch.is_grad_enabled() or torch.compiler.is_compiling():
                return backward(ctx, *grad_outputs)
            with torch.no_grad():  # the backward ops have no autograd: no "not registered" warnings
                grads = backward(ctx, *grad_outputs)
            single = not isinstance(grads, tuple)
            grads = (grads,) if single else grads
            deps = [
                t
                for t in (*grad_outputs, *ctx.saved_tensors)
                if isinstance(t, torch.Tensor) and t.requires_grad
            ]
            present = [g for g in grads if isinstance(g, torch.Tensor)]
            if deps and present:
                wrapped = iter(_NoDoubleBackward.apply(op, len(present), *present, *deps))
                grads = tuple(next(wrapped) if isinstance(g, torch.Tensor) else g for g in grads)
            return grads[0] if single else grads

        wrapper.__name__ = getattr(backward, "__name__", "backward")
        wrapper.__doc__ = backward.__doc__
        return wrapper

    return decorate


def zero_hidden_scores(grad: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """log_softmax's gradient with zeros where a bool mask (False) or ``is_causal`` (column j > row i)
    hides the score: the output does not depend on x there. The kernels' backward, which sees only
    y, gives torch's dy - exp(y)·Σdy, that is dy at every -inf output; a -inf coming from x or from a
    float mask keeps that dy, as torch's log_softmax of x + mask does."""
    if mask is not None and mask.dtype == torch.bool:
        grad = grad.masked_fill(~mask, 0.0)
    if is_causal:
        rows, cols = grad.size(-2), grad.size(-1)
        grad = grad.masked_fill(torch.ones(rows, cols, dtype=torch.bool, device=grad.device).triu(1), 0.0)
    return grad
