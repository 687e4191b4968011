"""The C++/CUDA extension ``fastattn._C`` as dispatch backends ``cpu`` and ``cuda``.

The extension registers its ops with TORCH_LIBRARY (schemas in csrc/fastattn.cpp, kernels per
dispatch key); this file adds their fake (meta) implementations and autograd, and maps them to the
dispatch's canonical op arguments (see fastattn/functional.py).
"""

from __future__ import annotations

import torch

_import_error: str | None = None
try:
    from fastattn import _C  # noqa: F401  (loading it registers torch.ops.fastattn.*)
except ImportError as exc:  # not built, or built against another torch
    _import_error = (
        f"the extension fastattn._C is not built or does not load ({exc}); "
        "build it with `pip install --no-build-isolation -e .`"
    )


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


def load_ops(backend: str):
    """op name -> dispatch.Op for the extension's ``backend`` ("cpu" or "cuda")."""
    if _import_error is not None:
        raise ImportError(_import_error)
    return {}
