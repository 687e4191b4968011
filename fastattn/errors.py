"""fastattn's exception types.

fastattn checks its arguments up front and names the bad one. Its errors derive from the type
fastattn has always raised (ValueError for a bad value, TypeError for a bad type) *and* from the
type torch raises in the same situation, so code written against torch's modules keeps working:

- ``ArgumentError(ValueError, RuntimeError)``: a bad shape, device or value where torch's SDPA /
  MultiheadAttention raises RuntimeError (e.g. query with fewer than 2 dims, masks that do not
  broadcast, tensors on different devices, a 2-D attn_mask of the wrong size).
- ``ArgumentTypeError(TypeError, RuntimeError)``: a bad dtype where torch raises RuntimeError
  (query, key and value of different dtypes, an integer mask, an unsupported tensor subclass).
- ``ShapeAssertionError(ValueError, AssertionError)``: MultiheadAttention's input checks, where
  torch raises AssertionError (``_mha_shape_check``: query not 2-D/3-D, key or value of another
  rank, masks of the wrong rank, a wrong embedding width, key and value of different shapes).
- ``TypeAssertionError(TypeError, AssertionError)``: MultiheadAttention masks that are neither
  bool nor floating (torch: AssertionError) and nested inputs (torch: AssertionError outside its
  fast path).
- ``NotScriptableError(RuntimeError)``: ``torch.jit.script`` of a fastattn.nn module (TorchScript
  cannot compile the Python dispatch; torch.compile and torch.export work).
- ``DoubleBackwardError(RuntimeError)``: a second derivative (``create_graph=True``) through a
  fused kernel whose backward is not itself differentiable; torch's fused attention kernels raise
  RuntimeError the same way. fastattn never returns a silent zero or None instead.

``except ValueError``, ``except TypeError``, ``except RuntimeError`` and ``except AssertionError``
each catch what they caught with torch's modules (and with earlier fastattn).
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "DoubleBackwardError",
    "NotScriptableError",
    "ShapeAssertionError",
    "TypeAssertionError",
]


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value or shape (a ValueError, and a RuntimeError as torch raises)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A bad argument dtype or tensor type (a TypeError, and a RuntimeError as torch raises)."""


class ShapeAssertionError(ValueError, AssertionError):
    """A MultiheadAttention input of the wrong rank or width (a ValueError, and an AssertionError
    as torch's ``_mha_shape_check`` raises)."""


class TypeAssertionError(TypeError, AssertionError):
    """A MultiheadAttention mask that is neither bool nor floating, or a nested input (a TypeError,
    and an AssertionError as torch raises)."""


class DoubleBackwardError(RuntimeError):
    """A backward run with ``create_graph=True`` through a kernel that has no double backward."""


class NotScriptableError(RuntimeError):
    """torch.jit.script of a fastattn.nn module: use torch.compile or torch.export instead."""
