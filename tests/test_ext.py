"""The C++ extension fastattn._C: torch.library.opcheck on every op (schema, fake tensors, autograd
registration, AOT dispatch), direct checks of each op family against the float64 oracle
(reference.py) under the numerics rule, the dropout RNG contract (csrc/dropout_rng.h), the lse
convention, argument errors raised by the kernels, empty inputs and strided inputs.

The family test files (test_attention.py, test_softmax.py, ...) test the "cpu" backend through the
public API as well; this file tests the ops themselves, including shapes those files keep small
(several forward and backward tiles: the CPU kernel's blocks are 64 x 512 forward, 64 x 128 backward).
"""

import math

import pytest
import torch
from helpers import assert_rule, dropout_keep_oracle

import fastattn
from fastattn import reference
from fastattn.ops import feed_forward as feed_forward_op
from fastattn.ops.attention import AttentionParams
from fastattn.ops.attention import call_facts as attention_call_facts
from fastattn.ops.feed_forward import FeedForwardParams

ext_reason = fastattn.backends()["cpu"]
pytestmark = pytest.mark.skipif(ext_reason is not None, reason=f"cpu extension: {ext_reason}")

if ext_reason is None:
    from fastattn import ext

    ops = torch.ops.fastattn

HAS_CUDA_KERNELS = (
    ext_reason is None
    and torch.cuda.is_available()
    and torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::attention_fwd", "CUDA")
)


def _devices():
    cuda = pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="no CUDA kernels in fastattn._C")],
    )
    return ["cpu", cuda]


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def oracle(t):
    """float64 CPU leaf copy (bool stays bool)."""
    if t is None:
        return None
    out = t.detach().cpu()
    return (out.double() if out.is_floating_point() else out).requires_grad_(t.requires_grad)


def naive_copy(t):
    return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)


# --------------------------------------------------------------------------------------------
# opcheck: every op, CPU (and CUDA on a GPU)
# --------------------------------------------------------------------------------------------


def _opcheck_cases(device):
    """(name, op, args) with small random inputs; forward ops get inputs that require grad."""
    g = {"device": device, "requires_grad": True}
    d = {"device": device}
    seed = lambda n: ext.seed_tensor(n, device)  # noqa: E731
    q, k, v = randn(2, 4, 9, 16, **g), randn(2, 2, 11, 16, **g), randn(2, 2, 11, 8, **g)
    bool_mask = (torch.rand(2, 1, 1, 11, device=device) > 0.3).expand(2, 4, 9, 11)
    float_mask = randn(9, 11, **d).expand(2, 4, 9, 11)
    out, lse = ops.attention_fwd(q, k, v, bool_mask, 0.25, True, 0.0, None)
    out_p, lse_p = ops.attention_fwd(q, k, v, None, 0.25, False, 0.3, seed(5))
    x = randn(3, 5, 24, **g)
    y = ops.softmax_fwd(x, None, 1.0, False, False)
    y_log = ops.softmax_fwd(x, None, 0.5, True, True)
    h, b1 = randn(6, 20, **g), randn(20, **g)
    xn, res, w, b = randn(7, 32, **g), randn(7, 32, **g), randn(32, **g), randn(32, **g)
    _, s, mean, rstd = ops.layer_norm_fwd(xn, res, w, b, 1e-5)
    _, s_rms, rstd_rms = ops.rms_norm_fwd(xn, res, w, 1e-6)
    dt = lambda t: randn(*t.shape, **d)  # noqa: E731
    det = lambda *ts: [t.detach() for t in ts]  # noqa: E731
    return [
        ("attention_fwd", ops.attention_fwd, (q, k, v, None, 0.25, False, 0.0, None)),
        ("attention_fwd_causal_bool_mask", ops.attention_fwd, (q, k, v, bool_mask, 0.25, True, 0.0, None)),
        ("attention_fwd_float_mask_dropout", ops.attention_fwd, (q, k, v, float_mask, 0.3, False, 0.2, seed(7))),
        ("attention_bwd", ops.attention_bwd, (dt(out), *det(q, k, v, out, lse), bool_mask, 0.25, True, 0.0, None)),
        ("attention_bwd_dropout", ops.attention_bwd, (dt(out_p), *det(q, k, v, out_p, lse_p), None, 0.25, False, 0.3, seed(5))),
        ("dropout_mask", ops.dropout_mask, (torch.empty((), device=device).expand(2, 3, 5, 7), 0.3, seed(11))),
        ("softmax_fwd", ops.softmax_fwd, (x, None, 1.0, False, False)),
        ("softmax_fwd_mask_causal_log", ops.softmax_fwd, (x, randn(5, 24, **d).expand(3, 5, 24), 0.5, True, True)),
        ("softmax_fwd_bool_mask", ops.softmax_fwd, (x, torch.rand(3, 1, 24, device=device).gt(0.2).expand(3, 5, 24), 2.0, False, False)),
        ("softmax_bwd", ops.softmax_bwd, (dt(y), y.detach(), 1.0, False)),
        ("softmax_bwd_log", ops.softmax_bwd, (dt(y_log), y_log.detach(), 0.5, True)),
        ("ffn_act_fwd_gelu", ops.ffn_act_fwd, (h, b1, "gelu", 0.0, None)),
        ("ffn_act_fwd_swiglu_dropout", ops.ffn_act_fwd, (h, None, "swiglu", 0.25, seed(3))),
        ("ffn_act_fwd_geglu_bias", ops.ffn_act_fwd, (h, b1, "geglu", 0.0, None)),
        ("ffn_act_bwd_gelu_tanh", ops.ffn_act_bwd, (randn(6, 20, **d), h.detach(), b1.detach(), "gelu_tanh", 0.1, seed(2))),
        ("ffn_act_bwd_swiglu", ops.ffn_act_bwd, (randn(6, 10, **d), h.detach(), None, "swiglu", 0.0, None)),
        ("layer_norm_fwd", ops.layer_norm_fwd, (xn, None, w, b, 1e-5)),
        ("layer_norm_fwd_residual", ops.layer_norm_fwd, (xn, res, w, b, 1e-5)),
        ("layer_norm_fwd_no_affine", ops.layer_norm_fwd, (xn, None, None, None, 1e-5)),
        ("layer_norm_bwd", ops.layer_norm_bwd, (dt(xn), *det(s, w, mean, rstd), True)),
        ("layer_norm_bwd_no_affine", ops.layer_norm_bwd, (dt(xn), s.detach(), None, *det(mean, rstd), False)),
        ("rms_norm_fwd", ops.rms_norm_fwd, (xn, None, w, 1e-6)),
        ("rms_norm_fwd_residual", ops.rms_norm_fwd, (xn, res, w, 1e-6)),
        ("rms_norm_bwd", ops.rms_norm_bwd, (dt(xn), *det(s_rms, w, rstd_rms))),
        ("rms_norm_bwd_no_weight", ops.rms_norm_bwd, (dt(xn), s_rms.detach(), None, rstd_rms.detach())),
    ]


_OPCHECK_NAMES = [
    "attention_fwd", "attention_fwd_causal_bool_mask", "attention_fwd_float_mask_dropout", "attention_bwd",
    "attention_bwd_dropout", "dropout_mask", "softmax_fwd", "softmax_fwd_mask_causal_log", "softmax_fwd_bool_mask",
    "softmax_bwd", "softmax_bwd_log", "ffn_act_fwd_gelu", "ffn_act_fwd_swiglu_dropout", "ffn_act_fwd_geglu_bias",
    "ffn_act_bwd_gelu_tanh", "ffn_act_bwd_swiglu", "layer_norm_fwd", "layer_norm_fwd_residual",
    "layer_norm_fwd_no_affine", "layer_norm_bwd", "layer_norm_bwd_no_affine", "rms_norm_fwd",
    "rms_norm_fwd_residual", "rms_norm_bwd", "rms_norm_bwd_no_weight",
]  # fmt: skip


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("case", _OPCHECK_NAMES)
def test_opcheck(device, case):
    cases = {name: (op, args) for name, op, args in _opcheck_cases(device)}
    assert sorted(cases) == sorted(_OPCHECK_NAMES)
    op, args = cases[case]
    torch.library.opcheck(op, args)


def test_every_schema_has_a_cpu_kernel_and_a_fake():
    names = [
        "attention_fwd", "attention_bwd", "dropout_mask", "softmax_fwd", "softmax_bwd", "ffn_act_fwd", "ffn_act_bwd",
        "layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd",
    ]  # fmt: skip
    for name in names:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{name}", "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{name}", "Meta") or (
            torch._library.simple_registry.singleton.find(f"fastattn::{name}").fake_impl.kernel is not None
        ), name


# --------------------------------------------------------------------------------------------
# attention against the oracle
# --------------------------------------------------------------------------------------------


def _attention_check(q, k, v, mask=None, scale=None, is_causal=False, dropout_p=0.0, seed=0, grads=True):
    """attention_fwd (+ attention_bwd through autograd) against reference.attention in float64."""
    scale = q.size(-1) ** -0.5 if scale is None else scale
    gqa = q.size(1) != k.size(1)
    keep = None
    if dropout_p > 0:
        keep = ext.dropout_mask((q.size(0), q.size(1), q.size(2), k.size(2)), dropout_p, seed)

    def ref(qq, kk, vv, mm):
        return reference.attention(qq, kk, vv, mm, dropout_p, is_causal, scale, gqa, dropout_mask=keep)

    out, lse = ops.attention_fwd(q, k, v, mask, scale, is_causal, dropout_p, ext.seed_tensor(seed) if dropout_p else None)
    naive_in = [naive_copy(t) for t in (q, k, v)]
    naive = ref(*naive_in, mask)
    oracle_in = [oracle(t) for t in (q, k, v)]
    expected = ref(*oracle_in, oracle(mask))
    assert out.shape == expected.shape and out.dtype == q.dtype
    assert_rule(out, naive, expected, k=2.0, name="out")
    # lse: the natural log-sum-exp of the masked, scaled scores; +inf where nothing is visible
    scores = reference.attention_scores(*oracle_in[:2], oracle(mask), is_causal, scale, gqa).detach()
    lse_ref = torch.logsumexp(scores, -1).masked_fill((scores == -math.inf).all(-1), math.inf)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)
    if not grads:
        return out
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want_naive = torch.autograd.grad(naive, naive_in, dout)
    want = torch.autograd.grad(expected, oracle_in, oracle(dout))
    for name, g, gn, go in zip("qkv", got, want_naive, want):
        assert g.shape == go.shape and g.dtype == q.dtype
        assert_rule(g, gn, go, k=3.0, name=f"d{name}")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_attention_spans_several_tiles(dtype, is_causal):
    """Nq = 150 (3 query blocks), Nk = 1100 (3 forward key blocks, 9 backward ones), ragged ends;
    one (batch, head) so that the backward also splits the key blocks across threads."""
    q, k, v = (randn(1, 1, n, 64, dtype=dtype, requires_grad=True) for n in (150, 1100, 1100))
    _attention_check(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("n_q, n_k", [(1100, 150), (70, 70), (1, 33), (33, 1)])
def test_attention_causal_top_left_rectangles(n_q, n_k):
    q, k, v = randn(1, 2, n_q, 32, requires_grad=True), randn(1, 2, n_k, 32, requires_grad=True), randn(
        1, 2, n_k, 48, requires_grad=True
    )
    _attention_check(q, k, v, is_causal=True)


@pytest.mark.parametrize("h_kv", [1, 2], ids=["mqa", "gqa"])
def test_attention_gqa_sums_dk_dv_over_the_group(h_kv):
    q, k, v = randn(2, 6, 70, 32, requires_grad=True), randn(2, h_kv, 90, 32, requires_grad=True), randn(
        2, h_kv, 90, 32, requires_grad=True
    )
    _attention_check(q, k, v, is_causal=True, scale=0.2)


@pytest.mark.parametrize("head_dim", [8, 80, 256, 320])
def test_attention_head_dims(head_dim):
    q, k, v = (randn(1, 2, n, head_dim, requires_grad=True) for n in (40, 70, 70))
    _attention_check(q, k, v)


@pytest.mark.parametrize(
    "kind", ["bool_key_padding", "float_2d", "bool_full", "float64_per_head", "bf16_per_key_with_minus_inf"]
)
def test_attention_masks_read_through_strides(kind):
    b, h, n_q, n_k = 2, 3, 67, 140
    if kind == "bool_key_padding":
        base = torch.rand(b, 1, 1, n_k) > 0.4
        base[1, ..., :] = False  # batch 1: every row fully masked
    elif kind == "float_2d":
        base = torch.randn(n_q, n_k)
    elif kind == "bool_full":
        base = torch.rand(b, h, n_q, n_k) > 0.5
    elif kind == "float64_per_head":
        base = torch.randn(1, h, n_q, n_k, dtype=torch.float64)
    else:
        base = torch.randn(b, 1, 1, n_k).bfloat16()
        base[0, ..., 10:] = -math.inf
    mask = base.expand(b, h, n_q, n_k)  # a view: stride 0 where broadcast, as functional passes it
    assert mask.data_ptr() == base.data_ptr()
    q, k, v = (randn(b, h, n, 32, requires_grad=True) for n in (n_q, n_k, n_k))
    out = _attention_check(q, k, v, mask=mask, is_causal=kind == "float_2d")
    if kind == "bool_key_padding":
        assert (out[1] == 0).all()


def test_attention_fully_masked_rows_give_zeros_inf_lse_and_zero_grads():
    b, h, n_q, n_k = 1, 2, 20, 30
    mask = torch.ones(b, h, n_q, n_k, dtype=torch.bool)
    mask[:, :, 3] = False
    mask[:, 1] = False
    q, k, v = (randn(b, h, n, 16, requires_grad=True) for n in (n_q, n_k, n_k))
    out, lse = ops.attention_fwd(q, k, v, mask, 0.25, False, 0.0, None)
    assert not out.isnan().any()
    assert (out[:, :, 3] == 0).all() and (out[:, 1] == 0).all()
    assert (lse[:, :, 3] == math.inf).all() and (lse[:, 1] == math.inf).all() and lse[:, 0, 4:].isfinite().all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (dq[:, :, 3] == 0).all() and (dq[:, 1] == 0).all() and (dk[:, 1] == 0).all() and (dv[:, 1] == 0).all()
    _attention_check(q, k, v, mask=mask, scale=0.25)


def test_attention_strided_inputs():
    """q, k, v as transposed views of a packed (B, N, 3, H, D) tensor, dO non-contiguous too."""
    packed = randn(2, 75, 3, 2, 40, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in packed.unbind(2))
    assert not q.is_contiguous()
    out, _ = ops.attention_fwd(q, k, v, None, 0.3, True, 0.0, None)
    expected = reference.attention(*(oracle(t) for t in (q, k, v)), None, 0.0, True, 0.3)
    naive = reference.attention(q, k, v, None, 0.0, True, 0.3)
    assert_rule(out, naive, expected)
    dout = randn(2, 2, 75, 40 * 2)[..., ::2]  # a strided gradient
    (g,) = torch.autograd.grad(out, packed, dout)
    (g_naive,) = torch.autograd.grad(naive, packed, dout)
    packed64 = oracle(packed)
    q64, k64, v64 = (t.transpose(1, 2) for t in packed64.unbind(2))
    (g_oracle,) = torch.autograd.grad(reference.attention(q64, k64, v64, None, 0.0, True, 0.3), packed64, dout.double())
    assert_rule(g, g_naive, g_oracle, k=3.0)


def test_attention_dropout_matches_the_oracle_with_the_kernels_mask():
    q, k, v = (randn(2, 2, n, 32, requires_grad=True) for n in (90, 600, 600))
    mask = (torch.rand(2, 1, 1, 600) > 0.2).expand(2, 2, 90, 600)
    _attention_check(q, k, v, mask=mask, is_causal=False, dropout_p=0.3, seed=1234)
    q, k, v = (randn(1, 4, n, 32, requires_grad=True) for n in (70, 70, 70))
    k, v = (t[:, :2].detach().requires_grad_() for t in (k, v))
    _attention_check(q, k, v, is_causal=True, dropout_p=0.5, seed=99)


def test_attention_dropout_is_deterministic_per_seed():
    q, k, v = (randn(1, 2, 40, 16) for _ in range(3))
    a = ops.attention_fwd(q, k, v, None, 0.25, False, 0.4, ext.seed_tensor(3))[0]
    assert torch.equal(a, ops.attention_fwd(q, k, v, None, 0.25, False, 0.4, ext.seed_tensor(3))[0])
    assert not torch.equal(a, ops.attention_fwd(q, k, v, None, 0.25, False, 0.4, ext.seed_tensor(4))[0])


def test_attention_empty_inputs():
    q, k, v = randn(1, 2, 0, 16), randn(1, 2, 5, 16), randn(1, 2, 5, 8)
    out, lse = ops.attention_fwd(q, k, v, None, 0.25, False, 0.0, None)
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)
    q, k, v = randn(1, 2, 4, 16), randn(1, 2, 0, 16), randn(1, 2, 0, 8)
    out, lse = ops.attention_fwd(q, k, v, None, 0.25, False, 0.0, None)
    assert (out == 0).all() and (lse == math.inf).all()
    dq, dk, dv = ops.attention_bwd(torch.ones_like(out), q, k, v, out, lse, None, 0.25, False, 0.0, None)
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


# --------------------------------------------------------------------------------------------
# the dropout RNG contract (csrc/dropout_rng.h)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_follows_the_documented_philox(p):
    """dropout_mask is the documented Philox 4x32-10 scheme, computed by the NumPy oracle of
    tests/helpers.py (written from the published algorithm, checked on Random123's vectors)."""
    for seed, shape in ((2**31 - 5, (2, 3, 17, 29)), (-(2**40) - 1, (33, 45)), (7, (1, 2, 3, 4, 5))):
        assert torch.equal(ext.dropout_mask(shape, p, seed), dropout_keep_oracle(seed, shape, p)), (seed, shape)


def test_dropout_mask_statistics_and_independence():
    p, shape = 0.3, (2, 4, 64, 96)
    keep = ext.dropout_mask(shape, p, 42)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep, ext.dropout_mask(shape, p, 43))
    # neighbouring seeds are not shifted copies of one stream
    assert not torch.equal(keep.flatten()[1:], ext.dropout_mask(shape, p, 43).flatten()[:-1])
    # consecutive elements are uncorrelated
    f = keep.flatten().float() - (1 - p)
    assert abs((f[1:] * f[:-1]).mean().item()) < 4 * p * (1 - p) / math.sqrt(n)
    assert ext.dropout_mask(shape, 0.0, 42).all()


# --------------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------------


def _softmax_check(x, mask=None, scale=1.0, is_causal=False, log=False):
    y = ops.softmax_fwd(x, mask, scale, is_causal, log)
    naive_x, oracle_x = naive_copy(x), oracle(x)
    naive = reference.softmax(naive_x, -1, scale, mask, is_causal, log)
    expected = reference.softmax(oracle_x, -1, scale, oracle(mask), is_causal, log)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_rule(y, naive, expected, name="y")
    dy = torch.randn_like(y)  # nonzero at -inf outputs too: log_softmax passes dy there unless a bool/causal mask hides x
    (g,) = torch.autograd.grad(y, x, dy)
    (g_naive,) = torch.autograd.grad(naive, naive_x, dy)
    (g_oracle,) = torch.autograd.grad(expected, oracle_x, oracle(dy))
    assert_rule(g, g_naive, g_oracle, k=3.0, name="dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_rows(dtype, log):
    _softmax_check(randn(3, 7, 1000, dtype=dtype, requires_grad=True) * 3, scale=0.7, log=log)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_strided_masked_causal(log):
    base = randn(20, 6, 33, requires_grad=True)
    x = base.transpose(0, 2)  # (33, 6, 20): rows strided by 6 * 33 elements
    mask = (torch.rand(33, 1, 20) > 0.3).expand(33, 6, 20)
    mask[0, 0] = False  # a fully masked row
    _softmax_check(x, mask=mask, is_causal=True, log=log)
    fmask = torch.randn(1, 6, 20, dtype=torch.float64).expand(33, 6, 20)
    _softmax_check(x, mask=fmask, scale=2.0, log=log)


def test_softmax_fully_masked_rows():
    x = randn(4, 8, requires_grad=True)
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[2] = False
    y = ops.softmax_fwd(x, mask, 1.0, False, False)
    assert (y[2] == 0).all() and not y.isnan().any()
    y_log = ops.softmax_fwd(x, mask, 1.0, False, True)
    assert (y_log[2] == -math.inf).all()
    (g,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert (g[2] == 0).all() and not g.isnan().any()


# --------------------------------------------------------------------------------------------
# FFN epilogue and the feed-forward op
# --------------------------------------------------------------------------------------------

ACTIVATIONS = reference.ACTIVATIONS


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ffn_epilogue_against_oracle(activation, dtype):
    gated = activation in reference.GATED_ACTIVATIONS
    h = randn(37, 2 * 48 if gated else 48, dtype=dtype, requires_grad=True)
    h = h * 2  # a non-leaf view with a wider range, through the activations' curved parts
    bias = randn(h.size(1), dtype=dtype, requires_grad=True)
    p, seed = 0.25, 77
    keep = ext.dropout_mask((37, 48), p, seed)
    a = ops.ffn_act_fwd(h, bias, activation, p, ext.seed_tensor(seed))

    def ref(hh, bb):
        return reference.activate(hh + bb, activation) * keep / (1 - p)

    hn, bn = naive_copy(h), naive_copy(bias)
    ho, bo = oracle(h), oracle(bias)
    naive, expected = ref(hn, bn), ref(ho, bo)
    assert_rule(a, naive, expected, name="a")
    da = torch.randn_like(a)
    got = torch.autograd.grad(a, (h, bias), da)
    want_naive = torch.autograd.grad(naive, (hn, bn), da)
    want = torch.autograd.grad(expected, (ho, bo), oracle(da))
    for name, g, gn, go in zip(("dh", "dbias"), got, want_naive, want):
        assert_rule(g, gn, go, k=3.0, name=name)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_feed_forward_op_against_oracle(activation, bias):
    """The cpu backend's feed_forward (GEMMs + fused epilogue, custom autograd) with dropout."""
    m, d_model, hidden, p, seed = 45, 32, 80, 0.2, 5
    rows = 2 * hidden if activation == "swiglu" else hidden
    x, w1, w2 = randn(m, d_model, requires_grad=True), randn(rows, d_model, requires_grad=True), randn(
        24, hidden, requires_grad=True
    )
    b1 = randn(rows, requires_grad=True) if bias else None
    b2 = randn(24, requires_grad=True) if bias else None
    leaves = [t for t in (x, w1, b1, w2, b2) if t is not None]
    with fastattn.use_backend("cpu"):
        params = FeedForwardParams(activation, p, ext.seed_tensor(seed))
        out = feed_forward_op.feed_forward(params, x, w1, b1, w2, b2)
    keep = ext.dropout_mask((m, hidden), p, seed)

    def ref(tensors):
        it = iter(tensors)
        xx, ww1 = next(it), next(it)
        bb1 = next(it) if bias else None
        ww2 = next(it)
        bb2 = next(it) if bias else None
        return reference.feed_forward(xx, ww1, bb1, ww2, bb2, activation, p, dropout_mask=keep)

    naive_in, oracle_in = [naive_copy(t) for t in leaves], [oracle(t) for t in leaves]
    naive, expected = ref(naive_in), ref(oracle_in)
    assert_rule(out, naive, expected)
    dout = torch.randn_like(out)
    for g, gn, go in zip(
        torch.autograd.grad(out, leaves, dout),
        torch.autograd.grad(naive, naive_in, dout),
        torch.autograd.grad(expected, oracle_in, oracle(dout)),
    ):
        assert_rule(g, gn, go, k=3.0)


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("affine", [False, True], ids=["no_affine", "affine"])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_norms_against_oracle(kind, affine, residual, dtype):
    m, n = 67, 300
    x = (randn(m, n, dtype=dtype) * 2 + 1).requires_grad_()
    r = randn(m, n, dtype=dtype, requires_grad=True) if residual else None
    w = randn(n, dtype=dtype, requires_grad=True) if affine else None
    b = randn(n, dtype=dtype, requires_grad=True) if affine and kind == "layer_norm" else None
    leaves = [t for t in (x, r, w, b) if t is not None]

    def run_ref(tensors):
        it = iter(tensors)
        xx = next(it)
        rr = next(it) if residual else None
        ww = next(it) if affine else None
        bb = next(it) if affine and kind == "layer_norm" else None
        if kind == "layer_norm":
            out = reference.layer_norm(xx, (n,), ww, bb, 1e-5, rr)
        else:
            out = reference.rms_norm(xx, (n,), ww, 1e-6, rr)
        return out if residual else (out, None)

    if kind == "layer_norm":
        y, s, _, _ = ops.layer_norm_fwd(x, r, w, b, 1e-5)
    else:
        y, s, _ = ops.rms_norm_fwd(x, r, w, 1e-6)
    naive_in, oracle_in = [naive_copy(t) for t in leaves], [oracle(t) for t in leaves]
    (y_naive, s_naive), (y_oracle, s_oracle) = run_ref(naive_in), run_ref(oracle_in)
    assert_rule(y, y_naive, y_oracle, name="y")
    if residual:
        assert torch.equal(s, s_naive), "the residual sum must be x + residual rounded as torch rounds it"
    dy = torch.randn_like(y)
    outs, naive_outs, oracle_outs = [y], [y_naive], [y_oracle]
    grads_out, naive_grads_out, oracle_grads_out = [dy], [dy], [oracle(dy)]
    if residual:  # the residual stream also carries a gradient from the next block
        ds = torch.randn_like(s)
        outs.append(s), naive_outs.append(s_naive), oracle_outs.append(s_oracle)
        grads_out.append(ds), naive_grads_out.append(ds), oracle_grads_out.append(oracle(ds))
    for i, (g, gn, go) in enumerate(
        zip(
            torch.autograd.grad(outs, leaves, grads_out),
            torch.autograd.grad(naive_outs, naive_in, naive_grads_out),
            torch.autograd.grad(oracle_outs, oracle_in, oracle_grads_out),
        )
    ):
        assert_rule(g, gn, go, k=3.0, name=f"grad {i}")


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("used", ["y", "s"])
def test_norm_with_residual_when_one_output_is_unused(kind, used):
    """Autograd gets None (not zeros) for the unused output; the gradient must still be right."""
    x, r, w = randn(9, 40, requires_grad=True), randn(9, 40, requires_grad=True), randn(40, requires_grad=True)
    fn = fastattn.layer_norm if kind == "layer_norm" else fastattn.rms_norm
    with fastattn.use_backend("cpu"):
        y, s = fn(x, 40, w, residual=r)
    x64, r64, w64 = oracle(x), oracle(r), oracle(w)
    y64, s64 = fn(x64, 40, w64, residual=r64)  # float64: the reference backend
    out, out64 = (y, y64) if used == "y" else (s, s64)
    grads = torch.autograd.grad(out, (x, r, w), torch.ones_like(out), allow_unused=True)
    grads64 = torch.autograd.grad(out64, (x64, r64, w64), torch.ones_like(out64), allow_unused=True)
    for g, g64 in zip(grads, grads64):
        if g64 is None or (g64 == 0).all():
            assert g is None or (g == 0).all()
        else:
            torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-5)


def test_norm_strided_input():
    base = randn(64, 40, requires_grad=True)
    x = base.t()  # (40, 64), column-major
    y, _, mean, rstd = ops.layer_norm_fwd(x, None, None, None, 1e-5)
    expected = torch.nn.functional.layer_norm(oracle(x), (64,))
    assert_rule(y, torch.nn.functional.layer_norm(x, (64,)), expected)
    torch.testing.assert_close(mean.double(), oracle(x).mean(-1), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# errors raised by the kernels themselves (the public API checks first; direct callers get these)
# --------------------------------------------------------------------------------------------


def _bad_op_calls():
    q, k, v = randn(1, 4, 8, 16), randn(1, 3, 8, 16), randn(1, 4, 8, 16)
    x = randn(4, 8)
    return [
        ("heads", lambda: ops.attention_fwd(q, k, k, None, 1.0, False, 0.0, None), ValueError, "multiple"),
        ("float64", lambda: ops.attention_fwd(q.double(), v.double(), v.double(), None, 1.0, False, 0.0, None),
         TypeError, "float32, bfloat16 or float16"),
        ("mask_shape", lambda: ops.attention_fwd(q, v, v, torch.ones(1, 4, 8, 7, dtype=torch.bool), 1.0, False, 0.0, None),
         ValueError, "mask"),
        ("mask_dtype", lambda: ops.attention_fwd(q, v, v, torch.ones(1, 4, 8, 8, dtype=torch.int32), 1.0, False, 0.0, None),
         TypeError, "mask"),
        ("dropout", lambda: ops.attention_fwd(q, v, v, None, 1.0, False, 1.0, None), ValueError, "dropout_p"),
        ("seed_missing", lambda: ops.attention_fwd(q, v, v, None, 1.0, False, 0.3, None), ValueError, "seed"),
        ("seed_dtype", lambda: ops.attention_fwd(q, v, v, None, 1.0, False, 0.3, torch.tensor([1.0])), TypeError, "seed"),
        ("seed_shape", lambda: ops.ffn_act_fwd(x, None, "gelu", 0.3, torch.tensor([1, 2])), ValueError, "seed"),
        ("seed_missing_ffn", lambda: ops.ffn_act_bwd(x, x, None, "gelu", 0.3, None), ValueError, "seed"),
        ("activation", lambda: ops.ffn_act_fwd(x, None, "tanh", 0.0, None), ValueError, "activation"),
        ("gated_odd", lambda: ops.ffn_act_fwd(randn(4, 7), None, "swiglu", 0.0, None), ValueError, "even"),
        ("ffn_bias", lambda: ops.ffn_act_fwd(x, randn(7), "gelu", 0.0, None), ValueError, "bias"),
        ("norm_weight", lambda: ops.layer_norm_fwd(x, None, randn(7), None, 1e-5), ValueError, "weight"),
        ("norm_residual", lambda: ops.rms_norm_fwd(x, randn(4, 7), None, 1e-5), ValueError, "residual"),
        ("softmax_mask", lambda: ops.softmax_fwd(x, torch.ones(4, 7, dtype=torch.bool), 1.0, False, False),
         ValueError, "mask"),
        ("softmax_bwd_shape", lambda: ops.softmax_bwd(randn(4, 7), x, 1.0, False), ValueError, "shape"),
    ]  # fmt: skip


@pytest.mark.parametrize("call", _bad_op_calls(), ids=lambda c: c[0])
def test_kernel_argument_errors(call):
    _, fn, exc, words = call
    with pytest.raises(exc, match=words):
        fn()


def test_empty_rows():
    x = randn(0, 16)
    assert ops.softmax_fwd(x, None, 1.0, False, False).shape == (0, 16)
    y, res, mean, rstd = ops.layer_norm_fwd(x, x, None, None, 1e-5)
    assert y.shape == (0, 16) and res.shape == (0, 16) and mean.shape == (0,)
    ds, dw = ops.rms_norm_bwd(x, x, randn(16), torch.empty(0))
    assert ds.shape == (0, 16) and (dw == 0).all()
    assert ops.ffn_act_fwd(randn(0, 8), None, "geglu", 0.0, None).shape == (0, 4)


# --------------------------------------------------------------------------------------------
# support reasons and tracing
# --------------------------------------------------------------------------------------------


def test_supports_gives_reasons():
    table = ext.load_kernels("cpu")
    q = randn(1, 2, 4, 16)
    facts = attention_call_facts(AttentionParams(1.0), q, q)
    assert table["attention"].supports(facts) is None
    assert "float64" in table["attention"].supports(attention_call_facts(AttentionParams(1.0), q.double(), q.double()))
    assert "cpu" in ext.unavailable_reason("cpu", "meta")
    cuda_table = ext.load_kernels("cuda")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::attention_fwd", "CUDA"):
        assert "no attention kernel" in cuda_table["attention"].supports(facts)


def test_compiles_fullgraph_through_the_ops():
    """torch.compile traces the ops through their fakes and autograd (aot_eager: no C++ codegen)."""
    q, k, v = (randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    x, w = randn(6, 32, requires_grad=True), randn(32, requires_grad=True)

    def block(q, k, v, x, w):
        attn = ops.attention_fwd(q, k, v, None, 0.25, True, 0.0, None)[0]
        y, s, _ = ops.rms_norm_fwd(x, x, w, 1e-6)
        return attn.sum() + ops.softmax_fwd(y, None, 1.0, False, True).exp().sum() + s.sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    args = (q, k, v, x, w)
    expected = block(*args)
    got = compiled(*args)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, args), torch.autograd.grad(expected, args)):
        torch.testing.assert_close(a, b)


def test_compiled_dropout_draws_the_seed_in_the_graph():
    """The ops take the seed as a tensor: torch.randint inside a fullgraph compile (no .item()), and
    the same torch.manual_seed gives the eager output and gradients (the backward reads the saved seed)."""
    q, k, v = (randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    h = randn(6, 20, requires_grad=True)

    def block(q, k, v, h):
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
        attn = ops.attention_fwd(q, k, v, None, 0.25, True, 0.3, seed)[0]
        return attn.square().sum() + ops.ffn_act_fwd(h, None, "swiglu", 0.4, seed).square().sum()

    def run(fn):
        torch.manual_seed(21)
        out = fn(q, k, v, h)
        return out, torch.autograd.grad(out, (q, k, v, h))

    torch._dynamo.reset()
    expected, expected_grads = run(block)
    got, grads = run(torch.compile(block, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(22)
    assert not torch.equal(block(q, k, v, h), expected)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_reference_dropout_keep_is_the_kernels_mask(p):
    """reference.dropout_keep (torch ops on the seed tensor, as the reference backend draws) is
    csrc/dropout_rng.h's Philox: the reference backend drops what the cpu/cuda kernels drop."""
    for seed, shape in ((0, (3, 50)), (2**31 - 5, (2, 3, 17, 29)), (123456789, (1, 1, 1, 1))):
        got = reference.dropout_keep(ext.seed_tensor(seed), shape, p)
        assert got.dtype == torch.bool and got.shape == shape
        assert torch.equal(got, ext.dropout_mask(shape, p, seed)), seed
