"""Triton kernels, one file per family. Each file exposes ``KERNELS``: op family -> provider
(the protocols of fastattn/ops/<family>.py)."""

import importlib
import os

FAMILIES = ("attention", "softmax", "ffn", "norm")


def unavailable_reason(backend: str = "triton", device_type: str | None = None) -> str | None:
    """Why the triton backend cannot run here (on ``device_type``), or None."""
    import torch

    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type == "cpu" and not interpreting:
        return "triton runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1)"
    if device_type is None and not (torch.cuda.is_available() or interpreting):
        return "no CUDA device, and TRITON_INTERPRET is not set"
    if device_type not in (None, "cpu", "cuda"):
        return f"triton does not run on {device_type} tensors"
    return None


def load_kernels(backend: str = "triton"):
    """Collect the providers of every family file present (a missing file removes only its ops)."""
    import triton  # noqa: F401  (fails here, with its own message, when Triton is missing)

    kernels = {}
    for family in FAMILIES:
        try:
            module = importlib.import_module(f"fastattn.triton.{family}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fastattn.triton.{family}":
                raise
            continue
        kernels.update(module.KERNELS)
    return kernels
