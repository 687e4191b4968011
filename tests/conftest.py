"""Test set-up: without a GPU the Triton kernels run in the interpreter; outputs are poisoned."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any Triton kernel is defined (decoration time reads it).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FASTATTN_POISON_OUTPUTS"] = "1"
os.environ.pop("FASTATTN_BACKEND", None)

import pytest  # noqa: E402

# Tiny tensors gain nothing from intra-op threads, and with one pytest worker per core extra threads
# only oversubscribe the machine (seen: a 0.6 s test taking 10 s under load).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Every test draws fresh random inputs, but reproducibly from its own seed."""
    torch.manual_seed(0x5EED)
    yield
