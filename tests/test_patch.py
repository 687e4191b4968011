"""fastattn.patch / unpatch on a model built from torch modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_nn import _one_thread, backend_cases, check_against_torch  # noqa: F401  (_one_thread: autouse fixture)

import fastattn
import fastattn.nn as fnn

E, H, N, L = 32, 2, 2, 5


class CustomNorm(torch.nn.LayerNorm):
    """A user subclass: its forward may differ from torch's, so patch must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 0.5


class Model(torch.nn.Module):
    """Torch modules of every family patch knows, a subclass it must skip, and plain layers."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, E)
        layer = torch.nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(E), enable_nested_tensor=False)
        self.cross = torch.nn.MultiheadAttention(E, H, batch_first=True, kdim=16, vdim=16)
        self.rms = torch.nn.RMSNorm(E)
        self.custom = CustomNorm(E)
        self.head = torch.nn.Linear(E, 4)
        self.softmax = torch.nn.Softmax(dim=-1)

    def forward(self, x, memory, key_padding_mask):
        h = self.encoder(self.embed(x), src_key_padding_mask=key_padding_mask)
        h = h + self.cross(h, memory, memory, need_weights=False)[0]
        return self.softmax(self.head(self.custom(self.rms(h))))


def _inputs():
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1, -2:] = True
    return (torch.randn(N, L, 8, dtype=torch.float64), torch.randn(N, 3, 16, dtype=torch.float64)), padding


EXPECTED_SWAPS = {
    "encoder": "TransformerEncoder",
    "encoder.layers.0": "TransformerEncoderLayer",
    "encoder.layers.0.self_attn": "MultiheadAttention",
    "encoder.layers.0.norm1": "LayerNorm",
    "encoder.layers.1.norm2": "LayerNorm",
    "encoder.norm": "LayerNorm",
    "cross": "MultiheadAttention",
    "rms": "RMSNorm",
    "softmax": "Softmax",
}


def test_patch_swaps_in_place_and_keeps_parameters():
    model = Model()
    params_before = {name: p for name, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    hook_calls = []
    model.cross.register_forward_hook(lambda *args: hook_calls.append(1))

    report = fastattn.patch(model)

    swapped = dict(report.swapped)
    for name, kind in EXPECTED_SWAPS.items():
        assert type(model.get_submodule(name)) is getattr(fnn, kind), name
        assert swapped[name].startswith("torch.nn.") and "-> fastattn.nn." in swapped[name], swapped[name]
        assert swapped[name].endswith(f".{kind}"), swapped[name]
    # encoder + 2 layers × (layer, self_attn, norm1, norm2) + encoder.norm + cross + rms + softmax
    assert len(report.swapped) == 13
    skipped = dict(report.skipped)
    assert "custom" in skipped and "may override forward" in skipped["custom"]
    assert type(model.custom) is CustomNorm and type(model.embed) is torch.nn.Linear
    # the very same Parameter objects, the same keys
    assert all(p is params_before[name] for name, p in model.named_parameters())
    assert list(model.state_dict()) == keys_before
    (x, memory), padding = _inputs()
    model.float()(x.float(), memory.float(), padding)
    assert hook_calls == [1]
    text = str(report)
    assert f"{len(report.swapped)} swapped, 1 skipped" in text and "encoder.layers.0.self_attn" in text


@pytest.mark.parametrize("backend", backend_cases("attention", "layer_norm", "feed_forward", "rms_norm", "softmax"))
def test_patched_model_matches_torch(backend):
    model = Model()
    patched = copy.deepcopy(model)
    fastattn.patch(patched)
    (x, memory), padding = _inputs()
    check_against_torch(model, patched, (x, memory), {"key_padding_mask": padding}, backend=backend)


def test_patched_model_trains_with_an_optimizer_built_before():
    torch.manual_seed(1)
    model = Model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    fastattn.patch(model)
    (x, memory), padding = _inputs()
    x, memory = x.float(), memory.float()
    target = torch.randint(0, 4, (N, L))
    losses = []
    for _ in range(10):
        loss = F.nll_loss(model(x, memory, padding).clamp_min(1e-9).log().flatten(0, 1), target.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_unpatch_restores_torch_exactly():
    model = Model().float()
    (x, memory), padding = _inputs()
    x, memory = x.float(), memory.float()
    expected = model(x, memory, padding)
    patched_report = fastattn.patch(model)
    report = fastattn.unpatch(model)
    assert sorted(name for name, _ in report.swapped) == sorted(name for name, _ in patched_report.swapped)
    assert not any(type(m).__module__.startswith("fastattn") for m in model.modules())
    assert torch.equal(model(x, memory, padding), expected)  # torch's own code path again


def test_patch_twice_and_root_module():
    model = Model()
    fastattn.patch(model)
    again = fastattn.patch(model)
    assert again.swapped == []
    assert {name for name, why in again.skipped if why.startswith("already")} >= set(EXPECTED_SWAPS)
    mha = torch.nn.MultiheadAttention(E, H)
    report = fastattn.patch(mha)
    assert type(mha) is fnn.MultiheadAttention and report.swapped[0][0] == ""
    assert "<root>" in str(report)


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="model"):
        fastattn.patch(torch.randn(3))
    with pytest.raises(TypeError, match="model"):
        fastattn.unpatch("model")


class _MyLayerNorm(torch.nn.LayerNorm):
    pass


class _ShiftedLayerNorm(torch.nn.LayerNorm):
    def forward(self, input):  # noqa: A002
        return super().forward(input) + 1.0


def test_patch_model_whose_norms_subclass_torchs():
    """patch leaves norm subclasses alone, and the patched layers still compute with them (their own
    forward when overridden), as the unpatched model does."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True,
                                             dtype=torch.float64)
    layer.norm1, layer.norm2 = _MyLayerNorm(E, dtype=torch.float64), _ShiftedLayerNorm(E, dtype=torch.float64)
    x = torch.randn(N, L, E, dtype=torch.float64)
    expected = layer(x)
    report = fastattn.patch(layer)
    assert type(layer) is fnn.TransformerEncoderLayer
    assert {name for name, _ in report.skipped} >= {"norm1", "norm2"}
    assert type(layer.norm1) is _MyLayerNorm and type(layer.norm2) is _ShiftedLayerNorm
    torch.testing.assert_close(layer(x), expected)
