"""The op families: what each op is, independent of the backend that computes it.

Layers (a call goes down, never sideways)::

    fastattn.functional / fastattn.nn        public arguments -> checks -> one params object
              |
    fastattn.ops.<family>                    params + call facts, fake functions, autograd (once)
              |   dispatch.kernels(family, facts)   (cached per facts: device, dtype, features)
              v
    kernel providers                         triton (fastattn/triton/*), cpu + cuda (fastattn/ext.py,
                                             csrc/), reference (fastattn/reference.py)

Per family (attention, softmax, feed_forward, norms) the module here owns:
- ``<Family>Params``: a NamedTuple (immutable, and traced by torch.compile as a plain tuple) built
  and validated once by the public function; nothing downstream re-validates.
- ``<Family>Call``: the hashable facts of a call that kernels' ``supports`` may read (device type,
  dtype, sizes that limit a kernel, the features in use). Selection is cached on it.
- the fake (meta) functions of the extension's ops, and the autograd: an ``autograd.Function``
  per provider (built by one factory) for eager and compiled calls, and the same backward
  registered on each provider's forward torch op, so that the op called directly
  (``torch.ops.fastattn.attention_fwd``) is differentiable too.

A provider is an object per family with this protocol:
- ``supports(call) -> None | str``: None when its kernels serve the call, else why not;
- ``forward(params, *tensors)`` and ``backward(params, ...)``: the kernels, called below autograd;
- ``native_autograd``: True for the reference (plain PyTorch: torch differentiates it);
- ``forward_op``: its torch op for the forward, when it has one (autograd registered there too).
A backend module exposes ``KERNELS`` (family -> provider) or ``load_kernels(backend)``, and
``unavailable_reason(device_type)``; dispatch.py holds the registry of backend names.
"""

from __future__ import annotations

import contextlib

import torch


def below_autograd():
    """Run the providers' torch ops past their autograd layer: the family's Function records the
    graph once, so the op's own (Python) autograd kernel need not run again. Under torch.compile
    the tracer handles it (a no-op context)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def device_type_of(t: torch.Tensor) -> str:
    """t.device.type without building a torch.device for the usual two (a measurable cost per call)."""
    if t.is_cuda:
        return "cuda"
    return "cpu" if t.is_cpu else t.device.type


def records_graph(*tensors) -> bool:
    """Whether a call must go through the family's autograd Function: grad mode is on and an
    input requires grad, or torch.compile is tracing (it differentiates the Function). Otherwise the
    kernels run directly (inference and decoding skip the autograd layer and its cost)."""
    if torch.compiler.is_compiling():
        return True
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def mask_kind(mask: torch.Tensor | None) -> str:
    """"none", "bool" or "float": what a mask argument is, as the kernels specialise on it."""
    if mask is None:
        return "none"
    return "bool" if mask.dtype == torch.bool else "float"


_ops_with_autograd: set[str] = set()


def claim_op(name: str) -> bool:
    """True the first time ``name`` (a torch op) is claimed: its autograd is registered once, though
    several providers (the extension's cpu and cuda) call the same op."""
    if name in _ops_with_autograd:
        return False
    _ops_with_autograd.add(name)
    return True
