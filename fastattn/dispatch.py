"""Backend registry and selection: the only place that knows which backends exist.

A backend is a module of kernel providers (see fastattn/ops/__init__.py for the protocol): it
exposes ``KERNELS`` (op family -> provider) or ``load_kernels(backend)``, and
``unavailable_reason(device_type)``. Backends load lazily (their modules are imported on first
use), so importing fastattn stays cheap and a missing Triton or an unbuilt extension only removes
that backend.

Selection, from the hashable facts of a call (``fastattn.ops.<family>.<Family>Call``):
- forced (``FASTATTN_BACKEND=<name>`` or ``with fastattn.use_backend(name):``, the context manager
  winning over the environment): that backend or a ``BackendError`` naming it and the reason;
- automatic: the first backend, in the order of measured speed on the call's device type, whose
  provider supports the call. ``reference`` (plain PyTorch) supports everything and comes last.
The choice is cached per (family, forced backend, facts): availability is computed once per
process per (backend, device type), and a call with the facts of an earlier one costs one dict
lookup. ``use_backend`` and ``FASTATTN_BACKEND`` are part of the key, so changing them takes
effect at once; ``refresh()`` forgets everything (after building the extension in-process, say).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")

# Automatic order per device type, fastest first (see benchmarks/results for the measurements).
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

# Where each backend's providers live.
_BACKEND_MODULES = {
    "triton": "fastattn.triton",
    "cuda": "fastattn.ext",
    "cpu": "fastattn.ext",
    "reference": "fastattn.reference",
}


class BackendError(RuntimeError):
    """A forced backend cannot serve a call, or an unknown backend was named."""


_local = threading.local()
# FASTATTN_BACKEND as select() reads it per call: the environment's own dict where os.environ keeps
# one (POSIX: bytes -> bytes, updated by os.environ[...] = ... and putenv through it), else os.environ.
_environ, _ENV_KEY = (os.environ._data, b"FASTATTN_BACKEND") if isinstance(getattr(os.environ, "_data", None), dict) and os.name == "posix" else (os.environ, "FASTATTN_BACKEND")
_lock = threading.RLock()
_providers: dict[str, dict] = {}  # backend -> family -> provider
_modules: dict[str, object] = {}  # backend -> its module
_load_errors: dict[str, str] = {}  # backend -> why it could not be loaded
_unavailable: dict[tuple[str, str | None], str | None] = {}  # (backend, device type) -> reason
_choices: dict[tuple, tuple[str, object] | str] = {}  # (family, forced, facts) -> (backend, provider) or error


def _load(backend: str) -> dict | None:
    """Import a backend's module once; remember why it failed if it did."""
    with _lock:
        if backend in _providers:
            return _providers[backend]
        if backend in _load_errors:
            return None
        try:
            module = importlib.import_module(_BACKEND_MODULES[backend])
            table = module.load_kernels(backend) if hasattr(module, "load_kernels") else module.KERNELS
        except Exception as exc:  # ImportError, a broken extension, a Triton too old ...
            _load_errors[backend] = f"{type(exc).__name__}: {exc}"
            return None
        _modules[backend] = module
        _providers[backend] = table
        return table


def _check_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def backend_unavailable_reason(backend: str, device: torch.device | str | None = None) -> str | None:
    """Why ``backend`` cannot run here (on ``device`` if given), or None if it can."""
    _check_name(backend)
    device_type = torch.device(device).type if device is not None else None
    key = (backend, device_type)
    if key not in _unavailable:
        with _lock:
            if _load(backend) is None:
                reason = _load_errors[backend]
            else:
                reason = _modules[backend].unavailable_reason(backend, device_type)
            _unavailable[key] = reason
    return _unavailable[key]


def backends() -> dict[str, str | None]:
    """Each backend name mapped to None when it can serve here, or the reason it cannot."""
    return {name: backend_unavailable_reason(name) for name in BACKENDS}


def has_kernels(backend: str, family: str) -> bool:
    """Whether ``backend`` loads and provides kernels for ``family``."""
    table = _load(backend)
    return table is not None and family in table


def provider(backend: str, family: str):
    """``backend``'s provider of ``family`` (KeyError if none; the backend must load)."""
    table = _load(backend)
    if table is None:
        raise BackendError(f"backend {backend!r} does not load: {_load_errors[backend]}")
    return table[family]


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


def refresh() -> None:
    """Forget loaded backends, availability and cached choices (they are computed again on use)."""
    with _lock:
        for cache in (_providers, _modules, _load_errors, _unavailable, _choices):
            cache.clear()


def _why_not(backend: str, family: str, call) -> str | None:
    reason = backend_unavailable_reason(backend, call.device_type)
    if reason is not None:
        return reason
    impl = _providers[backend].get(family)
    if impl is None:
        return f"{backend} has no {family} kernel"
    return impl.supports(call)


def _choose(family: str, forced: str | None, call) -> tuple[str, object] | str:
    """(backend, provider), or the BackendError message."""
    if forced is not None:
        reason = _why_not(forced, family, call)
        if reason is not None:
            return f"backend {forced!r} cannot run {family}: {reason}"
        return forced, _providers[forced][family]
    tried = []
    for backend in AUTO_ORDER.get(call.device_type, ("reference",)):
        reason = _why_not(backend, family, call)
        if reason is None:
            return backend, _providers[backend][family]
        tried.append(f"{backend}: {reason}")
    return f"no backend can run {family} on {call.device_type}: " + "; ".join(tried)


def select(family: str, call) -> tuple[str, object]:
    """The backend name and provider that will run ``family`` for a call with these facts."""
    stack = getattr(_local, "stack", None)
    named = stack[-1] if stack else _environ.get(_ENV_KEY)  # the name forced_backend() validates
    choice = _choices.get((family, named, call))
    if choice is None:  # first call with these facts: validate the name, choose, remember
        choice = _choices[(family, named, call)] = _choose(family, forced_backend(), call)
    if choice.__class__ is str:
        raise BackendError(choice)
    return choice


@torch._dynamo.assume_constant_result
def _forced_backend_traced() -> str:
    # Under torch.compile: read once at trace time (the registry's thread-locals stay out of the graph).
    return forced_backend() or ""


@torch._dynamo.assume_constant_result
def _unavailable_traced(backend: str, family: str, device_type: str) -> str:
    # Under torch.compile: imports, locks and the extension's registry run at trace time only.
    reason = backend_unavailable_reason(backend, device_type)
    if reason is None and family not in _providers[backend]:
        reason = f"{backend} has no {family} kernel"
    return reason or ""


@torch._dynamo.assume_constant_result
def _refuse_traced(message: str) -> str:
    # Under torch.compile: raise the BackendError itself at trace time (a raise in traced code would
    # reach the user as dynamo's "Unsupported" with fullgraph=True).
    raise BackendError(message)


def _kernels_traced(family: str, call):
    # The facts may hold symbolic sizes (dynamic=True), so supports() runs in the traced code (as
    # guards); availability, which needs imports and locks, is a trace-time constant. Every
    # candidate's registry is loaded before the first read of _providers: dynamo snapshots the
    # dict when it first reads it.
    forced = _forced_backend_traced()
    order = (forced,) if forced else AUTO_ORDER.get(call.device_type, ("reference",))
    unavailable = [_unavailable_traced(backend, family, call.device_type) for backend in order]
    tried = []
    for backend, unavailable_reason in zip(order, unavailable):
        reason = unavailable_reason or _providers[backend][family].supports(call)
        if not reason:
            return _providers[backend][family]
        if forced:
            return _refuse_traced(f"backend {forced!r} cannot run {family}: {reason}")
        tried.append(f"{backend}: {reason}")
    return _refuse_traced(f"no backend can run {family} on {call.device_type}: " + "; ".join(tried))


def kernels(family: str, call):
    """The provider that runs ``family`` for a call with these facts (select()'s, inlined: this
    runs on every call)."""
    if torch.compiler.is_compiling():
        return _kernels_traced(family, call)
    stack = getattr(_local, "stack", None)
    named = stack[-1] if stack else _environ.get(_ENV_KEY)
    choice = _choices.get((family, named, call))
    if choice.__class__ is tuple:
        return choice[1]
    return select(family, call)[1]
