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
