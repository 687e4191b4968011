"""The static SASS check (benchmarks/check_sass.py): its parsers, occupancy, verdicts, and one real
compile of the attention forward for sm_90a (no GPU needed: Triton compiles for a GPUTarget)."""

import json
import os
import shutil
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


# ---------------------------------------------------------------------------------------------
# the CUDA kernels: nvcc -Xptxas -v log and kept PTX (captured from nvcc 13.0, sm_80, be92196's
# attention_bwd.cu, cut to three kernels; the third's "smem" line and its PTX are written to match)
# ---------------------------------------------------------------------------------------------

_MMA = "_ZN8fastattn4cuda49_GLOBAL__N__fe37ecfb_16_attention_bwd_cu_79bab34824attention_bwd_mma_kernelI6__halfLi128ELi32ELi4EEEvNS0_18AttentionBwdParamsENS0_8VecFlagsE"  # noqa: E501
_SIMPLE = "_ZN8fastattn4cuda49_GLOBAL__N__fe37ecfb_16_attention_bwd_cu_79bab34827attention_bwd_simple_kernelI6__halfLi32ELi32ELi32EEEvNS0_18AttentionBwdParamsE"  # noqa: E501
_FWD = "_ZN8fastattn4cuda49_GLOBAL__N__fe37ecfb_16_attention_fwd_cu_79bab34824attention_fwd_mma_kernelI6__halfLi128ELi64ELi4ELi2EEEvNS0_18AttentionFwdParamsENS0_8VecFlagsEb"  # noqa: E501
PTXAS_LOG = f"""
ptxas info    : 12 bytes gmem
ptxas info    : Compiling entry function '{_MMA}' for 'sm_80'
ptxas info    : Function properties for {_MMA}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 836 bytes cmem[0], 384 bytes cmem[2]
ptxas info    : Compile time = 10260.062 ms
ptxas info    : Compiling entry function '{_SIMPLE}' for 'sm_80'
ptxas info    : Function properties for {_SIMPLE}
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 8 bytes cumulative stack size, 832 bytes cmem[0], 12 bytes cmem[2]
ptxas info    : Compile time = 1475.066 ms
ptxas info    : Compiling entry function '{_FWD}' for 'sm_80'
ptxas info    : Function properties for {_FWD}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 128 bytes smem, 624 bytes cmem[0]
"""
PTX = f"""
.extern .shared .align 16 .b8 _ZN8fastattn4cuda49_GLOBAL__N__fe37ecfb_16_attention_bwd_cu_79bab34821fastattn_dynamic_smemE[];

.entry {_MMA}(
	.param .align 8 .b8 {_MMA}_param_0[480]
)
.maxntid 128, 1, 1
{{
	mov.u32 	%r403, _ZN8fastattn4cuda49_GLOBAL__N__fe37ecfb_16_attention_bwd_cu_79bab34821fastattn_dynamic_smemE;
	mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{%f1, %f2, %f3, %f4}}, {{%r1, %r2, %r3, %r4}}, {{%r5, %r6}}, {{%f1, %f2, %f3, %f4}};
	mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{%f5, %f6, %f7, %f8}}, {{%r1, %r2, %r3, %r4}}, {{%r7, %r8}}, {{%f5, %f6, %f7, %f8}};
	red.global.add.f32 	[%rd1], %f9;
}}
.entry {_SIMPLE}(
	.param .align 8 .b8 {_SIMPLE}_param_0[480]
)
{{
	fma.rn.f32 	%f1, %f2, %f3, %f1;
}}
.visible .entry {_FWD}(
	.param .align 8 .b8 {_FWD}_param_0[400]
)
.maxntid 128, 1, 1
{{
	mov.u32 	%r3, _ZN8fastattn4cuda49_GLOBAL__N__fe37ecfb_16_attention_fwd_cu_79bab34821fastattn_dynamic_smemE;
	mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{%f1, %f2, %f3, %f4}}, {{%r1, %r2, %r3, %r4}}, {{%r5, %r6}}, {{%f1, %f2, %f3, %f4}};
}}
"""


def test_ptxas_log_parser_reads_registers_spills_and_static_smem():
    rows = C.parse_ptxas_log(PTXAS_LOG)
    assert [r["mangled"] for r in rows] == [_MMA, _SIMPLE, _FWD]
    assert [r["registers"] for r in rows] == [255, 96, 32]
    assert [r["spill_bytes"] for r in rows] == [0, 8, 0]  # stores + loads
    assert [r["stack_bytes"] for r in rows] == [0, 8, 0]
    assert [r["static_smem"] for r in rows] == [0, 0, 128]
    assert {r["target"] for r in rows} == {"sm_80"}


def test_ptx_entries_count_mma_and_read_the_launch_bound():
    entries = C.parse_ptx_entries(PTX)
    assert entries[_MMA] == {"mma": 2, "threads": 128, "dynamic_smem": True}
    assert entries[_SIMPLE] == {"mma": 0, "threads": None, "dynamic_smem": False}
    assert entries[_FWD] == {"mma": 1, "threads": 128, "dynamic_smem": True}


def test_kernel_names_split_into_name_and_template_arguments():
    name, args = C.split_kernel_name(
        "void fastattn::cuda::(anonymous namespace)::attention_bwd_dq_mma_kernel<__half, 128, 32, 4, 2>"
        "(fastattn::cuda::AttentionBwdParams, fastattn::cuda::VecFlags, bool)")
    assert (name, args) == ("attention_bwd_dq_mma_kernel", ["__half", "128", "32", "4", "2"])
    assert C.split_kernel_name("void fastattn::cuda::dropout_mask_kernel(bool*, long, fastattn::cuda::DropoutDraw)") == (
        "dropout_mask_kernel", [])
    assert C.split_kernel_name("void k<std::pair<int, int>, 3>(int)") == ("k", ["std::pair<int, int>", "3"])


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="needs c++filt (binutils) to demangle")
def test_cuda_rows_from_a_captured_compile():
    rows = C.cuda_rows("attention_bwd.cu", C.TARGETS["sm_80"], PTXAS_LOG, PTX)
    by_kernel = {r["kernel"]: r for r in rows}
    mma = by_kernel["attention_bwd_mma_kernel"]
    assert mma["config"] == "__half, 128, 32, 4" and mma["case"] == "attention_bwd.cu"
    assert (mma["registers"], mma["spill_bytes"], mma["mma"], mma["serialized"]) == (255, 0, 2, None)
    # attention_bwd_mma_kernel is gone from CUDA_DYNAMIC_SMEM (the split replaced it): unknown size
    assert mma["smem_unknown"] and any("dynamic shared memory" in f for f in C.failures([mma]))
    simple = by_kernel["attention_bwd_simple_kernel"]
    assert simple["occupancy_warps"] is None and any("8 bytes of spills" in f for f in C.failures([simple]))
    fwd = by_kernel["attention_fwd_mma_kernel"]
    # static 128 B + the launcher's (16·4 + 2·2·64)·(128 + 8)·2 B
    assert fwd["smem_bytes"] == 128 + (64 + 256) * 136 * 2 and not fwd["smem_unknown"]
    assert fwd["occupancy_warps"] == C.occupancy_warps_per_sm(32, fwd["smem_bytes"], 4, C.TARGETS["sm_80"])
    assert C.failures([fwd]) == []
    table = C.markdown(rows, {"date": "d", "triton": "t", "torch": "p", "commit": "c", "nvcc": "nvcc 13.0"})
    assert "| attention_fwd_mma_kernel | attention_bwd.cu | __half, 128, 64, 4, 2 | only | sm_80 | 32 | 0 |" in table
    assert table.count("| n/a |") == 3


def test_merge_keeps_the_rows_of_families_not_compiled_now():
    previous = {"stamp": {"commit": "abc", "date": "d0", "triton": "3.9"},
                "rows": [_row(), {**_row(), "family": "cuda", "kernel": "old_kernel"}]}
    rows, stamp = C.merge_rows(previous, [{**_row(), "family": "cuda", "kernel": "new_kernel"}], {"commit": "def"},
                               ["cuda"])
    assert [r["kernel"] for r in rows] == ["_attn_fwd_kernel", "new_kernel"]
    assert "attention rows from commit abc" in stamp["kept"] and stamp["commit"] == "def"


@pytest.mark.skipif(shutil.which(os.environ.get("NVCC", "nvcc")) is None, reason="needs nvcc")
@pytest.mark.parametrize("target", ["sm_80", "sm_90a"])
def test_compile_cuda_reads_a_real_nvcc_run(target):
    """One real nvcc compile of the smallest CUDA file (a few seconds): the log is parsed and the PTX
    nvcc keeps is found under the name it has for that -arch (dropout.ptx for sm_80,
    dropout.compute_90a.ptx for sm_90a), so the launch bound reaches the row."""
    rows = C.compile_cuda(ROOT / "csrc" / "cuda" / "dropout.cu", C.TARGETS[target], os.environ.get("NVCC", "nvcc"))
    assert len(rows) == 1 and "error" not in rows[0], rows
    row = rows[0]
    assert row["kernel"] == "dropout_mask_kernel" and row["target"] == target and row["case"] == "dropout.cu"
    assert row["threads"] == 256 and row["registers"] > 0 and row["spill_bytes"] == 0
    assert row["occupancy_warps"] == C.occupancy_warps_per_sm(row["registers"], 0, 8, C.TARGETS[target])
    assert C.failures(rows) == []
