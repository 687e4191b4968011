"""fastattn.cpu_routing.cpu_loses: its contract, and its data against the committed measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastattn import cpu_routing
from fastattn.cpu_routing import FAMILIES, MEASURED, cpu_loses, table_from_results

REPO = Path(__file__).resolve().parent.parent
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cells():
    return [(family, dtype, rows, cols, ratio)
            for (family, dtype), cells in sorted(MEASURED.items()) for (rows, cols), ratio in sorted(cells.items())]


def test_table_is_the_committed_measurement():
    """MEASURED is what table_from_results computes from the results file it cites, per family the
    worse of its ops (softmax and log_softmax; layer_norm with and without the residual)."""
    path = REPO / cpu_routing.SOURCE
    assert MEASURED == table_from_results(path)
    rows = json.loads(path.read_text())["rows"]
    for family, dtype, r, c, ratio in _cells():
        ops = {"softmax": ("softmax", "log_softmax"), "layer_norm": ("layer_norm", "layer_norm_residual"),
               "rms_norm": ("rms_norm",)}[family]
        measured = [x["ratio"] for x in rows if x["op"] in ops and x["dtype"] == dtype and x["mode"] == "fwd"
                    and (x["rows"], x["cols"]) == (r, c)]
        assert measured and abs(min(measured) - ratio) < 1e-3


def test_every_family_and_dtype_measured():
    for family in FAMILIES:
        for dtype in ("float32", "bfloat16"):
            assert MEASURED.get((family, dtype)), (family, dtype)


@pytest.mark.parametrize("family, dtype, rows, cols, ratio", _cells())
def test_measured_cells(family, dtype, rows, cols, ratio):
    """A measured win gives None; a measured loss a one-line reason naming the op, size and ratio."""
    reason = cpu_loses(family, rows, cols, getattr(torch, dtype))
    if ratio >= 1.0:
        assert reason is None
    else:
        assert isinstance(reason, str) and "\n" not in reason
        assert family in reason and f"{rows}x{cols}" in reason and f"{ratio:.2f}x" in reason
        assert "nearest" not in reason  # an exact cell cites itself


@pytest.mark.parametrize("family, dtype, rows, cols, ratio", _cells())
def test_unmeasured_size_takes_the_nearest_cell(family, dtype, rows, cols, ratio):
    reason = cpu_loses(family, rows + 1, cols, dtype)
    assert (reason is None) == (ratio >= 1.0)
    if reason is not None:
        assert f"nearest measured cell {rows}x{cols}" in reason and f"{ratio:.2f}x" in reason


@pytest.mark.parametrize("family", FAMILIES)
def test_float16_takes_bfloat16_cells(family):
    for (rows, cols) in MEASURED[(family, "bfloat16")]:
        assert (cpu_loses(family, rows, cols, torch.float16) is None) == (
            cpu_loses(family, rows, cols, torch.bfloat16) is None)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_types(family, dtype):
    for rows, cols in ((1, 1), (4, 16), (2048, 1024), (1, 262144), (10**6, 7)):
        out = cpu_loses(family, rows, cols, dtype)
        assert out is None or (isinstance(out, str) and out)
    assert cpu_loses(family, 4, 16, str(dtype).removeprefix("torch.")) == cpu_loses(family, 4, 16, dtype)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="family"):
        cpu_loses("attention", 4, 16, torch.float32)
    with pytest.raises(TypeError, match="rows"):
        cpu_loses("softmax", 4.0, 16, torch.float32)
    with pytest.raises(TypeError, match="cols"):
        cpu_loses("softmax", 4, True, torch.float32)
    with pytest.raises(ValueError, match="rows"):
        cpu_loses("softmax", 0, 16, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        cpu_loses("softmax", 4, 16, torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        cpu_loses("softmax", 4, 16, 32)
