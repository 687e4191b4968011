"""Drop-in ``nn.Module`` replacements that run through ``fastattn.functional``.

Every twin subclasses the torch module it replaces and adds no state, so constructor arguments,
parameters, state_dict keys and forward signatures are torch's: ``load_state_dict`` from a torch
model just works, and ``fastattn.patch`` can swap an existing module's class in place.

Modules never pick a kernel themselves: the dispatch does, per call (``fastattn.use_backend`` or
``FASTATTN_BACKEND`` to force one). Calls no kernel serves (float64, a CPU tensor without the
extension, ...) run on the ``reference`` backend under automatic selection.
"""

import torch

from fastattn.errors import NotScriptableError
from fastattn.nn.attention import MultiheadAttention
from fastattn.nn.layers import FeedForward, LayerNorm, RMSNorm, Softmax
from fastattn.nn.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

# torch class -> its fastattn twin (a subclass with no extra state; ``fastattn.patch`` swaps these).
TORCH_TWINS: dict[type, type] = {
    torch.nn.MultiheadAttention: MultiheadAttention,
    torch.nn.TransformerEncoderLayer: TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer: TransformerDecoderLayer,
    torch.nn.TransformerEncoder: TransformerEncoder,
    torch.nn.TransformerDecoder: TransformerDecoder,
    torch.nn.Transformer: Transformer,
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.Softmax: Softmax,
}



def _not_scriptable(self):
    """torch.jit.script calls this hook on every module it scripts (submodules included)."""
    cls = type(self)
    if cls.__module__.startswith("fastattn."):
        name = f"fastattn.nn.{cls.__name__}"
    else:  # a user's subclass: name it, and the fastattn.nn class it derives from
        base = next(c for c in cls.__mro__ if c.__module__.startswith("fastattn."))
        name = f"{cls.__module__}.{cls.__qualname__} (a subclass of fastattn.nn.{base.__name__})"
    raise NotScriptableError(
        f"{name} is not scriptable with torch.jit.script: its forward calls "
        "fastattn's kernels through Python dispatch (backend selection, torch.library custom ops with "
        "Python autograd), which TorchScript cannot compile. Use torch.compile(module) or "
        "torch.export.export(module, args) instead (both work), or script the torch.nn module it replaces."
    )


for _cls in (*TORCH_TWINS.values(), FeedForward):
    _cls.__prepare_scriptable__ = _not_scriptable
del _cls

__all__ = [
    "TORCH_TWINS",
    "FeedForward",
    "LayerNorm",
    "MultiheadAttention",
    "RMSNorm",
    "Softmax",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]
