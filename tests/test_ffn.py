"""fastattn.feed_forward on every backend against the float64 oracle (reference.py), with the
numerics rule: output k=2, gradients of x, w1, b1, w2, b2 k=3 (tests/helpers.assert_rule)."""

from __future__ import annotations

import helpers
import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import dispatch, reference
from fastattn.ops.feed_forward import FeedForwardCall
from fastattn.reference import ACTIVATIONS, GATED_ACTIVATIONS

BACKENDS = helpers.backend_params("triton", "cpu", "cuda", "reference")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# odd sizes: none a multiple of the 32-wide interpreter tiles (nor of the GPU's 64/128)
D_MODEL, HIDDEN, D_OUT = 45, 70, 29


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and helpers.HAS_CUDA) else "cpu"


def _make(lead, d_model, hidden, d_out, activation, dtype, device, bias=True):
    """Random x (*lead, d_model) and nn.Linear-like weights, all requiring grad."""
    rows1 = 2 * hidden if activation in GATED_ACTIVATIONS else hidden
    x = torch.randn(*lead, d_model, device=device, dtype=dtype)
    w1 = torch.randn(rows1, d_model, device=device, dtype=dtype) / d_model**0.5
    w2 = torch.randn(d_out, hidden, device=device, dtype=dtype) / hidden**0.5
    b1 = torch.randn(rows1, device=device, dtype=dtype) * 0.5 if bias else None
    b2 = torch.randn(d_out, device=device, dtype=dtype) * 0.5 if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, w1, b1, w2, b2)]


def _skip_unless_served(backend, args, activation, dropout_p=0.0):
    """Skip when a backend other than triton has no kernel for this call (the extension's FFN may
    not be built); triton must serve every fp16/bf16/fp32 call."""
    x, w1, b1, w2, b2 = args
    x2 = x.reshape(-1, x.size(-1))
    if backend == "triton":
        return
    with fastattn.use_backend(backend):
        try:
            dispatch.select("feed_forward", FeedForwardCall(x2.device.type, x2.dtype, activation, dropout_p > 0))
        except dispatch.BackendError as exc:
            pytest.skip(str(exc))


def _run(backend, args, activation, dropout_p=0.0, torch_seed=None, ffn=fastattn.feed_forward):
    if torch_seed is not None:
        torch.manual_seed(torch_seed)
    with fastattn.use_backend(backend):
        return ffn(*args, activation=activation, dropout_p=dropout_p)


def _grads(out, args, dout):
    inputs = [t for t in args if t is not None and t.requires_grad]
    return torch.autograd.grad(out, inputs, dout)


def _check_against_oracle(backend, args, activation, dropout_p=0.0, keep=None, torch_seed=None, ffn=fastattn.feed_forward):
    """Output and every gradient of ``backend`` vs the float64 oracle, with the rule; ``keep`` is the
    backend's dropout mask, replayed in the naive and oracle runs."""
    out = _run(backend, args, activation, dropout_p, torch_seed, ffn)
    dout = torch.randn_like(out)
    grads = _grads(out, args, dout)

    naive_args = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in args]
    naive = reference.feed_forward(*naive_args, activation, dropout_p, keep)
    naive_grads = _grads(naive, naive_args, dout)

    oracle_args = [t.detach().cpu().double().requires_grad_(t.requires_grad) if t is not None else None for t in args]
    oracle_keep = None if keep is None else keep.cpu()
    oracle = reference.feed_forward(*oracle_args, activation, dropout_p, oracle_keep)
    oracle_grads = _grads(oracle, oracle_args, dout.cpu().double())

    assert out.shape == oracle.shape and out.dtype == args[0].dtype
    helpers.assert_rule(out, naive, oracle, k=2, name="out")
    names = [n for n, t in zip(("x", "w1", "b1", "w2", "b2"), args) if t is not None and t.requires_grad]
    for name, g, g_naive, g_oracle in zip(names, grads, naive_grads, oracle_grads):
        assert g.shape == g_oracle.shape, name
        helpers.assert_rule(g, g_naive, g_oracle, k=3, name=f"d{name}", dtype=args[0].dtype)


# --------------------------------------------------------------------------------------------
# numerics: every activation, dtype, with and without biases, odd shapes with leading dims
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_oracle(backend, dtype, activation, bias):
    args = _make((3, 13), D_MODEL, HIDDEN, D_OUT, activation, dtype, _device(backend), bias)
    _skip_unless_served(backend, args, activation)
    _check_against_oracle(backend, args, activation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_geglu_tanh_is_the_tanh_gelu_gate(backend):
    """geglu_tanh = gelu_tanh(gate)·up with the gate's rows first (Hugging Face's gelu_pytorch_tanh
    gate of Gemma, Liger-Kernel's GEGLU), written here with torch directly, not the oracle; geglu uses
    the exact erf gelu, which differs measurably (issue 16 item 5)."""
    args = _make((5, 7), D_MODEL, HIDDEN, D_OUT, "geglu_tanh", torch.float32, _device(backend))
    _skip_unless_served(backend, args, "geglu_tanh")
    x, w1, b1, w2, b2 = args
    args[0] = x = (x.detach() * 3).requires_grad_()  # wide pre-activations: the two gelus differ there
    out = _run(backend, args, "geglu_tanh")
    leaves = [t.detach().cpu().double().requires_grad_() for t in args]
    xd, w1d, b1d, w2d, b2d = leaves
    gate, up = F.linear(xd, w1d[:HIDDEN], b1d[:HIDDEN]), F.linear(xd, w1d[HIDDEN:], b1d[HIDDEN:])
    expected = F.linear(F.gelu(gate, approximate="tanh") * up, w2d, b2d)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-4, atol=1e-4)
    exact = F.linear(F.gelu(gate) * up, w2d, b2d)
    assert (exact - expected).abs().max() > 1e-3  # so the check above tells the two apart
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, args, dout)
    want = torch.autograd.grad(expected, leaves, dout.cpu().double())
    for name, g, w in zip(("x", "w1", "b1", "w2", "b2"), got, want):
        torch.testing.assert_close(g.cpu().double(), w, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu", "geglu_tanh"])
def test_nan_in_nan_out(backend, activation):
    """A NaN input row gives a NaN output row, as torch's Linear -> act -> Linear (the fused relu
    turned NaN into 0, issue 16 item 12); the other rows are unaffected."""
    args = _make((6,), D_MODEL, HIDDEN, D_OUT, activation, torch.float32, _device(backend))
    _skip_unless_served(backend, args, activation)
    x = args[0].detach().clone()
    x[2, 3] = float("nan")
    args[0] = x.requires_grad_()
    out = _run(backend, args, activation)
    leaves = [t.detach().requires_grad_() for t in args]
    expected = reference.feed_forward(*leaves, activation)
    assert out[2].isnan().all()
    torch.testing.assert_close(out, expected, equal_nan=True, rtol=1e-4, atol=1e-4)
    dout = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, args[0], dout)
    (dx_torch,) = torch.autograd.grad(expected, leaves[0], dout)  # relu: finite (torch passes dy at NaN)
    torch.testing.assert_close(dx, dx_torch, equal_nan=True, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(dx[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_of_nan_pre_activation(backend):
    """relu(NaN) = NaN, as torch.relu: a NaN bias entry makes one NaN column of h, which reaches
    every output through w2 (the fused relu made it 0, and the output finite)."""
    args = _make((4,), D_MODEL, HIDDEN, D_OUT, "relu", torch.float32, _device(backend))
    _skip_unless_served(backend, args, "relu")
    b1 = args[2].detach().clone()
    b1[5] = float("nan")
    args[2] = b1.requires_grad_()
    out = _run(backend, args, "relu")
    expected = reference.feed_forward(*[t.detach() for t in args], "relu")
    assert expected.isnan().all() and out.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("layout", ["x_transposed", "x_sliced", "weights_transposed", "leading_dims"])
def test_strided_inputs(backend, activation, layout):
    """Non-contiguous x and weights are read in place (or copied) with the same result."""
    device, dtype = _device(backend), torch.float16
    x, w1, b1, w2, b2 = _make((37,), D_MODEL, HIDDEN, D_OUT, activation, dtype, device)
    if layout == "x_transposed":  # (M, K) view of a (K, M) tensor: stride (1, M)
        x = x.detach().t().contiguous().t().requires_grad_()
    elif layout == "x_sliced":  # row stride K + 3
        x = torch.randn(37, D_MODEL + 3, device=device, dtype=dtype)[:, 1 : D_MODEL + 1].requires_grad_()
    elif layout == "weights_transposed":
        w1 = w1.detach().t().contiguous().t().requires_grad_()
        w2 = w2.detach().t().contiguous().t().requires_grad_()
    else:  # 4 leading dims, one of size 1, a transposed pair
        x = torch.randn(2, 1, 3, 7, D_MODEL, device=device, dtype=dtype).transpose(0, 3).requires_grad_()
    assert layout == "leading_dims" or not (x.is_contiguous() and w1.is_contiguous())
    args = [x, w1, b1, w2, b2]
    _skip_unless_served(backend, args, activation)
    _check_against_oracle(backend, args, activation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad(backend):
    """Frozen weights (fine-tuning only the input) and a frozen input both give the right grads."""
    args = _make((21,), D_MODEL, HIDDEN, D_OUT, "geglu", torch.float32, _device(backend))
    _skip_unless_served(backend, args, "geglu")
    x, w1, b1, w2, b2 = args
    w1.requires_grad_(False)
    b2.requires_grad_(False)
    _check_against_oracle(backend, args, "geglu")
    x.requires_grad_(False)
    w1.requires_grad_(True)
    _check_against_oracle(backend, args, "geglu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_upstream_gradient(backend):
    """out.sum().backward() hands the backward a stride-0 (expanded) gradient."""
    args = _make((19,), D_MODEL, HIDDEN, D_OUT, "silu", torch.float32, _device(backend))
    _skip_unless_served(backend, args, "silu")
    _run(backend, args, "silu").sum().backward()
    oracle_args = [t.detach().cpu().double().requires_grad_() for t in args]
    reference.feed_forward(*oracle_args, "silu").sum().backward()
    for name, t, o in zip(("x", "w1", "b1", "w2", "b2"), args, oracle_args):
        helpers.assert_rule(t.grad, o.grad.to(t.dtype), o.grad, k=3, name=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    device = _device(backend)
    x, w1, b1, w2, b2 = _make((0, 5), D_MODEL, HIDDEN, D_OUT, "swiglu", torch.float32, device)
    with fastattn.use_backend(backend):
        out = fastattn.feed_forward(x, w1, b1, w2, b2, activation="swiglu")
    assert out.shape == (0, 5, D_OUT)
    out.sum().backward()
    assert x.grad.shape == x.shape and w1.grad.shape == w1.shape
    assert torch.all(w1.grad == 0) and torch.all(b2.grad == 0)


# --------------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------------


def _probe_keep(backend, rows, hidden, dropout_p, torch_seed, device):
    """The keep-mask a backend applies for (torch_seed, rows, hidden), read from the backend's own
    output: relu with a large bias is positive everywhere and w2 = I copies it out, so an output
    element is zero exactly where dropout dropped it. Also checks the kept ones' 1/(1-p) scaling."""
    x = torch.randn(rows, 16, device=device)
    w1 = torch.randn(hidden, 16, device=device) * 0.1
    b1 = torch.full((hidden,), 4.0, device=device) + torch.rand(hidden, device=device)
    eye = torch.eye(hidden, device=device)
    out = _run(backend, [x, w1, b1, eye, None], "relu", dropout_p, torch_seed)
    undropped = F.linear(x, w1, b1)
    keep = out != 0
    torch.testing.assert_close(out[keep], undropped[keep] / (1 - dropout_p), rtol=1e-5, atol=1e-5)
    return keep


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_fraction_and_reproducibility(backend):
    device, p, rows, hidden = _device(backend), 0.3, 64, 96
    _skip_unless_served(backend, _make((rows,), 16, hidden, hidden, "relu", torch.float32, device), "relu", p)
    keep = _probe_keep(backend, rows, hidden, p, torch_seed=1, device=device)
    # 6144 Bernoulli(0.7) draws: the kept fraction is within 5 sigma (0.03) of 0.7
    assert abs(keep.float().mean().item() - (1 - p)) < 0.03
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])  # no repeated rows/cols
    assert torch.equal(_probe_keep(backend, rows, hidden, p, torch_seed=1, device=device), keep)
    assert not torch.equal(_probe_keep(backend, rows, hidden, p, torch_seed=2, device=device), keep)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_dropout_forward_backward_same_mask(backend, activation, dtype):
    """Output and gradients with dropout match the oracle replaying the backend's own mask, so the
    backward regenerates exactly the forward's mask."""
    device, p = _device(backend), 0.25
    args = _make((39,), D_MODEL, HIDDEN, D_OUT, activation, dtype, device)
    _skip_unless_served(backend, args, activation, p)
    keep = _probe_keep(backend, 39, HIDDEN, p, torch_seed=7, device=device)
    assert 0 < keep.sum() < keep.numel()
    _check_against_oracle(backend, args, activation, p, keep, torch_seed=7)


def test_triton_dropout_mask_generator_is_exact():
    """fastattn.triton.ffn.dropout_mask is the mask the kernels apply (forward and probe agree)."""
    if fastattn.backends()["triton"] is not None:
        pytest.skip(f"triton: {fastattn.backends()['triton']}")
    from fastattn import functional
    from fastattn.triton import ffn

    device, p, rows, hidden = helpers.DEVICE, 0.4, 45, 70
    torch.manual_seed(11)
    seed = functional._dropout_seed(p, device)  # the seed feed_forward draws after torch.manual_seed(11)
    expected = ffn.dropout_mask(seed, rows, hidden, p, device)
    assert expected.dtype == torch.bool and expected.shape == (rows, hidden)
    assert torch.equal(_probe_keep("triton", rows, hidden, p, torch_seed=11, device=device), expected)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def _valid(activation="gelu"):
    x, w1, b1, w2, b2 = _make((4, 5), 8, 12, 6, activation, torch.float32, "cpu")
    return dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2)


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda a: a.update(w1=torch.randn(12, 9)), ValueError, "w1"),
        (lambda a: a.update(w1=torch.randn(12)), ValueError, "w1"),
        (lambda a: a.update(w2=torch.randn(6, 13)), ValueError, "w2"),
        (lambda a: a.update(b1=torch.randn(11)), ValueError, "b1"),
        (lambda a: a.update(b2=torch.randn(7)), ValueError, "b2"),
        (lambda a: a.update(w1=torch.randn(12, 8, dtype=torch.float16)), TypeError, "w1"),
        (lambda a: a.update(b2=torch.randn(6, dtype=torch.bfloat16)), TypeError, "b2"),
        (lambda a: a.update(w2=torch.randn(6, 12, device="meta")), ValueError, "w2"),
        (lambda a: a.update(x=torch.randint(0, 3, (4, 5, 8))), TypeError, "x"),
        (lambda a: a.update(x=[[1.0] * 8]), TypeError, "x"),
    ],
)
def test_bad_input_names_argument(change, error, name):
    kwargs = _valid()
    change(kwargs)
    with pytest.raises(error, match=name):
        fastattn.feed_forward(**kwargs)


def test_bad_activation_and_dropout():
    kwargs = _valid()
    with pytest.raises(ValueError, match="activation"):
        fastattn.feed_forward(**kwargs, activation="tanh")
    with pytest.raises(ValueError, match="dropout_p"):
        fastattn.feed_forward(**kwargs, dropout_p=1.0)
    gated = _valid("swiglu")
    gated["w1"] = torch.randn(23, 8)  # an odd row count cannot split into gate and up
    with pytest.raises(ValueError, match="w1"):
        fastattn.feed_forward(**gated, activation="swiglu")


def test_triton_refuses_float64_with_reason():
    kwargs = {k: v.double() if v is not None else None for k, v in _valid().items()}
    with fastattn.use_backend("triton"), pytest.raises(dispatch.BackendError, match="triton"):
        fastattn.feed_forward(**kwargs)


# --------------------------------------------------------------------------------------------
# autotuning: the pruned configs fit A100/H100 for every dtype (pure Python, runs anywhere)
# --------------------------------------------------------------------------------------------


# Tiles ptxas spilled in the `make check-sass` sweeps (Triton 3.9 before the per-architecture budgets,
# and Triton 3.6): (capability, fp32, gated, backward) -> tiles
_SPILLED_FFN_TILES = {
    (90, False, False, False): {(128, 64, 64, 4, 4)},
    (90, False, True, False): {(64, 64, 64, 4, 4), (64, 128, 64, 8, 3)},
    (90, False, False, True): set(),
    (90, False, True, True): {(64, 64, 64, 4, 4), (64, 128, 64, 8, 3)},
    (90, True, False, False): {(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)},
    (90, True, True, False): {(128, 64, 64, 8, 3), (64, 64, 64, 4, 4)},
    (90, True, False, True): {(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)},
    (90, True, True, True): {(128, 64, 64, 8, 3), (64, 64, 64, 4, 4), (64, 64, 32, 4, 3)},
    (80, False, False, False): {(128, 64, 64, 4, 4)},
    (80, False, True, False): {(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)},
    (80, False, False, True): {(64, 64, 64, 4, 4)},
    (80, False, True, True): {(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4), (64, 64, 32, 4, 3)},
    (80, True, False, False): {(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4), (128, 64, 32, 4, 3)},
    (80, True, True, False): {(64, 64, 32, 4, 3)},
    (80, True, False, True): {(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 4)},
    (80, True, True, True): {(64, 64, 32, 4, 3)},
}


@pytest.mark.parametrize("shared_memory, capability", [(166912, 80), (232448, 90)], ids=["A100", "H100"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_triton_autotune_pruning(shared_memory, capability, dtype, gated):
    pytest.importorskip("triton")
    import triton

    from fastattn.triton import ffn

    x = torch.empty(0, dtype=dtype)
    for tiles, accumulators in ((ffn._FWD_TILES, 2 if gated else 1), (ffn._BWD_TILES, 3 if gated else 2)):
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_H": bh, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bm, bh, bk, w, st in tiles
        ]
        for m_bucket, hidden in ((64, 70), (16384, 4096), (65536, 11008)):
            args = {"x_ptr": x, "GATED": gated, "M_BUCKET": m_bucket, "H": hidden}
            kept = ffn._prune(configs, args, accumulators, shared_memory, capability)
            assert kept, (m_bucket, hidden)
            for c in kept:
                bm, bh, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_H"], c.kwargs["BLOCK_K"]
                w_tiles = 2 if gated else 1
                assert c.num_stages * (bm * bk + w_tiles * bh * bk) * x.element_size() <= shared_memory
                assert accumulators * bm * bh <= 96 * 32 * c.num_warps  # ptxas spills beyond
                # the tiles the static sweep saw spill on this architecture are never kept
                spilled = _SPILLED_FFN_TILES[(capability, x.element_size() == 4, gated, accumulators > w_tiles)]
                assert (bm, bh, bk, c.num_warps, c.num_stages) not in spilled
                assert bm <= 2 * m_bucket and bh < 2 * hidden
            # big 16-bit problems keep a 128-row tile (sm_80's gated tiles that wide spill)
            if m_bucket >= 16384 and dtype != torch.float32 and (capability == 90 or not gated):
                assert any(c.kwargs["BLOCK_M"] == 128 for c in kept)


def test_triton_fixed_config_without_autotuning(monkeypatch):
    """FASTATTN_AUTOTUNE=0 (the GPU check's tests) gives the FFN kernels one config, one both tile
    lists hold, that fits A100 shared memory and the register limit for every dtype, gated or not."""
    pytest.importorskip("triton")
    from fastattn.triton import common, ffn

    monkeypatch.setattr(common, "INTERPRETING", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("FASTATTN_AUTOTUNE", "0")
    (config,) = ffn._configs(ffn._FWD_TILES)
    bm, bh, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_H"], config.kwargs["BLOCK_K"]
    assert (bm, bh, bk, config.num_warps, config.num_stages) == ffn._FIXED_TILE
    assert ffn._FIXED_TILE in ffn._FWD_TILES and ffn._FIXED_TILE in ffn._BWD_TILES
    assert len(ffn._configs(ffn._BWD_TILES)) == 1
    for dtype in DTYPES:
        size = torch.empty(0, dtype=dtype).element_size()
        assert config.num_stages * (bm * bk + 2 * bh * bk) * size <= 166912
    assert 3 * bm * bh <= 96 * 32 * config.num_warps  # the gated backward's three accumulators
    monkeypatch.setenv("FASTATTN_AUTOTUNE", "1")
    assert len(ffn._configs(ffn._FWD_TILES)) == len(ffn._FWD_TILES)


# --------------------------------------------------------------------------------------------
# activation memory: what the backward keeps
# --------------------------------------------------------------------------------------------


def _saved_activation_bytes(fn, params) -> int:
    """Bytes of the distinct tensors autograd saves for the backward, parameters excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params if p is not None}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _torch_block(x, w1, b1, w2, b2, activation, dropout_p):
    h = F.linear(x, w1, b1)
    return F.linear(F.dropout(reference.activate(h, activation), dropout_p), w2, b2)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_triton_saves_less_than_torch(activation):
    """The Triton block keeps x only (and the 8-byte seed tensor): per token K·s bytes vs torch's
    (K + 2H)·s + H (gated: K + 4H)."""
    if fastattn.backends()["triton"] is not None:
        pytest.skip(f"triton: {fastattn.backends()['triton']}")
    rows, d_model, hidden = 33, 40, 72
    x, w1, b1, w2, b2 = _make((rows,), d_model, hidden, d_model, activation, torch.float16, helpers.DEVICE)
    params = (w1, b1, w2, b2)

    def ours():
        with fastattn.use_backend("triton"):
            fastattn.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=0.1)

    ours_bytes = _saved_activation_bytes(ours, params)
    torch_bytes = _saved_activation_bytes(lambda: _torch_block(x, w1, b1, w2, b2, activation, 0.1), params)
    assert ours_bytes == x.numel() * x.element_size() + 8  # x and the dropout seed (one int64)
    assert ours_bytes <= 0.6 * torch_bytes, (ours_bytes, torch_bytes)


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _compiled_matches_oracle(backend, compile_backend, activation="swiglu", dtype=torch.float32):
    args = _make((5, 7), D_MODEL, HIDDEN, D_OUT, activation, dtype, _device(backend))
    _skip_unless_served(backend, args, activation)
    torch._dynamo.reset()

    def block(x, w1, b1, w2, b2, activation, dropout_p):
        return fastattn.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p)

    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
    _check_against_oracle(backend, args, activation, ffn=compiled)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_compile_fullgraph_cpu(backend):
    """fullgraph tracing (fake tensors, the autograd registration) on the CPU; aot_eager keeps it
    free of a C++ compile. Triton here runs in the interpreter."""
    reason = fastattn.backends()[backend]
    if reason is not None or (backend == "triton" and helpers.HAS_CUDA):
        pytest.skip(reason or "the triton backend runs on the GPU here: see test_compile_fullgraph_triton_gpu")
    _compiled_matches_oracle(backend, "aot_eager")


def _compiled_dropout_matches_eager_mask(backend, compile_backend, activation="swiglu"):
    """fullgraph=True with dropout (the seed tensor is drawn in the graph, no .item()): the compiled
    output and gradients match the oracle replaying the mask eager draws after the same
    torch.manual_seed, so the compiled forward draws eager's mask and its backward regenerates it."""
    device, p = _device(backend), 0.3
    args = _make((39,), D_MODEL, HIDDEN, D_OUT, activation, torch.float32, device)
    _skip_unless_served(backend, args, activation, p)
    torch._dynamo.reset()

    def block(x, w1, b1, w2, b2, activation, dropout_p):
        return fastattn.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p)

    compiled = torch.compile(block, fullgraph=True, backend=compile_backend)
    keep = _probe_keep(backend, 39, HIDDEN, p, torch_seed=7, device=device)
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(_probe_keep(backend, 39, HIDDEN, p, torch_seed=7, device=device), keep)
    _check_against_oracle(backend, args, activation, p, keep, torch_seed=7, ffn=compiled)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_compile_fullgraph_dropout_cpu(backend):
    """As test_compile_fullgraph_cpu, with dropout; Triton runs in the interpreter."""
    reason = fastattn.backends()[backend]
    if reason is not None or (backend == "triton" and helpers.HAS_CUDA):
        pytest.skip(reason or "the triton backend runs on the GPU here: see test_compile_fullgraph_dropout_triton_gpu")
    _compiled_dropout_matches_eager_mask(backend, "aot_eager")


@pytest.mark.gpu
def test_compile_fullgraph_dropout_triton_gpu():
    """Inductor draws torch.randint with its own RNG unless fallback_random: keep torch's, so the
    compiled mask is eager's."""
    with torch._inductor.config.patch(fallback_random=True):
        _compiled_dropout_matches_eager_mask("triton", "inductor", "geglu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_compile_fullgraph_triton_gpu(dtype):
    _compiled_matches_oracle("triton", "inductor", "geglu", dtype)


# --------------------------------------------------------------------------------------------
# GPU: real tile configs at larger odd shapes, peak memory against torch's block
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_triton_gpu_large_odd_shapes(dtype, activation):
    args = _make((3, 701), 1000, 1366, 517, activation, dtype, "cuda")
    _check_against_oracle("triton", args, activation)
    keep = _probe_keep("triton", 2103, 1366, 0.1, torch_seed=5, device="cuda")
    _check_against_oracle("triton", args, activation, 0.1, keep, torch_seed=5)


def _peak_bytes(step) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_triton_gpu_peak_memory_vs_torch(activation):
    """A stack of 4 residual FFN blocks, forward + backward: peak memory above the weights and input
    is at most 0.6x torch's Linear -> act -> Linear (which keeps h and act(h) of every block)."""
    rows, d_model, hidden, depth = 8192, 1024, 4096, 4
    blocks = [_make((1,), d_model, hidden, d_model, activation, torch.float16, "cuda")[1:] for _ in range(depth)]
    x = torch.randn(rows, d_model, device="cuda", dtype=torch.float16, requires_grad=True)

    def step(ffn):
        def run():
            y = x
            for w1, b1, w2, b2 in blocks:
                y = y + ffn(y, w1, b1, w2, b2)
            y.backward(torch.ones_like(y))
            for t in [x] + [p for blk in blocks for p in blk]:
                t.grad = None

        return run

    def ours(y, w1, b1, w2, b2):
        with fastattn.use_backend("triton"):
            return fastattn.feed_forward(y, w1, b1, w2, b2, activation=activation, dropout_p=0.1)

    def torch_block(y, w1, b1, w2, b2):
        return _torch_block(y, w1, b1, w2, b2, activation, 0.1)

    step(ours)()  # warm up: autotuning and cuBLAS workspaces allocate
    step(torch_block)()
    ours_peak = _peak_bytes(step(ours))
    torch_peak = _peak_bytes(step(torch_block))
    print(f"peak fwd+bwd over weights: fastattn {ours_peak / 2**20:.0f} MiB, torch {torch_peak / 2**20:.0f} MiB")
    assert ours_peak <= 0.6 * torch_peak


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_every_requires_grad_subset(backend, bias):
    """Each non-empty subset of (x, w1, b1, w2, b2) requiring grad (LoRA-style frozen weights, a frozen
    input without biases...) gives the oracle's gradients; the unneeded ones must not alias."""
    import itertools

    args = _make((21,), D_MODEL, HIDDEN, D_OUT, "gelu", torch.float32, _device(backend), bias)
    _skip_unless_served(backend, args, "gelu")
    present = [i for i, t in enumerate(args) if t is not None]
    for mask in itertools.product([False, True], repeat=len(present)):
        if not any(mask):
            continue
        for i, wanted in zip(present, mask):
            args[i].requires_grad_(wanted)
        _check_against_oracle(backend, args, "gelu")


def test_missing_w1_names_the_argument():
    x, _, _, w2, _ = _make((3,), D_MODEL, HIDDEN, D_OUT, "gelu", torch.float32, "cpu")
    with pytest.raises(TypeError, match="w1"):
        fastattn.feed_forward(x, None, None, w2)
