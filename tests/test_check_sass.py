"""The static SASS check (benchmarks/check_sass.py): its parsers, occupancy, verdicts, and one real
compile of the attention forward for sm_90a (no GPU needed: Triton compiles for a GPUTarget)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import check_sass as C

ROOT = Path(__file__).resolve().parent.parent

# A loop with a masked branch (the @P0 BRA skips 3 instructions), nested inside an outer loop.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/               @P0 BRA 0x80 ;
        /*0050*/                   FSEL R3, R3, -INF , P1 ;
        /*0060*/                   FSEL R4, R4, -INF , P1 ;
        /*0070*/                   FSEL R5, R5, -INF , P1 ;
        /*0080*/                   FFMA R6, R6, R7, -R8 ;
        /*0090*/                   HGMMA.64x128x16.F32.BF16 R56, gdesc[UR12], R56 ;
        /*00a0*/               @P2 BRA 0x10 ;
        /*00b0*/                   IADD3 R9, R9, 0x1, RZ ;
        /*00c0*/               @P3 BRA 0x0 ;
        /*00d0*/                   EXIT ;
"""


def test_hot_loop_is_the_innermost_and_its_shortest_path_skips_the_mask():
    loop = C.hot_loop(C.parse_sass(SASS), "HGMMA")
    # inner loop 0x10..0xa0: 10 instructions, the shortest path jumps over the three FSELs
    assert loop == {"loop_instructions": 10, "path_instructions": 7, "loop_mma": 3}


def test_no_loop_without_tensor_core_instructions():
    assert C.hot_loop(C.parse_sass(SASS.replace("HGMMA", "FMUL")), "HGMMA") is None


@pytest.mark.parametrize(
    "registers, smem, warps, target, expected",
    [
        (255, 0, 8, "sm_90a", 8),  # 256 regs/thread x 256 threads = the whole register file
        (128, 0, 4, "sm_90a", 16),  # 64K / (128·32) = 16 warps
        (168, 0, 4, "sm_90a", 12),  # 168 -> 5376 per warp (256-granular): 12 warps
        (32, 0, 4, "sm_90a", 64),  # capped at 64 warps per SM
        (64, 229376, 8, "sm_90a", 8),  # 224 KiB + 1 KiB reserved: one block per SM
        (64, 98304, 4, "sm_80", 4),  # 96 KiB + 1 KiB of 164 KiB: one block
        (64, 80 * 1024, 4, "sm_80", 8),  # 81 KiB each: two blocks in 164 KiB
    ],
)
def test_occupancy(registers, smem, warps, target, expected):
    assert C.occupancy_warps_per_sm(registers, smem, warps, C.TARGETS[target]) == expected


def _row(**kw):
    row = dict(family="attention", kernel="_attn_fwd_kernel", case="bf16 d128", config="128x128 w8 s3",
               role="autotune", target="sm_90a", registers=200, spill_bytes=0, smem_bytes=229376,
               occupancy_warps=8, mma=16, serialized=False, path_instructions=500)
    row.update(kw)
    return row


def test_failures_name_each_defect():
    assert C.failures([_row()]) == []
    assert any("C7515" in f for f in C.failures([_row(serialized=True)]))
    assert any("spills" in f for f in C.failures([_row(spill_bytes=8)]))
    assert any("shared memory" in f for f in C.failures([_row(smem_bytes=240 * 1024)]))
    assert any("tutorial" in f for f in C.failures([_row(path_instructions=C.LOOP_BUDGET[128] + 1)]))
    assert any("not among the kept" in f for f in C.failures([_row(config="128x64 w8 s2")]))
    assert any("does not compile" in f for f in C.failures([{**_row(), "error": "boom"}]))


def test_attention_forward_compiles_for_hopper_without_serialized_wgmma(tmp_path):
    """One real compile (d128, 128x128, 3 stages, sm_90a) through the tool, in a subprocess: the
    tests run the Triton kernels interpreted, the tool needs them compiled."""
    script = (
        "import os, json, sys, torch\n"
        "os.environ['TRITON_INTERPRET'] = '0'\n"
        "from benchmarks import check_sass as C\n"
        "from fastattn.triton import attention as A\n"
        "q = torch.empty(1, 2, 4096, 128, dtype=torch.bfloat16, device='meta')\n"
        "with C.recorded_launches(A) as log:\n"
        "    C._raw(A.attention_fwd)(q, q, q, None, 0.125, False, 0.0, 0)\n"
        "job = C._jobs_for('attention', log[0], 'bf16 d128', [({'BLOCK_M': 128, 'BLOCK_N': 128}, 8, 3, 'autotune')],\n"
        "                  C.TARGETS['sm_90a'], loop=True)[0]\n"
        "print(json.dumps(C.run_job(job)))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in row, row
    assert not row["serialized"] and row["spill_bytes"] == 0
    assert row["smem_bytes"] == 229376  # Q + 3 stages of K and V: the 224 KiB the prune expects
    assert row["mma"] > 0 and row["path_instructions"] <= C.LOOP_BUDGET[128]
