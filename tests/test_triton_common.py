"""fastattn/triton/common.py: the helpers the Triton kernel files share."""

from __future__ import annotations

import types

import pytest
import torch

triton = pytest.importorskip("triton")

from fastattn.triton import common  # noqa: E402


def test_next_power_of_2_matches_triton():
    for n in range(1, 5000):
        assert common.next_power_of_2(n) == triton.next_power_of_2(n), n


def test_num_warps_bounds():
    assert common.num_warps(1, 16, 16) == 4
    assert common.num_warps(32 * 16 * 8, 16, 16) == 8
    assert common.num_warps(1 << 20, 16, 16) == 16
    assert common.num_warps(1 << 20, 16, 32) == 32


def test_shared_memory_limit_is_per_device_and_read_once(monkeypatch):
    """Each device's limit comes from its own properties, read once per device index (lazily: not
    at import), and 0 for CPU tensors or without CUDA."""
    reads = []
    smem = {0: 166912, 1: 232448}

    def props(index):
        reads.append(index)
        return types.SimpleNamespace(shared_memory_per_block_optin=smem[index], multi_processor_count=100 + index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    common._shared_memory_of.cache_clear()
    common._sm_count_of.cache_clear()
    try:
        assert common.shared_memory_limit(torch.device("cuda", 0)) == 166912
        assert common.shared_memory_limit("cuda:1") == 232448
        assert common.shared_memory_limit() == 232448  # the current device
        assert common.shared_memory_limit(torch.device("cuda")) == 232448
        assert common.shared_memory_limit(torch.device("cpu")) == 0
        assert reads == [0, 1]
        assert common.sm_count(torch.device("cuda", 0)) == 100
        with pytest.raises(ValueError, match="device"):
            common.sm_count(torch.device("cpu"))
    finally:
        common._shared_memory_of.cache_clear()
        common._sm_count_of.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.shared_memory_limit("cuda:0") == 0
    assert common.capability() == 90


def test_kernel_files_import_the_shared_names():
    """One definition: the four files' flags and dtypes are common's objects."""
    from fastattn.triton import attention, ffn, norm, softmax

    for module in (attention, norm, softmax):
        assert module._INTERPRETING is common.INTERPRETING
        assert module._SUPPORTED_DTYPES is common.SUPPORTED_DTYPES
    assert ffn.SUPPORTED_DTYPES is common.SUPPORTED_DTYPES
    assert not hasattr(ffn, "_SHARED_MEMORY")  # no longer read at import
    assert attention.LOG2E == common.LOG2E
