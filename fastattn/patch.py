"""``fastattn.patch(model)`` / ``fastattn.unpatch(model)``: swap torch modules for their fastattn
twins in an existing model, in place.

A twin subclasses the torch class and adds no state, so the swap is an assignment of
``module.__class__``: the very same Parameter and buffer objects stay, state_dict keys do not
change, optimizers built before the patch keep working, hooks stay registered. Swapped: exactly
the classes in ``fastattn.nn.TORCH_TWINS`` (MultiheadAttention, the Transformer family, LayerNorm,
RMSNorm, Softmax). Left alone, and reported: user subclasses of those (their forward may differ)
and modules already fastattn's. A Hugging Face ``PreTrainedModel`` additionally gets
``attn_implementation="fastattn"`` (see ``fastattn.integrations.huggingface``); unpatch restores
its previous implementation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

__all__ = ["PatchReport", "patch", "unpatch"]

_PREVIOUS_ATTN = "_fastattn_previous_attn_implementation"


@dataclass
class PatchReport:
    """What ``patch`` / ``unpatch`` changed: ``swapped`` and ``skipped`` lists of (module name, reason)."""

    swapped: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastattn: {len(self.swapped)} swapped, {len(self.skipped)} skipped"]
        lines += [f"  swapped  {name or '<root>'}: {what}" for name, what in self.swapped]
        lines += [f"  skipped  {name or '<root>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def patch(model: torch.nn.Module) -> PatchReport:
    """Swap, in place, every torch module of ``model`` (itself included) that has a fastattn twin.

    Returns a ``PatchReport`` (print it for a summary). The model computes the same function
    (within the numerics rule) and trains as before.
    """
    from fastattn.nn import TORCH_TWINS

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    twins = set(TORCH_TWINS.values())
    for name, module in model.named_modules():
        kind = type(module)
        if kind in TORCH_TWINS:
            module.__class__ = TORCH_TWINS[kind]
            report.swapped.append((name, f"{_qualname(kind)} -> {_qualname(module.__class__)}"))
        elif kind in twins:
            report.skipped.append((name, f"already {_qualname(kind)}"))
        else:
            base = next((torch_cls for torch_cls in TORCH_TWINS if isinstance(module, torch_cls)), None)
            if base is not None:
                report.skipped.append(
                    (name, f"{_qualname(kind)} subclasses {_qualname(base)} and may override forward; left as is")
                )
    _patch_hugging_face(model, report)
    return report


def unpatch(model: torch.nn.Module) -> PatchReport:
    """Give every fastattn twin in ``model`` its torch class back (the inverse of ``patch``)."""
    from fastattn.nn import TORCH_TWINS

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    torch_of = {twin: torch_cls for torch_cls, twin in TORCH_TWINS.items()}
    report = PatchReport()
    for name, module in model.named_modules():
        kind = type(module)
        if kind in torch_of:
            module.__class__ = torch_of[kind]
            report.swapped.append((name, f"{_qualname(kind)} -> {_qualname(module.__class__)}"))
    _unpatch_hugging_face(model, report)
    return report


# --------------------------------------------------------------------------------------------
# Hugging Face models: switch the attention implementation (never imports transformers itself)
# --------------------------------------------------------------------------------------------


def _outermost_hf_models(model: torch.nn.Module):
    """(name, module) of each transformers PreTrainedModel not nested in another one."""
    transformers = sys.modules.get("transformers")
    if transformers is None:  # a model built with transformers has imported it
        return []
    base = transformers.PreTrainedModel
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, base) and not any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            found.append((name, module))
    return found


def _set_attn_implementation(module, implementation: str) -> None:
    if hasattr(module, "set_attn_implementation"):  # transformers >= 4.53
        module.set_attn_implementation(implementation)
    else:  # older: the config field is read at every forward
        module.config._attn_implementation = implementation


def _patch_hugging_face(model: torch.nn.Module, report: PatchReport) -> None:
    for name, module in _outermost_hf_models(model):
        previous = getattr(module.config, "_attn_implementation", None)
        try:
            from fastattn.integrations import huggingface

            implementation = huggingface.register()
            if previous != implementation:
                _set_attn_implementation(module, implementation)
                setattr(module, _PREVIOUS_ATTN, previous)
        except Exception as exc:  # an old transformers, a model that refuses custom attention ...
            report.skipped.append((name, f"attn_implementation left {previous!r}: {type(exc).__name__}: {exc}"))
            continue
        report.swapped.append((name, f"attn_implementation {previous!r} -> {implementation!r}"))


def _unpatch_hugging_face(model: torch.nn.Module, report: PatchReport) -> None:
    for name, module in _outermost_hf_models(model):
        previous = module.__dict__.pop(_PREVIOUS_ATTN, None)
        if previous is not None:
            _set_attn_implementation(module, previous)
            report.swapped.append((name, f"attn_implementation -> {previous!r}"))
