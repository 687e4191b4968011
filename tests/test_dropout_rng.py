"""One dropout RNG on every backend (csrc/dropout_rng.h, fastattn/triton/dropout.py): Philox 4x32-10,
element (s, r, c) of a shape read as (S, R, C) takes word c % 4 of philox(counter (c // 4, r, s, 0),
key = seed), kept iff word >= the uint32 threshold of p.

Checked against an oracle written apart from the kernels (tests/helpers.py, NumPy, itself checked
against Random123's known-answer vectors): the extension's dropout_mask (cpu, and cuda on a GPU),
the Triton attention and FFN mask generators (interpreter without a GPU) and reference.dropout_keep
give exactly the oracle's mask; and end to end, the same torch.manual_seed makes the cpu and triton
backends drop the same elements in attention and in the FFN (outputs and gradients equal to
float32 rounding).
"""

import math

import pytest
import torch
from helpers import DEVICE, HAS_CUDA, backend_params, dropout_keep_oracle, philox4x32_10

import fastattn
from fastattn import reference

CPU_REASON = fastattn.backends()["cpu"]
needs_cpu_ext = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu extension: {CPU_REASON}")
TRITON_PARAM = backend_params("triton")[0]
needs_triton = pytest.mark.skipif(bool(TRITON_PARAM.marks), reason="triton: not available here")

# attention (B, Hq, Nq, Nk) and FFN (M, hidden) shapes: odd sizes, B > 1, Hq > 1, hidden % 4 != 0
ATTENTION_SHAPES = [(2, 3, 13, 37), (1, 1, 1, 1), (3, 2, 5, 6), (1, 3, 33, 40)]
FFN_SHAPES = [(13, 37), (1, 5), (39, 66), (7, 64)]
SEEDS = [0, 12345, -7, 2**62 + 3, -(2**63)]
PS = [1e-6, 0.1, 0.3, 0.77, 0.999]


def _seed(seed, device="cpu"):
    return torch.tensor([seed], dtype=torch.int64, device=device)


# --------------------------------------------------------------------------------------------
# the oracle and the scheme
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123 kat_vectors, philox4x32 with 10 rounds
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((2**32 - 1,) * 4, (2**32 - 1,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_oracle_is_philox4x32_10(counter, key, expected):
    assert tuple(int(w) for w in philox4x32_10(*counter, *key)) == expected


@pytest.mark.parametrize("p", [0.0, 1e-12, 1e-6, 0.1, 0.3, 0.5, 0.9, 1 - 1e-9])
def test_threshold_is_p_to_float32_rounding(p):
    """P(drop) = threshold / 2^32 is p up to float32 rounding (and the cap below 2^32)."""
    t = reference.dropout_threshold(p)
    assert 0 <= t < 2**32 and isinstance(t, int)
    assert abs(t / 2**32 - p) <= p * 2**-24 + 2**-32 + (2**-24 if p > 1 - 2**-24 else 0)
    assert (t == 0) == (p == 0.0)


# --------------------------------------------------------------------------------------------
# every mask generator is the oracle's mask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ATTENTION_SHAPES + FFN_SHAPES, ids=str)
def test_reference_dropout_keep_is_the_oracle(shape):
    for seed in SEEDS:
        for p in PS:
            got = reference.dropout_keep(_seed(seed), shape, p)
            assert torch.equal(got, dropout_keep_oracle(seed, shape, p)), (seed, p)


@needs_cpu_ext
@pytest.mark.parametrize("shape", ATTENTION_SHAPES + FFN_SHAPES + [(2, 3, 4, 5, 9), (11,)], ids=str)
def test_cpu_dropout_mask_is_the_oracle(shape):
    from fastattn import ext

    for seed in SEEDS:
        for p in PS:
            assert torch.equal(ext.dropout_mask(shape, p, seed), dropout_keep_oracle(seed, shape, p)), (seed, p)


@needs_triton
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=str)
def test_triton_attention_mask_is_the_oracle(shape):
    from fastattn.triton.attention import dropout_keep_mask

    for seed in SEEDS[1:3]:
        for p in (0.1, 0.77):
            got = dropout_keep_mask(seed, *shape, p, DEVICE).cpu()
            assert torch.equal(got, dropout_keep_oracle(seed, shape, p)), (seed, p)


@needs_triton
@pytest.mark.parametrize("shape", FFN_SHAPES, ids=str)
def test_triton_ffn_mask_is_the_oracle(shape):
    from fastattn.triton import ffn

    for seed in SEEDS[:3]:
        for p in (0.1, 0.77):
            got = ffn.dropout_mask(seed, *shape, p, DEVICE).cpu()
            assert torch.equal(got, dropout_keep_oracle(seed, shape, p)), (seed, p)


@pytest.mark.gpu
@needs_cpu_ext
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", ATTENTION_SHAPES + FFN_SHAPES, ids=str)
def test_cuda_dropout_mask_is_the_cpu_mask(shape):
    from fastattn import ext

    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::dropout_mask", "CUDA"):
        pytest.skip("no CUDA kernels in fastattn._C")
    for seed in SEEDS:
        got = ext.dropout_mask(shape, 0.3, _seed(seed, "cuda"), "cuda").cpu()
        assert torch.equal(got, ext.dropout_mask(shape, 0.3, seed)), seed


def test_mask_statistics():
    """The scheme's keep rate is 1 - p, per column lane, per row and per stream (no lane of a Philox
    call and no stream biased), and neighbouring seeds are unrelated."""
    p, shape = 0.3, (4, 8, 64, 64)
    keep = dropout_keep_oracle(99, shape, p).float()
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    for lane in range(4):
        assert abs(keep[..., lane::4].mean().item() - (1 - p)) < 5 * 2 * sigma
    per_stream = keep.reshape(32, -1).mean(1)
    assert (per_stream - (1 - p)).abs().max().item() < 5 * math.sqrt(32) * sigma
    other = dropout_keep_oracle(100, shape, p).float()
    # two independent masks agree on p² + (1-p)² of the elements
    agree = (keep == other).float().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01


# --------------------------------------------------------------------------------------------
# end to end: the same torch.manual_seed drops the same elements on cpu and triton
# --------------------------------------------------------------------------------------------


# The seed is drawn from the generator of the inputs' device: both backends draw it on the CPU only
# under the interpreter (on a GPU the mask tests above cover triton).
same_generator = pytest.mark.skipif(DEVICE != "cpu", reason="cpu and triton inputs live on different devices")


def _run(backend, seed, fn):
    torch.manual_seed(seed)
    with fastattn.use_backend(backend):
        return fn()


@needs_cpu_ext
def test_cpu_attention_dropout_is_reference_with_the_mask():
    """The extension's attention with dropout is reference.attention replaying dropout_mask."""
    from fastattn import ext

    q, k, v = torch.randn(2, 4, 19, 24), torch.randn(2, 2, 23, 24), torch.randn(2, 2, 23, 8)
    seed = _seed(2024)
    out = torch.ops.fastattn.attention_fwd(q, k, v, None, 0.2, True, 0.35, seed)[0]
    keep = ext.dropout_mask((2, 4, 19, 23), 0.35, seed)
    expected = reference.attention(
        q.double(), k.double(), v.double(), None, 0.35, True, 0.2, True, dropout_mask=keep
    )
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


@needs_cpu_ext
@needs_triton
@same_generator
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_dropout_cpu_equals_triton(is_causal):
    q = torch.randn(2, 4, 21, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 27, 32, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 2, 27, 16, device=DEVICE, requires_grad=True)
    dout = torch.randn(2, 4, 21, 16, device=DEVICE)
    results = []
    for backend in ("cpu", "triton"):
        args = [t.detach().to("cpu" if backend == "cpu" else DEVICE).requires_grad_() for t in (q, k, v)]

        def call(args=args):
            return fastattn.scaled_dot_product_attention(*args, dropout_p=0.3, is_causal=is_causal, enable_gqa=True)

        out = _run(backend, 17, call)
        out.backward(dout.to(out.device))
        results.append([out.detach().cpu()] + [a.grad.cpu() for a in args])
    for name, got, expected in zip(("out", "dq", "dk", "dv"), results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)
    # the dropout took effect: without it, the output differs
    plain = _run(
        "cpu",
        17,
        lambda: fastattn.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(), is_causal=is_causal, enable_gqa=True),
    )
    assert (plain - results[0][0]).abs().max() > 0.1


@needs_cpu_ext
@needs_triton
@same_generator
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_feed_forward_dropout_cpu_equals_triton(activation):
    rows, d_model, hidden, d_out = 37, 24, 42, 20  # hidden % 4 != 0, rows odd
    width = 2 * hidden if activation == "swiglu" else hidden
    x = torch.randn(rows, d_model)
    w1, b1 = torch.randn(width, d_model) * 0.2, torch.randn(width) * 0.1
    w2, b2 = torch.randn(d_out, hidden) * 0.2, torch.randn(d_out) * 0.1
    dout = torch.randn(rows, d_out)
    results = []
    for backend in ("cpu", "triton"):
        device = "cpu" if backend == "cpu" else DEVICE
        args = [t.to(device).requires_grad_() for t in (x, w1, b1, w2, b2)]

        def call(args=args):
            return fastattn.feed_forward(*args, activation=activation, dropout_p=0.4)

        out = _run(backend, 23, call)
        out.backward(dout.to(device))
        results.append([out.detach().cpu()] + [a.grad.cpu() for a in args])
    for name, got, expected in zip(("out", "dx", "dw1", "db1", "dw2", "db2"), results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=name)
    plain = _run("cpu", 23, lambda: fastattn.feed_forward(x, w1, b1, w2, b2, activation=activation))
    assert (plain - results[0][0]).abs().max() > 0.1
