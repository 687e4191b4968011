"""``MultiheadAttention``: torch.nn.MultiheadAttention with its attention run by fastattn.

Same constructor, parameters (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
``out_proj``, ``bias_k``, ``bias_v``), state_dict keys and forward signature as torch's: it is a
subclass that only replaces ``forward``.

Two paths, as in torch:
- ``need_weights=False``: ``fastattn.scaled_dot_product_attention`` on head views of the projected
  inputs; the masks are merged into one (N, H, L, S)-broadcastable mask that is never expanded
  over heads, and nothing of size L·S is stored when there is no mask.
- ``need_weights=True`` (torch's default): the weights are returned, so they are computed: the
  scores Q·Kᵀ are materialised (O(N·H·L·S) memory), normalised by ``fastattn.softmax`` with the
  masks fused in, dropped out, and multiplied by V. Pass ``need_weights=False`` for speed.

Differences from torch, both deliberate: a query row whose keys are all masked gives zeros (torch
gives NaN), and there is no nested-tensor fast path (pad and pass ``key_padding_mask``).

Also accepted: ``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right`` as attn_mask.
Errors are fastattn.errors types, catchable as torch's (AssertionError for the shape checks,
RuntimeError for the rest) and as the ValueError/TypeError fastattn raised before. Not scriptable
with torch.jit.script (NotScriptableError); torch.compile and torch.export work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastattn import functional
from fastattn.errors import ArgumentError, ShapeAssertionError, TypeAssertionError

__all__ = ["MultiheadAttention"]


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in ``torch.nn.MultiheadAttention`` (see the module docstring for the two paths)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shapes and mask conventions are torch's: query (L, N, E), (N, L, E) with batch_first, or
        (L, E) unbatched; bool masks are True = *not* allowed to attend, float masks are added;
        attn_mask (L, S) or (N·num_heads, L, S); key_padding_mask (N, S) (or (S,) unbatched).

        ``is_causal`` is torch's hint that ``attn_mask`` is the causal mask (it requires attn_mask).
        As in torch, with ``need_weights=False`` and no ``key_padding_mask`` the hint replaces the
        mask: attn_mask is then only checked to be a bool/float tensor of 2 or 3 dims, and a causal
        mask is applied instead. Otherwise the mask itself is applied (``is_causal`` only hints).

        ``attn_mask`` may be ``torch.nn.attention.bias.causal_upper_left(L, S)`` (top-left causal)
        or ``causal_lower_right(L, S)`` (bottom-right aligned: query i attends keys j <= i + S - L);
        other torch.Tensor subclasses are refused.

        Bad arguments raise fastattn.errors types that are both the ValueError/TypeError fastattn
        raised before and the AssertionError/RuntimeError torch raises in the same case."""
        batched, tgt_len, src_len = self._check_inputs(query, key, value)
        attn_mask, is_causal = _resolve_causal_bias(attn_mask, is_causal, tgt_len, src_len, query.device)
        if is_causal and attn_mask is None:
            raise ArgumentError(
                "is_causal=True needs attn_mask too (torch's hint that attn_mask is causal); build it with "
                "torch.nn.Transformer.generate_square_subsequent_mask"
            )
        # torch's rule: the hint replaces the mask only when no key padding is merged in and no weights are returned
        causal_flag = bool(is_causal) and key_padding_mask is None and not need_weights
        self._check_masks(query, key_padding_mask, attn_mask, batched, tgt_len, src_len, hint_only=causal_flag)
        if causal_flag:
            attn_mask = None

        seq_first = not batched or not self.batch_first  # unbatched inputs act as (L, 1, E)
        if not batched:
            query, key, value = _unsqueeze_batch(query, key, value)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        n = query.size(1 if seq_first else 0)

        q, k, v = self._in_projection(query, key, value)
        k, v = self._append_bias_kv(k, v, seq_first)
        q, k, v = (_split_heads(t, self.num_heads, seq_first) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros((*k.shape[:2], 1, k.size(-1)))
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        extra_keys = k.size(2) - key.size(0 if seq_first else 1)
        mask = _merge_masks(attn_mask, key_padding_mask, n, self.num_heads, extra_keys)

        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = _attention_with_weights(q, k, v, mask, dropout_p)
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        else:
            out = functional.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal=causal_flag)
            weights = None
        out = F.linear(_merge_heads(out, seq_first), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(1)
        return out, weights

    # ----------------------------------------------------------------------------------------

    def _check_inputs(self, query, key, value) -> tuple[bool, int, int]:
        """Torch's rules for query, key and value (errors name the argument and are catchable as
        torch's AssertionError); returns (batched, L, S)."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise TypeAssertionError(
                    f"{name} is a nested tensor; fastattn's MultiheadAttention does not support NestedTensor: "
                    "pass padded tensors with key_padding_mask"
                )
        if query.dim() not in (2, 3):
            raise ShapeAssertionError(
                f"query must be 2-D (unbatched) or 3-D (batched), got a {query.dim()}-D query of shape {tuple(query.shape)}"
            )
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            kind = "batched (3-D)" if batched else "unbatched (2-D)"
            raise ShapeAssertionError(
                f"For {kind} `query`, expected `key` and `value` to be {query.dim()}-D"
                f" but found {key.dim()}-D and {value.dim()}-D tensors respectively"
            )
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.size(-1) != width:
                raise ShapeAssertionError(f"{name}'s last dim must be {width}, got shape {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ShapeAssertionError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in length or batch")
        batch_dim = 0 if self.batch_first else 1
        if batched and query.size(batch_dim) != key.size(batch_dim):
            raise ArgumentError(f"query and key differ in batch size: {tuple(query.shape)} vs {tuple(key.shape)}")
        tgt_len = query.size(1 - batch_dim) if batched else query.size(0)
        src_len = key.size(1 - batch_dim) if batched else key.size(0)
        return batched, tgt_len, src_len

    def _check_masks(self, query, key_padding_mask, attn_mask, batched, tgt_len, src_len, hint_only) -> None:
        """Torch's rules for the masks. With ``hint_only`` (is_causal replaces attn_mask), attn_mask's
        rank and dtype are checked but not its size, as torch does."""
        n = query.size(0 if self.batch_first else 1) if batched else 1
        kind = "batched (3-D)" if batched else "unbatched (2-D)"
        if key_padding_mask is not None:
            _check_mask_dtype("key_padding_mask", key_padding_mask)
            functional.check_plain_mask("key_padding_mask", key_padding_mask)
            expected = (n, src_len) if batched else (src_len,)
            if key_padding_mask.dim() != len(expected):
                raise ShapeAssertionError(
                    f"For {kind} `query`, expected `key_padding_mask` to be `None` or {len(expected)}-D"
                    f" but found {key_padding_mask.dim()}-D tensor instead"
                )
            if tuple(key_padding_mask.shape) != expected:
                raise ArgumentError(f"key_padding_mask must have shape {expected}, got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            _check_mask_dtype("attn_mask", attn_mask)
            if attn_mask.dim() not in (2, 3):
                raise ShapeAssertionError(
                    f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D"
                    f" but found {attn_mask.dim()}-D tensor instead"
                )
            if not batched and attn_mask.dim() == 3:
                expected = (self.num_heads, tgt_len, src_len)
                if tuple(attn_mask.shape) != expected:
                    raise ShapeAssertionError(
                        f"Expected `attn_mask` shape to be {expected} (num_heads, L, S) for an unbatched query, "
                        f"but got {tuple(attn_mask.shape)}"
                    )
            if hint_only:
                return
            allowed = ((tgt_len, src_len), (n * self.num_heads, tgt_len, src_len))
            if tuple(attn_mask.shape) not in allowed:
                raise ArgumentError(
                    f"attn_mask must have shape {allowed[0]} or {allowed[1]} (N·num_heads, L, S), "
                    f"got {tuple(attn_mask.shape)}"
                )

    def _in_projection(self, query, key, value):
        """q, k, v in the inputs' layout; one GEMM for self-attention, two when key is value."""
        bias = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
            return (
                F.linear(query, self.q_proj_weight, b_q),
                F.linear(key, self.k_proj_weight, b_k),
                F.linear(value, self.v_proj_weight, b_v),
            )
        weight, e = self.in_proj_weight, self.embed_dim
        if key is value and query is key:
            return F.linear(query, weight, bias).chunk(3, dim=-1)
        if key is value:
            b_q, b_kv = (None, None) if bias is None else bias.split([e, 2 * e])
            w_q, w_kv = weight.split([e, 2 * e])
            return (F.linear(query, w_q, b_q), *F.linear(key, w_kv, b_kv).chunk(2, dim=-1))
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        w_q, w_k, w_v = weight.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _append_bias_kv(self, k, v, seq_first: bool):
        """add_bias_kv: one learned key/value appended to every sequence."""
        if self.bias_k is None or self.bias_v is None:
            return k, v
        seq_dim = 0 if seq_first else 1
        shape = list(k.shape)
        shape[seq_dim] = 1
        bias_k = self.bias_k.to(k.dtype).expand(shape)  # .to: autocast gives k a lower dtype than the parameter
        bias_v = self.bias_v.to(v.dtype).expand(shape)
        return torch.cat([k, bias_k], dim=seq_dim), torch.cat([v, bias_v], dim=seq_dim)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _unsqueeze_batch(*tensors):
    """(L, E) -> (L, 1, E), keeping ``query is key is value`` so the packed projection still applies."""
    out = []
    for t in tensors:
        same = next((o for src, o in zip(tensors, out) if src is t), None)
        out.append(same if same is not None else t.unsqueeze(1))
    return out


def _check_mask_dtype(name: str, mask) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeAssertionError(
            f"only bool and floating types of {name} are supported: {name} must be bool (True = masked out) "
            f"or floating (added), got {mask.dtype}"
        )


def _resolve_causal_bias(attn_mask, is_causal, tgt_len: int, src_len: int, device):
    """A torch.nn.attention.bias.CausalBias attn_mask as MHA's (L, S) bool mask (True = masked out)
    plus the is_causal hint where it is top-left causal; other tensor subclasses are refused."""
    if attn_mask is None:
        return attn_mask, is_causal
    variant = functional.causal_bias_variant(attn_mask)
    if variant is None:
        functional.check_plain_mask("attn_mask", attn_mask)
        return attn_mask, is_causal
    if is_causal:
        raise ArgumentError(
            "attn_mask is a CausalBias and is_causal=True; CausalBias should not be used with causal=True: "
            "pass only one of them"
        )
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (tgt_len, src_len):
        raise ArgumentError(
            f"attn_mask is a CausalBias for (seq_len_q, seq_len_kv) = ({attn_mask.seq_len_q}, "
            f"{attn_mask.seq_len_kv}) but query and key have lengths ({tgt_len}, {src_len})"
        )
    if variant == "upper_left" or tgt_len == src_len:  # top-left causal: the hint applies
        return torch.ones(tgt_len, src_len, dtype=torch.bool, device=device).triu(1), True
    return ~functional.causal_bias_keep(tgt_len, src_len, device), False


def _split_heads(x: torch.Tensor, num_heads: int, seq_first: bool) -> torch.Tensor:
    """(L, N, E) or (N, L, E) -> (N, H, L, E/H) as a view (fastattn takes any strides)."""
    x = x.unflatten(-1, (num_heads, -1))
    return x.permute(1, 2, 0, 3) if seq_first else x.transpose(1, 2)


def _merge_heads(x: torch.Tensor, seq_first: bool) -> torch.Tensor:
    """(N, H, L, D) -> (L, N, H·D) or (N, L, H·D)."""
    x = x.permute(2, 0, 1, 3) if seq_first else x.transpose(1, 2)
    return x.flatten(-2)


def _pad_keys(mask: torch.Tensor, extra: int) -> torch.Tensor:
    """Columns for the appended bias_k / zero keys: never masked (False, or 0 added)."""
    return F.pad(mask, (0, extra)) if extra else mask


def _merge_masks(attn_mask, key_padding_mask, n: int, num_heads: int, extra_keys: int):
    """torch MHA's masks (bool True = masked out, float added) as one fastattn mask (bool True =
    attend, or float added) that broadcasts to (N, H, L, S); bool stays bool, a float mask turns the
    other into -inf/0 as torch does. Nothing is expanded over heads."""
    masks = []
    if attn_mask is not None:
        if attn_mask.dim() == 3:  # (N·H, L, S) -> (N, H, L, S)
            attn_mask = attn_mask.reshape(n, num_heads, *attn_mask.shape[1:])
        masks.append(_pad_keys(attn_mask, extra_keys))
    if key_padding_mask is not None:
        masks.append(_pad_keys(key_padding_mask, extra_keys)[:, None, None, :])
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        keep = ~masks[0]
        for m in masks[1:]:
            keep = keep & ~m
        return keep
    float_dtype = next(m.dtype for m in masks if m.is_floating_point())
    additive = [
        torch.zeros(m.shape, dtype=float_dtype, device=m.device).masked_fill(m, float("-inf"))
        if m.dtype == torch.bool
        else m
        for m in masks
    ]
    total = additive[0]
    for m in additive[1:]:
        total = total + m
    return total


def _attention_with_weights(q, k, v, mask, dropout_p: float):
    """The need_weights path: materialised scores, fastattn.softmax with the mask fused in, dropout
    on the weights (the returned weights are the dropped ones, as torch's)."""
    scores = q @ k.transpose(-2, -1)
    weights = functional.softmax(scores, -1, scale=1.0 / math.sqrt(q.size(-1)), mask=mask)
    weights = weights.to(scores.dtype)  # float32 under autocast; torch returns the scores' dtype
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights
