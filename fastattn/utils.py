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
