"""Where PyTorch's own test suites (test/nn/test_multihead_attention.py, test/test_transformers.py)
found fastattn behaving differently from torch (issue 16 items 1, 2, 6 and 7):

- torch.nn.attention.bias.CausalBias (causal_upper_left / causal_lower_right) as attn_mask, in
  scaled_dot_product_attention and MultiheadAttention, against the float64 oracle with an
  explicit mask; other tensor subclasses refused with an error naming attn_mask;
- MultiheadAttention's is_causal hint (need_weights=False, no key padding): attn_mask is only a
  hint, its size is not checked, as in torch;
- the exception types: catchable as the AssertionError / RuntimeError torch raises, and as the
  ValueError / TypeError fastattn raised before;
- torch.jit.script refuses the modules with a clear error; torch.export and torch.compile work.
"""

from __future__ import annotations

import pytest
import torch
from helpers import backend_params
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fastattn
import fastattn.nn as fnn
from fastattn import errors, reference

BACKENDS = [pytest.param("auto", id="auto"), *backend_params("triton", "cpu", "reference")]


def _forced(backend, fn):
    if backend == "auto":
        return fn()
    with fastattn.use_backend(backend):
        return fn()


def _keep_mask(n_q, n_k, variant):
    """The oracle's bool mask (True = attend), written out element by element."""
    offset = n_k - n_q if variant == "lower_right" else 0
    return torch.tensor([[j <= i + offset for j in range(n_k)] for i in range(n_q)])


# --------------------------------------------------------------------------------------------
# item 1: CausalBias as attn_mask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_q, n_k", [(6, 6), (5, 11), (11, 5)])
@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_sdpa_causal_bias_matches_oracle(backend, variant, n_q, n_k):
    make = causal_upper_left if variant == "upper_left" else causal_lower_right
    q = torch.randn(2, 2, n_q, 16, requires_grad=True)
    k = torch.randn(2, 2, n_k, 16, requires_grad=True)
    v = torch.randn(2, 2, n_k, 16, requires_grad=True)
    with pytest.warns(UserWarning) if variant == "lower_right" and n_q > n_k else _no_warning():
        bias = make(n_q, n_k)
    out = _forced(backend, lambda: fastattn.scaled_dot_product_attention(q, k, v, bias))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    oracle = reference.attention(*leaves, attn_mask=_keep_mask(n_q, n_k, variant))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), oracle, atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(oracle, leaves, dout.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=5e-5, rtol=5e-5)
    if not (variant == "lower_right" and n_q > n_k):  # torch gives NaN rows there, fastattn zeros
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, make(n_q, n_k))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_sdpa_causal_bias_unbatched_and_extra_batch_dims():
    q, k, v = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    out = fastattn.scaled_dot_product_attention(q, k, v, causal_lower_right(4, 7))
    torch.testing.assert_close(out, reference.attention(q, k, v, attn_mask=_keep_mask(4, 7, "lower_right")))
    out = fastattn.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0], causal_upper_left(4, 7))
    torch.testing.assert_close(out, reference.attention(q[0, 0], k[0, 0], v[0, 0], is_causal=True))


def test_sdpa_causal_bias_errors():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="CausalBias and is_causal"):  # torch raises ValueError too
        fastattn.scaled_dot_product_attention(q, k, v, causal_upper_left(4, 6), is_causal=True)
    with pytest.raises(RuntimeError, match=r"attn_mask is a CausalBias for .* \(5, 6\)"):
        fastattn.scaled_dot_product_attention(q, k, v, causal_lower_right(5, 6))


class _OtherSubclass(torch.Tensor):
    pass


def test_sdpa_refuses_other_tensor_subclasses_and_accepts_parameters():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.randn(4, 6)
    with pytest.raises(TypeError, match="attn_mask is a .*_OtherSubclass"):
        fastattn.scaled_dot_product_attention(q, k, v, mask.as_subclass(_OtherSubclass))
    with pytest.raises(RuntimeError, match="attn_mask"):
        fastattn.scaled_dot_product_attention(q, k, v, mask.as_subclass(_OtherSubclass))
    param = torch.nn.Parameter(mask.clone(), requires_grad=False)
    torch.testing.assert_close(
        fastattn.scaled_dot_product_attention(q, k, v, param), reference.attention(q, k, v, attn_mask=mask)
    )


def test_sdpa_compiled_with_plain_mask_and_causal_bias():
    """torch.compile passes FakeTensor/FunctionalTensor masks: still accepted; CausalBias too."""
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.randn(4, 6)
    compiled = torch.compile(fastattn.scaled_dot_product_attention, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), reference.attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(compiled(q, k, v, causal_upper_left(4, 6)), reference.attention(q, k, v, is_causal=True))
    torch.testing.assert_close(
        compiled(q, k, v, causal_lower_right(4, 6)),
        reference.attention(q, k, v, attn_mask=_keep_mask(4, 6, "lower_right")),
    )


def test_encoder_with_causal_bias_mask_matches_the_causal_hint():
    encoder = fnn.TransformerEncoder(
        fnn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False
    )
    x = torch.randn(2, 5, 16)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)
    torch.testing.assert_close(encoder(x, mask=causal_upper_left(5, 5)), encoder(x, mask=causal, is_causal=True))


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("variant, length, src", [("upper_left", 5, 5), ("upper_left", 4, 7), ("lower_right", 4, 7)])
def test_mha_causal_bias_matches_torch_with_explicit_mask(variant, length, src, need_weights):
    make = causal_upper_left if variant == "upper_left" else causal_lower_right
    torch_mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).double()
    fast = fnn.MultiheadAttention(16, 2, batch_first=True).double()
    fast.load_state_dict(torch_mha.state_dict())
    x, mem = torch.randn(2, length, 16, dtype=torch.float64), torch.randn(2, src, 16, dtype=torch.float64)
    masked_out = ~_keep_mask(length, src, variant)
    want, want_w = torch_mha(x, mem, mem, attn_mask=masked_out, need_weights=need_weights)
    got, got_w = fast(x, mem, mem, attn_mask=make(length, src), need_weights=need_weights)
    torch.testing.assert_close(got, want)
    if need_weights:
        torch.testing.assert_close(got_w, want_w)
    with pytest.raises(TypeError, match="attn_mask"):
        fast(x, mem, mem, attn_mask=masked_out.as_subclass(_OtherSubclass))


# --------------------------------------------------------------------------------------------
# item 2: MultiheadAttention's is_causal hint
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hint", ["square-float", "wrong-size-bool", "wrong-size-3d"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_is_causal_hint_is_not_size_checked(hint, batch_first):
    """need_weights=False, no key padding: torch replaces attn_mask by the causal flag without
    looking at its size; fastattn gives torch's result (and no error)."""
    length = 5
    torch_mha = torch.nn.MultiheadAttention(16, 2, batch_first=batch_first).double()
    fast = fnn.MultiheadAttention(16, 2, batch_first=batch_first).double()
    fast.load_state_dict(torch_mha.state_dict())
    x = torch.randn(3, length, 16, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    mask = {
        "square-float": torch.nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64),
        "wrong-size-bool": torch.zeros(2, 2, dtype=torch.bool),
        "wrong-size-3d": torch.zeros(1, 3, 3),
    }[hint]
    want, _ = torch_mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    got, weights = fast(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    assert weights is None
    torch.testing.assert_close(got, want)
    # the hint is a causal mask: compare with the explicit one on the need_weights path too
    causal = torch.nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
    torch.testing.assert_close(got, fast(x, x, x, attn_mask=causal, need_weights=True)[0])


def test_mha_is_causal_hint_still_checks_rank_and_dtype_and_size_when_used():
    fast = fnn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises(AssertionError, match="2-D or 3-D"):
        fast(x, x, x, attn_mask=torch.zeros(5), is_causal=True, need_weights=False)
    with pytest.raises(AssertionError, match="only bool and floating"):
        fast(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64), is_causal=True, need_weights=False)
    # with a key padding mask (or need_weights) the mask is applied, so its size must be right
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="attn_mask"):
        fast(x, x, x, attn_mask=torch.zeros(2, 2), key_padding_mask=kpm, is_causal=True, need_weights=False)
    with pytest.raises(RuntimeError, match="attn_mask"):
        fast(x, x, x, attn_mask=torch.zeros(2, 2), is_causal=True, need_weights=True)


def test_train_with_is_causal_as_torch():
    """torch's test_train_with_is_causal on fastattn's modules: training with mask + is_causal,
    inference with a (1, 1) mask as hint, and is_causal without a mask raising RuntimeError."""
    torch_layer = torch.nn.TransformerEncoderLayer(2, 1, 4, dropout=0.0, activation="gelu", batch_first=True)
    layer = fnn.TransformerEncoderLayer(2, 1, 4, dropout=0.0, activation="gelu", batch_first=True)
    layer.load_state_dict(torch_layer.state_dict())
    encoder = fnn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    torch_encoder = torch.nn.TransformerEncoder(torch_layer, 2, enable_nested_tensor=False)
    inputs = torch.randn(1, 2, 2)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(2)
    out = encoder(inputs, mask=mask, is_causal=True)
    torch.testing.assert_close(out, torch_encoder(inputs, mask=mask, is_causal=True), atol=1e-5, rtol=1e-5)
    torch.nn.functional.mse_loss(out, inputs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())

    mha = fnn.MultiheadAttention(2, 1)
    t_qvk = torch.randn(1, 2, 2)
    mha(t_qvk, t_qvk, t_qvk, attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(1), is_causal=True)
    with pytest.raises(RuntimeError, match="is_causal"):
        mha(t_qvk, t_qvk, t_qvk, is_causal=True)


# --------------------------------------------------------------------------------------------
# item 6: exception types catchable as torch's
# --------------------------------------------------------------------------------------------


def _mha_invalid_shape_cases():
    """torch's _test_multihead_attn_invalid_shape_impl: (query, key, value, kwargs, message)."""
    q3, q2 = torch.randn(4, 4, 4), torch.randn(4, 4)
    kpm1 = torch.tensor([False, False, True, True])
    return [
        ("3d-key-2d", (q3, torch.randn(4, 4), q3), {}, "expected `key` and `value` to be 3-D but found 2-D and 3-D"),
        ("3d-value-2d", (q3, q3, torch.randn(4, 4)), {}, "expected `key` and `value` to be 3-D but found 3-D and 2-D"),
        ("3d-kpm-1d", (q3, q3, q3), {"key_padding_mask": kpm1}, "expected `key_padding_mask` to be `None` or 2-D"),
        ("3d-mask-1d", (q3, q3, q3), {"attn_mask": kpm1}, "expected `attn_mask` to be `None`, 2-D or 3-D"),
        ("2d-key-3d", (q2, q3, q2), {}, "expected `key` and `value` to be 2-D but found 3-D and 2-D"),
        ("2d-value-3d", (q2, q2, q3), {}, "expected `key` and `value` to be 2-D but found 2-D and 3-D"),
        ("2d-kpm-2d", (q2, q2, q2), {"key_padding_mask": kpm1.repeat(2)[None]}, "to be `None` or 1-D but found 2-D"),
        ("2d-mask-1d", (q2, q2, q2), {"attn_mask": kpm1}, "expected `attn_mask` to be `None`, 2-D or 3-D"),
        ("2d-mask-3d-wrong", (q2, q2, q2), {"attn_mask": torch.zeros(5, 4, 4, dtype=torch.bool)},
         r"Expected `attn_mask` shape to be \(4, 4, 4\)"),
    ]


@pytest.mark.parametrize("case", _mha_invalid_shape_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("mode", ["train", "eval-no-grad"])
def test_mha_invalid_shapes_raise_assertion_error_as_torch(case, mode):
    _, args, kwargs, message = case
    torch_mha, fast = torch.nn.MultiheadAttention(4, 4), fnn.MultiheadAttention(4, 4)
    if mode != "train":
        torch_mha.eval(), fast.eval()
    with torch.no_grad() if mode != "train" else torch.enable_grad():
        with pytest.raises(AssertionError, match=message):
            torch_mha(*args, **kwargs)
        with pytest.raises(AssertionError, match=message):
            fast(*args, **kwargs)
        with pytest.raises(ValueError, match=message):  # still the ValueError fastattn raised before
            fast(*args, **kwargs)


def test_mha_other_errors_are_catchable_as_torch_and_as_before():
    mha = fnn.MultiheadAttention(8, 2)
    x = torch.randn(5, 2, 8)
    with pytest.raises(AssertionError, match="only bool and floating types of attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(AssertionError, match="NestedTensor"):
        nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(4, 8)])
        mha(nested, nested, nested)
    with pytest.raises(RuntimeError, match="attn_mask"):  # torch: "The shape of the 2D attn_mask is ..."
        mha(x, x, x, attn_mask=torch.zeros(5, 6))
    with pytest.raises(RuntimeError, match="Need attn_mask|is_causal"):
        mha(x, x, x, is_causal=True)
    with pytest.raises(AssertionError, match="last dim"):  # torch: "was expecting embedding dimension"
        mha(torch.randn(5, 2, 9), x, x)


def _sdpa_bad_calls():
    """torch's TestSDPAFailureModes cases that run on the CPU: each raises RuntimeError in torch."""
    shape = (1, 4, 8, 16)
    q = torch.randn(shape)
    return [
        ("different-dtypes", (q, torch.randn(shape).half(), torch.randn(shape).half()), {}, TypeError),
        ("1-dimensional", (torch.randn(4).half(), torch.randn(1, 4).half(), torch.randn(1, 4).half()), {}, ValueError),
        ("different-devices", (q, torch.randn(shape, device="meta"), torch.randn(shape, device="meta")), {}, ValueError),
        ("mask-does-not-broadcast", (q, q, q), {"attn_mask": torch.zeros(3, 8, 8)}, ValueError),
        ("int-mask", (q, q, q), {"attn_mask": torch.zeros(8, 8, dtype=torch.int32)}, TypeError),
        ("head-dims", (q, q[..., :8], q), {}, ValueError),
        ("heads-without-gqa", (q, q[:, :2], q[:, :2]), {}, ValueError),
        ("int-query", (q.int(), q, q), {}, TypeError),
    ]


@pytest.mark.parametrize("case", _sdpa_bad_calls(), ids=lambda c: c[0])
def test_sdpa_bad_inputs_raise_runtime_error_as_torch(case):
    _, args, kwargs, before = case
    with pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)
    with pytest.raises(RuntimeError) as info:
        fastattn.scaled_dot_product_attention(*args, **kwargs)
    assert isinstance(info.value, before)  # and still the type fastattn raised before
    assert isinstance(info.value, (errors.ArgumentError, errors.ArgumentTypeError))


def test_sdpa_explicit_mask_with_is_causal_applies_both():
    """A documented superset of torch (whose fused kernels raise for this, and whose docs say it
    errors): both the mask and the causal mask apply."""
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.rand(5, 5) > 0.3
    mask |= torch.eye(5, dtype=torch.bool)
    got = fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=True)
    torch.testing.assert_close(got, reference.attention(q, k, v, attn_mask=mask & _keep_mask(5, 5, "upper_left")))


# --------------------------------------------------------------------------------------------
# item 7: torch.jit.script refused clearly; torch.export and torch.compile work
# --------------------------------------------------------------------------------------------


def _modules():
    mha = fnn.MultiheadAttention(16, 2, batch_first=True)
    layer = fnn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return {"mha": mha, "encoder_layer": layer}


def _call(name, module, x):
    if name == "mha":
        return module(x, x, x, need_weights=False)[0]
    return module(x)


@pytest.mark.parametrize("name", ["mha", "encoder_layer"])
def test_jit_script_raises_a_clear_error(name):
    module = _modules()[name].eval()
    with pytest.raises(RuntimeError, match="not scriptable.*torch.compile.*torch.export"):
        torch.jit.script(module)


def test_jit_script_error_names_a_user_subclass():
    class MyLayer(fnn.TransformerEncoderLayer):
        pass

    subclass = r"\.MyLayer \(a subclass of fastattn\.nn\.TransformerEncoderLayer\) is not scriptable"
    with pytest.raises(RuntimeError, match=subclass):
        torch.jit.script(MyLayer(16, 2, 32, batch_first=True))
    with pytest.raises(RuntimeError, match=r"^fastattn\.nn\.MultiheadAttention is not scriptable"):
        torch.jit.script(fnn.MultiheadAttention(16, 2))


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("name", ["mha", "encoder_layer"])
def test_torch_export_runs_the_module(name, strict):
    """Exported with masks as inputs: they reach fastattn as FakeTensor / FunctionalTensor."""
    module = _modules()[name].eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, x, padding, mask):
            if name == "mha":
                return self.inner(x, x, x, key_padding_mask=padding, attn_mask=mask, need_weights=False)[0]
            return self.inner(x, src_mask=mask, src_key_padding_mask=padding)

    def inputs():
        padding = torch.zeros(2, 5, dtype=torch.bool)
        padding[1, 3:] = True
        return torch.randn(2, 5, 16), padding, torch.randn(5, 5)

    with torch.no_grad():
        exported = torch.export.export(Wrapper(), inputs(), strict=strict)
        args = inputs()
        torch.testing.assert_close(exported.module()(*args), Wrapper()(*args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mha", "encoder_layer"])
def test_torch_compile_runs_the_module_forward_and_backward(name):
    module = _modules()[name]
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    want = _call(name, module, x)
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    got = _call(name, compiled, x)
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)
