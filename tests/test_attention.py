"""scaled_dot_product_attention on every backend: outputs and gradients against the float64 oracle
(reference.py) under the numerics rule, torch SDPA parity, masks, GQA, dropout, layouts, errors,
empty inputs, torch.compile, and on a GPU long sequences and linear memory.

Under the Triton interpreter the shapes stay small (N <= ~64, D <= 64 but for one case per big
head dim); the triton backend's interpreter blocks are 32x16 (forward, dQ) and 16x32 (dK/dV), so
these lengths still span several blocks, diagonal blocks and ragged ends.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_rule, backend_params

import fastattn
from fastattn import dispatch, reference
from fastattn.ops import attention as attention_op
from fastattn.ops.attention import AttentionParams, call_facts

BACKENDS = backend_params("triton", "cpu", "cuda", "reference")
LOW = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _forced(backend, fn):
    """fn() with ``backend`` forced. triton and reference must serve every call here; another
    backend that does not (no attention kernel yet, or a declined argument) skips with its reason."""
    with fastattn.use_backend(backend):
        try:
            return fn()
        except fastattn.BackendError as exc:
            if backend in ("triton", "reference"):
                raise
            pytest.skip(str(exc))


def _randn(*shape, dtype=torch.float32, requires_grad=True):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def _qkv(b, h_q, h_kv, n_q, n_k, d, d_v=None, dtype=torch.float32, requires_grad=(True, True, True)):
    d_v = d if d_v is None else d_v
    return (
        _randn(b, h_q, n_q, d, dtype=dtype, requires_grad=requires_grad[0]),
        _randn(b, h_kv, n_k, d, dtype=dtype, requires_grad=requires_grad[1]),
        _randn(b, h_kv, n_k, d_v, dtype=dtype, requires_grad=requires_grad[2]),
    )


def _as_oracle(t):
    """A float64 CPU leaf copy (bool masks stay bool)."""
    if t is None:
        return None
    out = t.detach().cpu()
    out = out.double() if out.is_floating_point() else out
    return out.requires_grad_(t.requires_grad)


def _grads(out, leaves, dout):
    wanted = [t for t in leaves if t.requires_grad]
    return dict(zip([id(t) for t in wanted], torch.autograd.grad(out, wanted, dout)))


def check_against_oracle(backend, leaves, make=None, attn_mask=None, **kwargs):
    """Output and the gradient of every leaf that requires grad, on ``backend``, against the
    float64 oracle with the rule (k=2 output, k=3 gradients; naive = reference in the same dtype).

    ``make(*leaves) -> (q, k, v)`` builds the attention inputs from the leaves (views of one packed
    tensor, say); by default the leaves are q, k, v. Returns (out, grads by leaf index)."""
    make = make or (lambda q, k, v: (q, k, v))

    def run(impl, tensors, mask):
        return impl(*make(*tensors), attn_mask=mask, **kwargs)

    out = _forced(backend, lambda: run(fastattn.scaled_dot_product_attention, leaves, attn_mask))
    naive_leaves = [t.detach().requires_grad_(t.requires_grad) for t in leaves]
    naive = run(reference.attention, naive_leaves, attn_mask)
    oracle_leaves = [_as_oracle(t) for t in leaves]
    oracle = run(reference.attention, oracle_leaves, _as_oracle(attn_mask))

    assert out.dtype == leaves[0].dtype and out.shape == oracle.shape
    assert not out.isnan().any(), "NaN in the output"
    assert_rule(out, naive, oracle, k=2.0, name="output")

    dout = torch.randn_like(out)
    got = _grads(out, leaves, dout)
    ref_naive = _grads(naive, naive_leaves, dout)
    ref = _grads(oracle, oracle_leaves, _as_oracle(dout))
    grads = {}
    for i, (t, tn, to) in enumerate(zip(leaves, naive_leaves, oracle_leaves)):
        if not t.requires_grad:
            continue
        g = got[id(t)]
        assert g.shape == t.shape and g.dtype == t.dtype
        assert_rule(g, ref_naive[id(tn)], ref[id(to)], k=3.0, name=f"grad of input {i}")
        grads[i] = g
    return out, grads


# --------------------------------------------------------------------------------------------
# numerics against the oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_dtypes_cross_attention_odd_lengths(backend, dtype, is_causal):
    check_against_oracle(backend, _qkv(2, 2, 2, 37, 45, 32, dtype=dtype), is_causal=is_causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [16, 40, 64, 80, 96, 128, 160, 192, 256])
def test_head_dims_including_non_powers_of_two(backend, head_dim):
    n_q, n_k = (23, 29) if head_dim <= 128 else (17, 19)  # big head dims: one short case each
    check_against_oracle(backend, _qkv(1, 2, 2, n_q, n_k, head_dim, dtype=torch.float16), is_causal=True)


def test_triton_forward_splits_non_power_of_two_head_dims():
    """The forward computes 64 + 32 columns for d96 (two power-of-two pieces), not 128."""
    pytest.importorskip("triton")
    from fastattn.triton.attention import _head_pieces

    assert {d: _head_pieces(d) for d in (16, 40, 64, 80, 96, 112, 128, 160, 192, 256)} == {
        16: (16, 0), 40: (32, 16), 64: (64, 0), 80: (64, 16), 96: (64, 32), 112: (128, 0),
        128: (128, 0), 160: (128, 32), 192: (128, 64), 256: (256, 0),
    }


@pytest.mark.parametrize("d, d_v", [(80, 96), (96, 40)])
def test_triton_split_head_dims_with_masks_in_the_one_loop_form(triton_one_loop, d, d_v):
    """Split heads (Q·K and P·V in two pieces each) in the ONE_LOOP form, with a key-padding mask
    and a causal diagonal, against the oracle."""
    mask = torch.rand(1, 1, 1, 37, device=DEVICE) > 0.3
    check_against_oracle("triton", _qkv(1, 2, 2, 29, 37, d, d_v, dtype=torch.float16), attn_mask=mask, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d, d_v", [(40, 24), (16, 72)])
def test_value_head_dim_differs(backend, d, d_v):
    check_against_oracle(backend, _qkv(1, 2, 2, 21, 35, d, d_v, dtype=torch.float16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_q, n_k", [(45, 45), (61, 29), (29, 61), (1, 40), (40, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_causal_top_left(backend, n_q, n_k, dtype):
    check_against_oracle(backend, _qkv(1, 2, 2, n_q, n_k, 32, dtype=dtype), is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_kv", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gqa_and_mqa(backend, h_kv, is_causal):
    check_against_oracle(
        backend, _qkv(1, 4, h_kv, 33, 41, 32, dtype=torch.float16), is_causal=is_causal, enable_gqa=True
    )


def _masks(kind, b, h, n_q, n_k, dtype):
    if kind == "bool":
        return torch.rand(b, h, n_q, n_k, device=DEVICE) > 0.3
    if kind == "float":
        return torch.randn(b, h, n_q, n_k, device=DEVICE, dtype=dtype)
    if kind == "float_broadcast_2d":  # (Nq, Nk): the same bias for every batch and head
        return torch.randn(n_q, n_k, device=DEVICE, dtype=dtype)
    if kind == "bool_per_head":  # (1, H, Nq, Nk)
        return torch.rand(1, h, n_q, n_k, device=DEVICE) > 0.5
    if kind == "float_per_key":  # (B, 1, 1, Nk) additive
        return torch.randn(b, 1, 1, n_k, device=DEVICE, dtype=dtype)
    raise ValueError(kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bool", "float", "float_broadcast_2d", "bool_per_head", "float_per_key"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_attn_masks(backend, kind, is_causal):
    dtype = torch.float16
    mask = _masks(kind, 2, 2, 37, 45, dtype)
    check_against_oracle(backend, _qkv(2, 2, 2, 37, 45, 32, dtype=dtype), attn_mask=mask, is_causal=is_causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_key_padding_with_fully_masked_rows(backend, dtype):
    """Key padding (B, 1, 1, Nk) read in place; batch 1 has no key at all, and with is_causal the
    first rows of batch 0 see only padded keys: those rows give 0 and zero gradients, never NaN."""
    b, h, n_q, n_k = 2, 2, 37, 45
    keep = torch.ones(b, 1, 1, n_k, dtype=torch.bool, device=DEVICE)
    keep[0, ..., :7] = False  # rows 0..6 of batch 0 see only masked keys under is_causal
    keep[0, ..., 40:] = False
    keep[1] = False
    leaves = _qkv(b, h, h, n_q, n_k, 32, dtype=dtype)
    out, grads = check_against_oracle(backend, leaves, attn_mask=keep, is_causal=True)
    assert (out[1] == 0).all() and (out[0, :, :7] == 0).all()
    assert (grads[0][1] == 0).all() and (grads[0][0, :, :7] == 0).all()
    assert (grads[1][1] == 0).all() and (grads[2][1] == 0).all()
    assert (grads[1][0, :, 40:] == 0).all() and (grads[2][0, :, 40:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_with_minus_inf_rows(backend):
    mask = torch.randn(2, 2, 37, 45, device=DEVICE)
    mask[:, :, 5] = float("-inf")
    mask[0, 1, :, 3:] = float("-inf")
    out, grads = check_against_oracle(backend, _qkv(2, 2, 2, 37, 45, 32), attn_mask=mask)
    assert (out[:, :, 5] == 0).all() and (grads[0][:, :, 5] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_packed_qkv_views_and_scale(backend, is_causal):
    """q, k, v as transposed views of one (B, N, 3, H, D) projection: strided, never copied; the
    gradient lands in the packed tensor."""
    packed = _randn(2, 41, 3, 2, 40, dtype=torch.float16)

    def split(qkv):
        return tuple(t.transpose(1, 2) for t in qkv.unbind(2))

    assert not split(packed)[0].is_contiguous()
    check_against_oracle(backend, [packed], make=split, is_causal=is_causal, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["q", "k", "v", "kv", "qv"])
def test_partial_requires_grad(backend, which):
    requires = tuple(name in which for name in "qkv")
    leaves = _qkv(1, 4, 2, 29, 35, 32, dtype=torch.float16, requires_grad=requires)
    _, grads = check_against_oracle(backend, leaves, is_causal=True, enable_gqa=True)
    assert sorted(grads) == [i for i, r in enumerate(requires) if r]
    for t, r in zip(leaves, requires):
        assert t.grad is None  # autograd.grad was used; nothing accumulated anywhere
        assert t.requires_grad == r


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_and_extra_batch_dims(backend):
    check_against_oracle(backend, [_randn(19, 32), _randn(23, 32), _randn(23, 32)])
    check_against_oracle(backend, [_randn(2, 1, 2, 19, 32), _randn(2, 1, 2, 23, 32), _randn(2, 1, 2, 23, 32)])


# --------------------------------------------------------------------------------------------
# parity with torch.nn.functional.scaled_dot_product_attention (float32)
# --------------------------------------------------------------------------------------------

SDPA_CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "causal_rect": {"is_causal": True, "n_q": 45, "n_k": 29},
    "bool_mask": {"mask": "bool"},
    "float_mask": {"mask": "float"},
    "key_padding": {"mask": "float_per_key"},
    "scale": {"scale": 0.2},
    "gqa": {"h_kv": 1, "enable_gqa": True, "is_causal": True},
    "gqa_mask_scale": {"h_kv": 2, "enable_gqa": True, "mask": "bool_per_head", "scale": 0.5},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_matches_torch_sdpa(backend, case):
    cfg = dict(SDPA_CASES[case])
    n_q, n_k, h_kv = cfg.pop("n_q", 33), cfg.pop("n_k", 40), cfg.pop("h_kv", 4)
    mask = cfg.pop("mask", None)
    mask = None if mask is None else _masks(mask, 1, 4, n_q, n_k, torch.float32)
    q, k, v = _qkv(1, 4, h_kv, n_q, n_k, 32)
    out = _forced(backend, lambda: fastattn.scaled_dot_product_attention(q, k, v, mask, **cfg))
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    expected = F.scaled_dot_product_attention(q2, k2, v2, mask, **cfg)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(expected, (q2, k2, v2), dout)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5, msg=lambda m, name=name: f"d{name}: {m}")


# --------------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------------


def _identity_values(b, h_kv, n_k, d, dtype):
    """V whose rows are one-hot (Nk <= D): out = dropped probabilities, out[..., j] = P_ij·keep/(1-p)."""
    eye = torch.eye(n_k, d, device=DEVICE, dtype=dtype)
    return eye.expand(b, h_kv, n_k, d).clone().requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_keeps_one_minus_p_and_scales_the_kept(backend, p):
    b, h, n_q, n_k, d = 2, 2, 32, 32, 32
    q, k, _ = _qkv(b, h, h, n_q, n_k, d)
    v = _identity_values(b, h, n_k, d, torch.float32)
    probs = _forced(backend, lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True))[..., :n_k]
    dropped = _forced(
        backend, lambda: fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    )
    kept = dropped[..., :n_k] != 0
    visible = probs != 0
    assert not (kept & ~visible).any(), "a masked (causal) weight came back"
    n = visible.sum().item()
    frac = (kept & visible).sum().item() / n
    assert abs(frac - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n), f"kept fraction {frac:.3f}, expected {1 - p}"
    torch.testing.assert_close(dropped[..., :n_k][kept], probs[kept] / (1 - p), rtol=1e-5, atol=1e-6)

    # the backward regenerates the forward's mask: with one-hot V, dV = (dropped P)ᵀ·dO exactly
    dout = torch.randn_like(dropped)
    dv = torch.autograd.grad(dropped, v, dout)[0]
    torch.testing.assert_close(dv, dropped[..., :n_k].transpose(-1, -2) @ dout, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_same_seed_same_result(backend):
    q, k, v = _qkv(1, 2, 2, 24, 30, 32, dtype=torch.float16)

    def run(seed):
        torch.manual_seed(seed)
        out = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
        return out, torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    out1, g1 = _forced(backend, lambda: run(7))
    out2, g2 = _forced(backend, lambda: run(7))
    out3, _ = _forced(backend, lambda: run(8))
    assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(out1, out3)


@pytest.mark.parametrize(
    "case",
    [
        {"dtype": torch.float16},
        {"dtype": torch.float32, "is_causal": True, "h_kv": 1},
        {"dtype": torch.bfloat16, "mask": True},
    ],
    ids=["fp16", "fp32_causal_mqa", "bf16_mask"],
)
def test_triton_dropout_matches_oracle_with_the_kernels_keep_mask(case):
    """Forward and every gradient against reference.attention(dropout_mask=the kernel's mask)."""
    if fastattn.backends()["triton"] is not None:
        pytest.skip(f"triton: {fastattn.backends()['triton']}")
    from fastattn.triton.attention import dropout_keep_mask

    def attention(q, k, v, mask, scale, is_causal, p, seed):
        with fastattn.use_backend("triton"):
            return attention_op.attention(AttentionParams(scale, is_causal, p, mask, seed), q, k, v)

    b, h, h_kv, n_q, n_k, d, p, seed = 2, 2, case.get("h_kv", 2), 37, 29, 32, 0.3, 12345
    dtype, is_causal = case["dtype"], case.get("is_causal", False)
    leaves = _qkv(b, h, h_kv, n_q, n_k, d, dtype=dtype)
    mask = (torch.rand(b, 1, 1, n_k, device=DEVICE) > 0.2).expand(b, h, n_q, n_k) if case.get("mask") else None
    keep = dropout_keep_mask(seed, b, h, n_q, n_k, p, DEVICE)
    assert keep.dtype == torch.bool and keep.shape == (b, h, n_q, n_k)
    assert torch.equal(keep, dropout_keep_mask(seed, b, h, n_q, n_k, p, DEVICE))
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep, dropout_keep_mask(seed + 1, b, h, n_q, n_k, p, DEVICE))

    scale = d**-0.5

    def ref(q, k, v, m):
        return reference.attention(q, k, v, m, p, is_causal, scale, h != h_kv, dropout_mask=keep.to(q.device))

    out = attention(*leaves, mask, scale, is_causal, p, torch.tensor([seed], device=DEVICE))
    naive_leaves = [t.detach().requires_grad_() for t in leaves]
    naive = ref(*naive_leaves, mask)
    oracle_leaves = [_as_oracle(t) for t in leaves]
    oracle = ref(*oracle_leaves, _as_oracle(mask))
    assert_rule(out, naive, oracle, k=2.0)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    naive_g = torch.autograd.grad(naive, naive_leaves, dout)
    oracle_g = torch.autograd.grad(oracle, oracle_leaves, _as_oracle(dout))
    for name, g, gn, go in zip("qkv", got, naive_g, oracle_g):
        assert_rule(g, gn, go, k=3.0, name=f"d{name}")


def test_triton_dropout_keep_mask_statistics():
    if fastattn.backends()["triton"] is not None:
        pytest.skip(f"triton: {fastattn.backends()['triton']}")
    from fastattn.triton.attention import dropout_keep_mask

    p = 0.25
    keep = dropout_keep_mask(99, 2, 3, 48, 80, p, DEVICE)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    # rows, columns and heads are not copies of each other
    assert keep.float().mean(-1).std() > 0 and keep.float().mean(-2).std() > 0
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


# --------------------------------------------------------------------------------------------
# errors, support and fallback
# --------------------------------------------------------------------------------------------


def _bad_calls():
    q, k, v = (torch.randn(2, 4, 8, 16), torch.randn(2, 4, 10, 16), torch.randn(2, 4, 10, 16))
    return [
        ("batch", (q, k[:1], v[:1]), {}, ValueError, "batch"),
        ("heads", (q, k[:, :2], v[:, :2]), {}, ValueError, "enable_gqa"),
        ("gqa_divisible", (q, k[:, :3], v[:, :3]), {"enable_gqa": True}, ValueError, "multiple"),
        ("head_dim", (q, k[..., :8], v), {}, ValueError, "key head dim"),
        ("value_len", (q, k, v[:, :, :9]), {}, ValueError, "value"),
        ("dtype", (q, k.half(), v), {}, TypeError, "key has dtype"),
        ("value_dtype", (q, k, v.double()), {}, TypeError, "value has dtype"),
        ("device", (q, k.to("meta"), v), {}, ValueError, "key is on meta"),
        ("ndim", (q, k[0], v[0]), {}, ValueError, "same number of dims"),
        ("not_tensor", (q, k.tolist(), v), {}, TypeError, "key must be a torch.Tensor"),
        ("int_query", (q.int(), k, v), {}, TypeError, "query must be float"),
        ("dropout_neg", (q, k, v), {"dropout_p": -0.1}, ValueError, "dropout_p"),
        ("dropout_one", (q, k, v), {"dropout_p": 1.0}, ValueError, "dropout_p"),
        ("mask_shape", (q, k, v), {"attn_mask": torch.ones(8, 9, dtype=torch.bool)}, ValueError, "attn_mask"),
        ("mask_rank", (q, k, v), {"attn_mask": torch.ones(1, 2, 4, 8, 10, dtype=torch.bool)}, ValueError, "attn_mask"),
        ("mask_dtype", (q, k, v), {"attn_mask": torch.ones(8, 10, dtype=torch.int32)}, TypeError, "attn_mask"),
        ("scale_type", (q, k, v), {"scale": "0.1"}, TypeError, "scale"),
    ]


@pytest.mark.parametrize("call", _bad_calls(), ids=lambda c: c[0])
def test_bad_arguments_raise_naming_the_argument(call):
    _, args, kwargs, exc, match = call
    with pytest.raises(exc, match=match):
        fastattn.scaled_dot_product_attention(*args, **kwargs)


def test_triton_head_dim_512_forced_errors_and_automatic_falls_back():
    if fastattn.backends()["triton"] is not None:
        pytest.skip(f"triton: {fastattn.backends()['triton']}")
    q, k, v = _qkv(1, 2, 2, 8, 8, 512, requires_grad=(False, False, False))
    with fastattn.use_backend("triton"):
        with pytest.raises(fastattn.BackendError, match=r"backend 'triton' cannot run attention: head dim 512"):
            fastattn.scaled_dot_product_attention(q, k, v)
    # automatic selection in CUDA order (triton first) passes triton over for this call only
    cuda = lambda q, v: call_facts(AttentionParams(q.size(-1) ** -0.5), q, v)._replace(device_type="cuda")  # noqa: E731
    assert dispatch.select("attention", cuda(q, v))[0] != "triton"
    small = _qkv(1, 2, 2, 8, 8, 64, requires_grad=(False, False, False))
    assert dispatch.select("attention", cuda(small[0], small[2]))[0] == "triton"
    out = fastattn.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v))


def test_triton_declines_what_it_cannot_serve():
    if fastattn.backends()["triton"] is not None:
        pytest.skip(f"triton: {fastattn.backends()['triton']}")
    supports = dispatch.provider("triton", "attention").supports

    def facts(q, v, mask=None):
        return call_facts(AttentionParams(0.25, mask=mask), q, v)

    q, k, v = _qkv(1, 1, 1, 4, 4, 16, requires_grad=(False, False, False))
    assert supports(facts(q, v)) is None
    assert "float64" in supports(facts(q.double(), v.double()))
    assert "head dim 320" in supports(facts(q, torch.randn(1, 1, 4, 320, device=DEVICE)))
    grad_mask = torch.zeros(1, 1, 4, 4, device=DEVICE, requires_grad=True)
    assert "attn_mask" in supports(facts(q, v, grad_mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0)], ids=["B=0", "Nq=0", "Nk=0"])
def test_empty_inputs(backend, shape):
    b, h, n_q, n_k = shape
    q, k, v = _qkv(b, h, h, n_q, n_k, 16, 24)
    out = _forced(backend, lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert out.shape == (b, h, n_q, 24)
    assert (out == 0).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["none", "causal", "bool", "float", "gqa"])
def test_head_dim_zero_averages_the_visible_values(backend, kind):
    """D = 0 (Dv > 0): every score is 0, so a row is the mean of the values it sees, as torch gives
    (fastattn gave zeros, issue 16 item 13); gradients too."""
    q, k, v = _qkv(2, 4 if kind == "gqa" else 2, 2, 7, 9, 0, 5)
    kwargs = {"is_causal": kind == "causal", "enable_gqa": kind == "gqa"}
    if kind == "bool":
        mask = torch.rand(2, 1, 7, 9, device=DEVICE) > 0.4
        mask[..., 0] = True
        kwargs["attn_mask"] = mask
    elif kind == "float":
        kwargs["attn_mask"] = torch.randn(7, 9, device=DEVICE)
    out = _forced(backend, lambda: fastattn.scaled_dot_product_attention(q, k, v, **kwargs))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*leaves, **kwargs)
    torch.testing.assert_close(out, expected)
    if kind == "none":
        torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand_as(out))
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(expected, leaves, dout)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_query_row_or_scale_gives_nan_as_torch(backend):
    """NaN in, NaN out, as torch's SDPA: a NaN query row gives a NaN output row (the others stay
    exact), a NaN scale NaN in every row that sees a key; a fully masked row still gives zeros
    (fastattn's rule; torch's math kernel gives NaN there under a NaN scale). Issue 16 item 12."""
    q, k, v = _qkv(1, 2, 2, 9, 11, 16)
    q = q.detach().clone()
    q[0, 1, 4] = float("nan")
    mask = torch.ones(1, 1, 9, 11, dtype=torch.bool, device=DEVICE)
    mask[..., 6, :] = False  # a fully masked row
    q.requires_grad_()
    out = _forced(backend, lambda: fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    expected = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=mask)
    assert out[0, 1, 4].isnan().all()
    assert torch.equal(out[:, :, 6], torch.zeros_like(out[:, :, 6]))
    torch.testing.assert_close(out, expected, equal_nan=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq[0, 1, 4].isnan().all() and dk[0, 1].isnan().all() and dv[0, 1].isnan().all()
    assert torch.isfinite(dq[0, 0]).all() and torch.isfinite(dk[0, 0]).all() and torch.isfinite(dv[0, 0]).all()
    for is_causal in (False, True):
        out = _forced(
            backend,
            lambda causal=is_causal: fastattn.scaled_dot_product_attention(
                q.detach(), k, v, attn_mask=mask, scale=float("nan"), is_causal=causal
            ),
        )
        live = torch.ones(9, dtype=torch.bool)
        live[6] = False
        assert out[:, :, live].isnan().all(), is_causal
        assert torch.equal(out[:, :, 6], torch.zeros_like(out[:, :, 6])), is_causal


def test_triton_op_without_keys_gives_zeros_and_infinite_lse():
    if fastattn.backends()["triton"] is not None:
        pytest.skip(f"triton: {fastattn.backends()['triton']}")
    q, k, v = _qkv(1, 2, 2, 5, 0, 16, requires_grad=(False, False, False))
    out, lse = torch.ops.fastattn_triton.attention_fwd(q, k, v, None, 0.25, False, 0.0, None)
    assert out.shape == (1, 2, 5, 16) and (out == 0).all()
    assert lse.shape == (1, 2, 5) and (lse == float("inf")).all()


def test_triton_lse_is_the_natural_log_sum_exp():
    if fastattn.backends()["triton"] is not None:
        pytest.skip(f"triton: {fastattn.backends()['triton']}")
    q, k, v = _qkv(1, 2, 2, 20, 27, 32, requires_grad=(False, False, False))
    _, lse = torch.ops.fastattn_triton.attention_fwd(q, k, v, None, 0.3, True, 0.0, None)
    scores = reference.attention_scores(q.double(), k.double(), is_causal=True, scale=0.3)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=1e-5, atol=1e-5)


@pytest.fixture
def triton_one_loop(monkeypatch):
    """The triton backend with every forward/dQ config switched to ONE_LOOP (the single masked loop
    the wide-head and float32 tiles run), one config per kernel; the kernel cache is rebuilt."""
    if fastattn.backends()["triton"] is not None:
        pytest.skip(f"triton: {fastattn.backends()['triton']}")
    from fastattn.triton import attention as A

    configs = A._kernel_configs
    monkeypatch.setattr(A, "_kernel_configs", lambda *a, **kw: [c._replace(one_loop=True) for c in configs(*a, **kw)][:1])
    A._tuned.cache_clear()
    yield
    A._tuned.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("n_q, n_k, is_causal", [(45, 45, True), (61, 29, True), (29, 61, True), (40, 64, False), (37, 53, False)])
def test_triton_one_loop_form(triton_one_loop, dtype, n_q, n_k, is_causal):
    """The ONE_LOOP form of the forward and dQ kernels: causal diagonals, ragged ends, fully
    masked rows (n_q > n_k causal) and a key-padding mask, against the oracle."""
    mask = torch.ones(2, 1, 1, n_k, dtype=torch.bool, device=DEVICE)
    mask[1, ..., n_k // 3:] = False
    check_against_oracle("triton", _qkv(2, 2, 1, n_q, n_k, 32, dtype=dtype), attn_mask=mask,
                         is_causal=is_causal, enable_gqa=True)
    from fastattn.triton import attention as A

    forms = {kind: [c.kwargs.get("ONE_LOOP") for c in tuner.configs] for (kind, *_), tuner in A.tuned_kernels().items()}
    assert forms["fwd"] == [True] and forms["dq"] == [True], forms


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _compiled_check(backend, compile_backend, dtype=torch.float32):
    """The compiled function (forward and backward) against the float64 oracle with the rule."""
    q, k, v = _qkv(2, 4, 2, 33, 40, 32, dtype=dtype)
    mask = torch.rand(2, 1, 1, 40, device=DEVICE) > 0.2

    def fn(sdpa, q, k, v, mask):
        return sdpa(q, k, v, mask, is_causal=True, enable_gqa=True)

    _forced(backend, lambda: fn(fastattn.scaled_dot_product_attention, q, k, v, mask))  # skips if unserved
    compiled = torch.compile(
        lambda q, k, v, mask: fn(fastattn.scaled_dot_product_attention, q, k, v, mask),
        fullgraph=True,
        backend=compile_backend,
    )
    with fastattn.use_backend(backend):
        got = compiled(q, k, v, mask)
    naive_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    naive = fn(reference.attention, *naive_leaves, mask)
    oracle_leaves = [_as_oracle(t) for t in (q, k, v)]
    oracle = fn(reference.attention, *oracle_leaves, _as_oracle(mask))
    assert_rule(got, naive, oracle, k=2.0)
    dout = torch.randn_like(got)
    for name, g, gn, go in zip(
        "qkv",
        torch.autograd.grad(got, (q, k, v), dout),
        torch.autograd.grad(naive, naive_leaves, dout),
        torch.autograd.grad(oracle, oracle_leaves, _as_oracle(dout)),
    ):
        assert_rule(g, gn, go, k=3.0, name=f"d{name}")


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_compile_fullgraph_on_the_cpu(backend):
    """fullgraph=True raises on any graph break; aot_eager also traces the registered autograd."""
    torch._dynamo.reset()
    _compiled_check(backend, "aot_eager")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_compile_fullgraph_triton(dtype):
    torch._dynamo.reset()
    _compiled_check("triton", "inductor", dtype)


def _dropout_fn(q, k, v):
    return fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)


def _seeded_run(backend, fn, q, k, v, dout, torch_seed):
    torch.manual_seed(torch_seed)
    with fastattn.use_backend(backend):
        out = fn(q, k, v)
    return out, torch.autograd.grad(out, (q, k, v), dout)


def _check_compiled_dropout(backend, compile_backend):
    """fullgraph=True with dropout (the seed tensor is drawn in the graph: a .item() would break it):
    the same torch.manual_seed gives eager's output and gradients exactly, and the compiled
    backward regenerates the compiled forward's mask (one-hot V: dV = (dropped P)ᵀ·dO)."""
    b, h, n_q, n_k, d = 2, 2, 24, 20, 32
    q, k, _ = _qkv(b, h, h, n_q, n_k, d)
    v = _identity_values(b, h, n_k, d, torch.float32)
    _forced(backend, lambda: _dropout_fn(q, k, v))  # skips if unserved
    dout = torch.randn(b, h, n_q, d, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(_dropout_fn, fullgraph=True, backend=compile_backend)
    eager_out, eager_grads = _seeded_run(backend, _dropout_fn, q, k, v, dout, torch_seed=3)
    out, grads = _seeded_run(backend, compiled, q, k, v, dout, torch_seed=3)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for name, g, w in zip("qkv", grads, eager_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m, name=name: f"d{name}: {m}")
    dropped = out[..., :n_k]
    with fastattn.use_backend(backend):
        probs = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)[..., :n_k]
    assert ((dropped == 0) & (probs != 0)).any(), "nothing was dropped"
    torch.testing.assert_close(grads[2], dropped.transpose(-1, -2) @ dout, rtol=1e-5, atol=1e-5)
    other, _ = _seeded_run(backend, compiled, q, k, v, dout, torch_seed=4)
    assert not torch.equal(other, out), "another torch.manual_seed gave the same mask"


@pytest.mark.parametrize("backend", backend_params("reference", "cpu"))
def test_compile_fullgraph_dropout_on_the_cpu(backend):
    _check_compiled_dropout(backend, "aot_eager")


@pytest.mark.gpu
def test_compile_fullgraph_dropout_triton():
    """Inductor lowers the seed's torch.randint with its own RNG, so its draws differ from eager's:
    fallback_random keeps torch's, so the comparison with eager stays exact."""
    with torch._inductor.config.patch(fallback_random=True):
        _check_compiled_dropout("triton", "inductor")


def test_reference_and_cpu_drop_the_same_weights():
    """Both draw csrc/dropout_rng.h's Philox mask from the seed tensor: same torch.manual_seed, same
    output."""
    q, k, v = _qkv(2, 2, 2, 19, 23, 16)
    outs = []
    for backend in ("reference", "cpu"):
        torch.manual_seed(9)
        outs.append(_forced(backend, lambda: fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.4)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dropout_draws_nothing(backend):
    """dropout_p = 0 costs no RNG draw (no seed tensor, no randint launch): the generator is where
    torch.manual_seed left it."""
    q, k, v = _qkv(1, 2, 2, 8, 8, 16)
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    _forced(backend, lambda: fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.0))
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.gpu
def test_triton_ops_pass_opcheck():
    q, k, v = _qkv(1, 4, 2, 70, 90, 64, dtype=torch.float16)
    mask = torch.rand(1, 1, 1, 90, device=DEVICE).expand(1, 4, 70, 90) > 0.2
    torch.library.opcheck(torch.ops.fastattn_triton.attention_fwd, (q, k, v, mask, 0.125, True, 0.1, torch.tensor([3], device=DEVICE)))


# --------------------------------------------------------------------------------------------
# GPU: long sequences, linear memory
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("n", [8192, 16384, 32768])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_long_sequences_against_torch_sdpa(n, is_causal):
    """fp16 forward at 8k-32k (and the backward at 8k) against torch SDPA in float32, with the rule:
    no worse than twice torch's own fp16 SDPA."""
    b, h, d = 1, 4, 64
    q, k, v = _qkv(b, h, h, n, n, d, dtype=torch.float16, requires_grad=(n == 8192,) * 3)
    with fastattn.use_backend("triton"):
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    q32, k32, v32 = (t.detach().float().requires_grad_(t.requires_grad) for t in (q, k, v))
    oracle = F.scaled_dot_product_attention(q32, k32, v32, is_causal=is_causal)
    qn, kn, vn = (t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
    naive = F.scaled_dot_product_attention(qn, kn, vn, is_causal=is_causal)
    assert_rule(out, naive, oracle, k=2.0, dtype=torch.float16)
    if n == 8192:
        dout = torch.randn_like(out)
        for name, g, gn, go in zip(
            "qkv",
            torch.autograd.grad(out, (q, k, v), dout),
            torch.autograd.grad(naive, (qn, kn, vn), dout),
            torch.autograd.grad(oracle, (q32, k32, v32), dout.float()),
        ):
            assert_rule(g, gn, go, k=3.0, name=f"d{name}", dtype=torch.float16)


@pytest.mark.gpu
def test_peak_memory_is_linear_in_sequence_length():
    """Forward + backward extra memory at N and 2N: linear (x2), not quadratic (x4)."""

    def peak_extra(n):
        q, k, v = _qkv(1, 8, 8, n, n, 64, dtype=torch.float16)
        dout = torch.randn(1, 8, n, 64, device=DEVICE, dtype=torch.float16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with fastattn.use_backend("triton"):
            out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        torch.cuda.synchronize()
        del out, grads
        return torch.cuda.max_memory_allocated() - base

    peak_extra(2048)  # warm-up: autotuning and compilation allocate their own buffers
    peak_extra(4096)
    small, large = peak_extra(2048), peak_extra(4096)
    assert large <= 2.3 * small, f"peak extra memory {small} B at N, {large} B at 2N: not linear"
    # and far below the (N, N) fp32 scores of the 8 heads (512 MiB at N = 4096)
    assert large < 8 * 4096 * 4096 * 4 / 8


@pytest.mark.gpu
def test_triton_is_chosen_automatically_on_cuda():
    q, k, v = _qkv(1, 2, 2, 128, 128, 64, dtype=torch.float16, requires_grad=(False, False, False))
    assert dispatch.select("attention", call_facts(AttentionParams(0.125), q, v))[0] == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [40, 96, 160, 256])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_gpu_head_dims_and_masks_against_oracle(head_dim, dtype):
    """The autotuned GPU configurations (bigger blocks than the interpreter's) on odd shapes."""
    leaves = _qkv(2, 4, 2, 300, 517, head_dim, dtype=dtype)
    mask = torch.rand(2, 1, 300, 517, device=DEVICE) > 0.1
    check_against_oracle("triton", leaves, attn_mask=mask, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("backend", backend_params("triton", "cpu"))
@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
@pytest.mark.parametrize("masked", ["causal", "bool"])
def test_non_positive_scale_with_masks(backend, scale, masked):
    """The Triton kernels fold the scale into the exponent after a max over unscaled scores; a
    negative or zero scale must take the scale-first path (max(qk)·scale is not the max, -inf·0 is
    NaN). Odd lengths so masked, diagonal and ragged key blocks all occur."""
    leaves = _qkv(1, 2, 2, 37, 45, 16)
    mask = (torch.rand(1, 1, 37, 45) > 0.3).to(DEVICE) if masked == "bool" else None
    check_against_oracle(backend, leaves, attn_mask=mask, is_causal=masked == "causal", scale=scale)
