"""Triton kernels, one file per family. Each file exposes ``OPS``: op name -> dispatch.Op."""

import importlib

FAMILIES = ("attention", "softmax", "ffn", "norm")


def load_ops(backend: str = "triton"):
    """Collect the ops of every family file present (a missing file removes only its ops)."""
    import triton  # noqa: F401  (fails here, with its own message, when Triton is missing)

    ops = {}
    for family in FAMILIES:
        try:
            module = importlib.import_module(f"fastattn.triton.{family}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fastattn.triton.{family}":
                raise
            continue
        ops.update(module.OPS)
    return ops
