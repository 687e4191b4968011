"""Backend registry and selection: the only place that knows which backends exist.

Each backend provides, per op, an autograd-capable callable and a ``supports`` function that
returns ``None`` when the backend can serve a call or a string saying why it cannot. Backends
register lazily (their modules are imported on first use), so importing fastattn stays cheap and
a missing Triton or an unbuilt extension only removes that backend.

Selection:
- forced (``FASTATTN_BACKEND=<name>`` or ``with fastattn.use_backend(name):``, the context manager
  winning over the environment): that backend or a ``BackendError`` naming it and the reason;
- automatic: the first backend, in the order of measured speed on the tensors' device, that
  supports the call. ``reference`` (plain PyTorch) supports everything and comes last.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")

# Automatic order per device type, fastest first (see benchmarks/results for the measurements).
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

# Where each backend's ops live: a module exposing ``OPS: dict[str, Op]`` (or a package whose
# ``load_ops()`` returns that dict).
_BACKEND_MODULES = {
    "triton": "fastattn.triton",
    "cuda": "fastattn.ext",
    "cpu": "fastattn.ext",
    "reference": "fastattn.reference",
}


class BackendError(RuntimeError):
    """A forced backend cannot serve a call, or an unknown backend was named."""


@dataclass(frozen=True)
class Op:
    """One backend's implementation of one op.

    fn: autograd-capable callable taking the op's canonical arguments.
    supports: same arguments, returns None when ``fn`` can serve the call, else the reason.
    """

    fn: Callable
    supports: Callable[..., str | None] = lambda *args, **kwargs: None


_local = threading.local()
_lock = threading.Lock()
_ops: dict[str, dict[str, Op]] = {}  # backend -> op name -> Op
_load_errors: dict[str, str] = {}  # backend -> why it could not be loaded


def _load(backend: str) -> dict[str, Op] | None:
    """Import a backend's module once; remember why it failed if it did."""
    with _lock:
        if backend in _ops:
            return _ops[backend]
        if backend in _load_errors:
            return None
        try:
            module = importlib.import_module(_BACKEND_MODULES[backend])
            table = module.load_ops(backend) if hasattr(module, "load_ops") else module.OPS
        except Exception as exc:  # ImportError, a broken extension, a Triton too old ...
            _load_errors[backend] = f"{type(exc).__name__}: {exc}"
            return None
        _ops[backend] = table
        return table


def backend_unavailable_reason(backend: str, device: torch.device | str | None = None) -> str | None:
    """Why ``backend`` cannot run here (on ``device`` if given), or None if it can."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    device_type = torch.device(device).type if device is not None else None
    if backend == "triton":
        interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device_type == "cpu" and not interpreting:
            return "triton runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1)"
        if device_type is None and not (torch.cuda.is_available() or interpreting):
            return "no CUDA device, and TRITON_INTERPRET is not set"
        if device_type not in (None, "cpu", "cuda"):
            return f"triton does not run on {device_type} tensors"
    if backend == "cuda":
        if device_type not in (None, "cuda"):
            return "the cuda backend runs on CUDA tensors only"
        if device_type is None and not torch.cuda.is_available():
            return "no CUDA device"
    if backend == "cpu" and device_type not in (None, "cpu"):
        return "the cpu backend runs on CPU tensors only"
    if _load(backend) is None:
        return _load_errors[backend]
    if backend in ("cuda", "cpu"):
        from fastattn import ext

        return ext.unavailable_reason(backend)
    return None


def backends() -> dict[str, str | None]:
    """Each backend name mapped to None when it can serve here, or the reason it cannot."""
    return {name: backend_unavailable_reason(name) for name in BACKENDS}


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` (innermost) or ``FASTATTN_BACKEND``, if any."""
    stack = getattr(_local, "stack", None)
    name = stack[-1] if stack else os.environ.get("FASTATTN_BACKEND") or None
    if name is not None and name not in BACKENDS and name != "auto":
        raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    return None if name == "auto" else name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for every fastattn call in this block (``None`` or ``"auto"``: automatic)."""
    if name is not None and name not in BACKENDS and name != "auto":
        raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name or "auto")
    try:
        yield
    finally:
        stack.pop()


def _why_not(backend: str, op: str, device: torch.device, args, kwargs) -> str | None:
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        return reason
    impl = _ops[backend].get(op)
    if impl is None:
        return f"{backend} has no {op} kernel"
    return impl.supports(*args, **kwargs)


def select(op: str, device: torch.device, *args, **kwargs) -> tuple[str, Op]:
    """The backend name and implementation that will run ``op`` for these arguments."""
    forced = forced_backend()
    if forced is not None:
        reason = _why_not(forced, op, device, args, kwargs)
        if reason is not None:
            raise BackendError(f"backend {forced!r} cannot run {op}: {reason}")
        return forced, _ops[forced][op]
    tried = []
    for backend in AUTO_ORDER.get(device.type, ("reference",)):
        reason = _why_not(backend, op, device, args, kwargs)
        if reason is None:
            return backend, _ops[backend][op]
        tried.append(f"{backend}: {reason}")
    raise BackendError(f"no backend can run {op} on {device.type}: " + "; ".join(tried))


@torch._dynamo.assume_constant_result
def _forced_backend_now() -> str:
    # Under torch.compile: read once at trace time (the registry's thread-locals stay out of the graph).
    return forced_backend() or ""


@torch._dynamo.assume_constant_result
def _unavailable_now(backend: str, op: str, device: torch.device) -> str:
    # Under torch.compile: imports, locks and the extension's registry run at trace time only.
    reason = backend_unavailable_reason(backend, device)
    if reason is None and op not in _ops[backend]:
        reason = f"{backend} has no {op} kernel"
    return reason or ""


@torch._dynamo.assume_constant_result
def _refuse_now(message: str) -> str:
    # Under torch.compile: raise the BackendError itself at trace time (a raise in traced code would
    # reach the user as dynamo's "Unsupported" with fullgraph=True).
    raise BackendError(message)


def _select_traced(op: str, device: torch.device, args, kwargs) -> str:
    forced = _forced_backend_now()
    order = (forced,) if forced else AUTO_ORDER.get(device.type, ("reference",))
    # Every candidate's registry is loaded (by _unavailable_now, at trace time) before the first read
    # of _ops: dynamo snapshots the dict when it first reads it, and a backend loaded after that was
    # missing from the snapshot (KeyError('reference') compiling a float64 module first in a process).
    unavailable = [_unavailable_now(backend, op, device) for backend in order]
    tried = []
    for backend, unavailable_reason in zip(order, unavailable):
        reason = unavailable_reason or _ops[backend][op].supports(*args, **kwargs)
        if not reason:
            return backend
        if forced:
            return _refuse_now(f"backend {forced!r} cannot run {op}: {reason}")
        tried.append(f"{backend}: {reason}")
    return _refuse_now(f"no backend can run {op} on {device.type}: " + "; ".join(tried))


def call(op: str, device: torch.device, *args, **kwargs):
    """Run ``op`` on the selected backend."""
    if torch.compiler.is_compiling():
        name = _select_traced(op, device, args, kwargs)
    else:
        name = select(op, device, *args, **kwargs)[0]
    return _ops[name][op].fn(*args, **kwargs)
