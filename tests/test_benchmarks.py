"""The benchmark suite: its counting, its harness, a tiny run end to end, and the report generator."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import common, report, run

# ------------------------------------------------------------------------------------------------
# counting, against hand-computed cases
# ------------------------------------------------------------------------------------------------


def test_attention_flops_by_hand():
    # 4·B·H·N²·D = 4·2·3·128·128·64
    assert common.attention_flops(2, 3, 128, 128, 64) == 25_165_824
    assert common.attention_flops(2, 3, 128, 128, 64, causal=True) == 12_582_912
    assert common.attention_flops(2, 3, 128, 128, 64, mode="bwd") == 2.5 * 25_165_824
    assert common.attention_flops(2, 3, 128, 128, 64, causal=True, mode="fwd_bwd") == 3.5 * 12_582_912
    # Nq != Nk: 4·16·32·8; Dv != D: Q·Kᵀ 2·4·4·8 plus P·V 2·4·4·16
    assert common.attention_flops(1, 1, 16, 32, 8) == 16_384
    assert common.attention_flops(1, 1, 4, 4, 8, head_dim_v=16) == 256 + 512


def test_softmax_bytes_by_hand():
    # 4 rows of 1000 fp16: one tensor is 8000 bytes; fwd reads x, writes y; bwd reads y, dy, writes dx
    assert common.softmax_bytes(4, 1000, 2, "fwd") == 16_000
    assert common.softmax_bytes(4, 1000, 2, "bwd") == 24_000
    assert common.softmax_bytes(4, 1000, 2, "fwd_bwd") == 40_000


def test_norm_bytes_by_hand():
    # 8 rows of 100 fp32: a tensor is 3200 bytes, a parameter 400
    assert common.norm_bytes(8, 100, 4, "fwd", has_bias=True) == 3200 + 3200 + 400 + 400  # x, y, w, b
    assert common.norm_bytes(8, 100, 4, "bwd", has_bias=True) == 3 * 3200 + 400 + 400 + 400  # x dy dx, w, dw db
    assert common.norm_bytes(8, 100, 4, "fwd", has_bias=False) == 3200 + 3200 + 400
    assert common.norm_bytes(8, 100, 4, "bwd", has_bias=False) == 3 * 3200 + 400 + 400
    assert common.norm_bytes(8, 100, 4, "fwd_bwd") == 7200 + 10_800


def test_ffn_flops_by_hand():
    # M=10 tokens, 4 -> 8 -> 4: 2·10·4·8 + 2·10·8·4; gated doubles the first GEMM's rows
    assert common.ffn_flops(10, 4, 8) == 640 + 640
    assert common.ffn_flops(10, 4, 8, gated=True) == 1280 + 640
    assert common.ffn_flops(10, 4, 8, mode="bwd") == 2 * 1280
    assert common.ffn_flops(10, 4, 8, d_out=2, mode="fwd_bwd") == 3 * (640 + 320)


def test_metric_units():
    assert common.metric_value("tflops", 2e12, 500.0) == pytest.approx(4.0)  # 2 TFLOP in 0.5 s
    assert common.metric_value("gbps", 3e9, 1000.0) == pytest.approx(3.0)
    assert common.metric_value("tokens", 8192, 250.0) == pytest.approx(32_768)
    assert common.metric_value("gbps", 1e9, None) is None


def test_rotation_copies_exceed_the_cache():
    mib = 2**20
    assert common.rotation_copies(16 * mib, 32 * mib) == 4  # 4 copies = 64 MiB = twice the cache
    assert common.rotation_copies(1024, 32 * mib) == 8  # capped
    assert common.rotation_copies(256 * mib, 32 * mib) == 1
    assert common.rotation_copies(1024, 32 * mib, max_copies=1) == 1


def test_device_slugs():
    assert common.device_slug("NVIDIA H100 80GB HBM3", "cuda") == "nvidia-h100-80gb-hbm3"
    assert common.device_slug("Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "cpu") == "cpu-intel-xeon-platinum-8480"
    assert common.device_slug("AMD EPYC 7763 64-Core Processor", "cpu") == "cpu-amd-epyc-7763"


# ------------------------------------------------------------------------------------------------
# the harness
# ------------------------------------------------------------------------------------------------


def _square_workload(made: list) -> common.Workload:
    def make_inputs():
        x = torch.randn(64, requires_grad=True)
        made.append(x)
        return {"x": x}

    return common.Workload(make_inputs=make_inputs, forward=lambda s: s["x"] * s["x"])


def test_runner_modes_and_rotation():
    made = []
    runner = common.Runner(_square_workload(made), "bwd", copies=3)
    assert runner.copies == 3 and len(made) == 3
    for _ in range(3):  # one call per copy, in turn
        runner()
    for x, grad_out in zip(made, runner.grads):
        torch.testing.assert_close(x.grad, 2 * x.detach() * grad_out)  # d(x²)·dy
    runner.release()
    assert all(x.grad is None for x in made)

    made.clear()
    forward_only = common.Runner(_square_workload(made), "fwd", copies=2)
    forward_only()
    forward_only()
    assert all(x.grad is None for x in made)  # the inference forward builds no graph


def test_classify_error():
    assert common.classify_error(torch.OutOfMemoryError("CUDA out of memory"))[0] == "oom"
    assert common.classify_error(NotImplementedError("no kernel for D=512"))[0] == "unsupported"
    status, reason = common.classify_error(RuntimeError("something broke\nmore"))
    assert status == "error" and reason == "RuntimeError: something broke"


def test_cpu_peak_memory_matches_a_known_allocation():
    """torch.softmax forward of a 4 MiB fp32 input allocates its 4 MiB output; with the backward
    (grad_output prepared beforehand) also dx: 8 MiB. Measured as peak RSS in a subprocess."""
    ctx = common.default_context("cpu", "tiny")
    params = {"rows": 256, "N": 4096, "dtype": "float32"}
    items = [{"provider": "torch", "params": params, "mode": mode} for mode in ("fwd", "fwd_bwd")]
    items.append({"provider": "no-such-provider", "params": params, "mode": "fwd"})
    answers = {a["index"]: a for a in common.cpu_peak_memory("benchmarks.bench_softmax", ctx, items, timeout_s=120)}
    assert 0.85 * 4 <= answers[0]["peak_mem_mib"] <= 1.25 * 4, answers
    assert 0.85 * 8 <= answers[1]["peak_mem_mib"] <= 1.25 * 8, answers
    assert "no-such-provider" in answers[2]["error"]


# ------------------------------------------------------------------------------------------------
# a tiny run of the suite
# ------------------------------------------------------------------------------------------------


def test_tiny_run_writes_json_markdown_and_png(tmp_path):
    args = ["--size", "tiny", "--only", "softmax,attention", "--out", str(tmp_path), "--no-memory",
            "--no-progress", "--quiet", "--providers", "naive,torch,sdpa-math,fastattn-triton"]
    assert run.main(args) == 0

    attention = json.loads((tmp_path / "attention.json").read_text())
    for key in ("device_name", "device_slug", "driver", "torch", "triton", "cuda", "commit", "date"):
        assert key in attention["stamp"]
    assert attention["stamp"]["torch"] == torch.__version__
    ok = [r for r in attention["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == {"naive", "sdpa-math"}
    assert {r["mode"] for r in ok} == {"fwd", "bwd", "fwd_bwd"}
    for r in ok:
        assert r["time_ms"] > 0 and r["work"] > 0
        assert r["metric"] == pytest.approx(r["work"] / (r["time_ms"] * 1e-3) / 1e12)
    # a provider that cannot run, or was not selected, is listed with its reason
    providers = attention["providers"]
    assert providers["fastattn-triton"]["status"] == "missing" and providers["fastattn-triton"]["reason"]
    assert "not selected" in providers["sdpa-flash"]["reason"]
    assert providers["naive"]["status"] == "ok"

    softmax = json.loads((tmp_path / "softmax.json").read_text())
    assert {r["provider"] for r in softmax["results"] if r["status"] == "ok"} == {"naive", "torch"}
    pngs = sorted(tmp_path.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    markdown = (tmp_path / "attention.md").read_text()
    assert "| sequence length N |" in markdown and "`fastattn-triton`" in markdown


def test_run_arguments():
    assert run.parse_args([]).size == "full"
    assert run.parse_args(["--quick", "--only", "attention"]).size == "quick"
    assert run.parse_args(["--quick"]).families == list(run.FAMILIES)
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "no-such-family"])


def _fake_family():
    """A family whose providers fail in every way a real one can: runs, OOMs from x=2 on, cannot
    be built, does not support x=4."""

    def build(provider, params, ctx):
        if provider == "broken":
            raise NotImplementedError("no kernel here")

        def forward(s):
            if provider == "oom" and params["x"] >= 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
            if provider == "picky" and params["x"] == 4:
                raise ValueError("x=4 is not supported")
            return s["t"] * 2

        return common.Workload(make_inputs=lambda: {"t": torch.randn(8, requires_grad=True)}, forward=forward)

    cases = [common.Case(series="s", x=x, params={"x": x}, work={"fwd": 1e6, "fwd_bwd": 3e6}) for x in (1, 2, 4)]
    module = type("FakeFamily", (), {"FAMILY": "fake", "MODES": ("fwd", "fwd_bwd"), "METRIC": "gbps",
                                     "X_LABEL": "size x", "build": staticmethod(build)})
    return module, cases


def test_failures_are_recorded_with_their_reasons_never_dropped():
    module, cases = _fake_family()
    ctx = common.default_context("cpu", "tiny")
    providers = ["ok", "oom", "broken", "picky"]
    records = run.FamilyTimer(module, ctx, 60, run.Progress(0, enabled=False)).run(cases, providers)
    assert len(records) == len(cases) * len(providers) * 2  # every (case, provider, mode) is there
    status = {(r["provider"], r["x"], r["mode"]): (r["status"], r["reason"]) for r in records}
    assert all(status[("ok", x, m)][0] == "ok" for x in (1, 2, 4) for m in ("fwd", "fwd_bwd"))
    assert status[("oom", 1, "fwd")][0] == "ok"
    assert status[("oom", 2, "fwd")] == ("oom", "OutOfMemoryError: CUDA out of memory. Tried to allocate 1 GiB")
    assert status[("oom", 4, "fwd")] == ("skipped", "skipped: out of memory at size x 2")  # larger sizes skipped
    assert status[("broken", 4, "fwd_bwd")] == ("unsupported", "NotImplementedError: no kernel here")
    assert status[("picky", 4, "fwd")] == ("unsupported", "ValueError: x=4 is not supported")
    summary = run.provider_summary({p: None for p in providers} | {"absent": "not installed"}, records)
    assert summary["broken"] == {"status": "missing", "reason": "NotImplementedError: no kernel here"}
    assert summary["absent"] == {"status": "missing", "reason": "not installed"}
    assert summary["picky"]["status"] == summary["oom"]["status"] == "ok"


# ------------------------------------------------------------------------------------------------
# the report generator, on fixtures
# ------------------------------------------------------------------------------------------------


def _fixture(directory: Path, times_ms: dict[str, float], commit: str = "abc1234", outputs: bool = False) -> None:
    """A softmax results file for a made-up GPU: one series, two sizes, given times per provider."""
    stamp = {"device": "cuda", "device_name": "Test GPU 80GB", "device_slug": "test-gpu-80gb", "driver": "999.1",
             "cpu_threads": 16, "torch": "2.11.0", "triton": "3.6.0", "cuda": "12.8", "commit": commit,
             "commit_dirty": False, "date": "2026-01-02T03:04:05+00:00"}
    results = []
    for x in (1024, 4096):
        work = common.softmax_bytes(256, x, 2, "fwd")
        for provider, ms in times_ms.items():
            results.append({"series": "softmax", "x": x, "params": {"N": x}, "provider": provider, "mode": "fwd",
                            "work": work, "status": "ok", "reason": None, "time_ms": ms * x / 1024,
                            "metric": common.metric_value("gbps", work, ms * x / 1024), "peak_mem_mib": 2.0})
    # liger runs at 1k and runs out of memory at 4k
    results.append({"series": "softmax", "x": 1024, "params": {"N": 1024}, "provider": "liger", "mode": "fwd",
                    "work": 1e9, "status": "ok", "reason": None, "time_ms": 1000.0, "metric": 1.0})
    results.append({"series": "softmax", "x": 4096, "params": {"N": 4096}, "provider": "liger", "mode": "fwd",
                    "work": 1e9, "status": "oom", "reason": "OutOfMemoryError: CUDA out of memory"})
    data = {"schema": common.SCHEMA_VERSION, "family": "softmax", "title": "Softmax", "x_label": "row length N",
            "metric": "gbps", "metric_unit": "GB/s", "modes": ["fwd"], "headline_mode": "fwd", "stamp": stamp,
            "context": {"device": "cuda", "size": "full", "dtype": "bfloat16"},
            "providers": {**{p: {"status": "ok", "reason": None} for p in times_ms},
                          "liger": {"status": "ok", "reason": None},
                          "flash-attn": {"status": "missing", "reason": "not installed (pip install flash-attn)"}},
            "results": results}
    common.write_json(directory / "test-gpu-80gb" / "softmax.json", data)
    if outputs:
        report.write_family_outputs(data, directory / "test-gpu-80gb")


def test_readme_section_is_generated_between_markers(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    _fixture(results, {"torch": 0.5, "naive": 2.0}, outputs=True)
    readme = tmp_path / "README.md"
    readme.write_text("# fastattn\n\nWritten by the lead.\n")

    assert report.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# fastattn\n\nWritten by the lead.\n")
    section = text[text.index(report.START_MARKER):text.index(report.END_MARKER)]
    assert "### Test GPU 80GB" in section and "driver 999.1" in section and "`abc1234`" in section
    # 256·1024 bf16 elements read + written in 0.5 ms: 2.10 GB/s
    expected = common.metric_value("gbps", common.softmax_bytes(256, 1024, 2), 0.5)
    assert f"| 1k | {report.fmt(expected)} (0.5 ms) |" in section
    assert "`flash-attn` (not installed (pip install flash-attn))" in section
    row_4k = next(line for line in section.splitlines() if line.startswith("| 4k |"))
    assert row_4k.endswith("| OOM |")  # liger's column
    # links relative to the README, to files that exist
    assert "(benchmarks/results/test-gpu-80gb/softmax-softmax.png)" in section
    assert "(benchmarks/results/test-gpu-80gb/softmax-softmax-memory.png)" in section
    assert "[softmax.md](benchmarks/results/test-gpu-80gb/softmax.md)" in section

    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    _fixture(results, {"torch": 0.25, "naive": 2.0})  # a new run: the section must follow it
    assert report.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    report.main(["--results", str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert text.count(report.START_MARKER) == 1 and "(0.25 ms)" in text and "(0.5 ms)" not in text


def test_family_markdown_lists_every_provider_and_status(tmp_path):
    _fixture(tmp_path, {"torch": 0.5})
    data = common.load_family_results(tmp_path / "test-gpu-80gb")[0]
    markdown = report.render_family_markdown(data, plots=False)
    assert "`flash-attn`: not installed (pip install flash-attn)" in markdown
    gbps = report.fmt(common.metric_value("gbps", common.softmax_bytes(256, 1024, 2), 0.5))
    assert f"| 1k | {gbps} (0.5 ms) | 1 (1,000 ms) |" in markdown
    assert "| 4k | 2 | OOM |" in markdown  # peak memory table
    assert "- `liger` at row length N 4k: OutOfMemoryError: CUDA out of memory" in markdown
    assert "**peak memory, forward** (MiB above the inputs)" in markdown


def test_compare_flags_providers_more_than_5_percent_slower(tmp_path, capsys):
    _fixture(tmp_path / "old", {"a": 10.0, "b": 10.0, "c": 10.0})
    _fixture(tmp_path / "new", {"a": 10.6, "b": 10.4, "c": 9.0})  # a: +6% (flagged), b: +4%, c: faster
    new, old = tmp_path / "new" / "test-gpu-80gb", tmp_path / "old" / "test-gpu-80gb"

    text, flagged = report.compare_results(common.load_family_results(new), common.load_family_results(old))
    assert {r["provider"] for r in flagged} == {"a"} and len(flagged) == 2
    assert all(math.isclose(r["ratio"], 1.06) for r in flagged)
    assert "+6.0%" in text and "**SLOWER** in 2" in text

    assert report.main(["--compare", str(new), "--baseline", str(old)]) == 1
    assert "Regressions" in capsys.readouterr().out
    assert report.main(["--compare", str(new), "--baseline", str(old), "--threshold", "0.1"]) == 0


# ------------------------------------------------------------------------------------------------
# CPU timing without the scheduling floor
# ------------------------------------------------------------------------------------------------


def _cpu_context() -> common.Context:
    """The context `python -m benchmarks.run --quick` times with: all cores, or one when busy."""
    ctx = common.Context(device="cpu", size="quick", dtype="float32")
    common.choose_cpu_threads(ctx)
    return ctx


@pytest.mark.parametrize("numel", [16, 2**18], ids=["add-16", "add-256k-parallel"])
def test_cpu_timing_of_a_cheap_op_has_no_scheduling_floor(numel):
    """A 16-element add costs microseconds; a 256k-element add (which torch splits across threads)
    tens of microseconds. Timed through the harness they must not read the ~8 ms time slice that
    multi-threaded calls waited for on a busy machine (the committed tables' floor)."""
    ctx = _cpu_context()
    threads = torch.get_num_threads()
    try:
        ctx.apply()
        workload = common.Workload(make_inputs=lambda: {"a": torch.randn(numel), "b": torch.randn(numel)},
                                   forward=lambda s: s["a"] + s["b"])
        result = common.measure(workload, "fwd", ctx)
    finally:
        torch.set_num_threads(threads)
    assert 0 < result["time_ms"] < 0.5, result


def test_cpu_timing_of_two_identical_providers_agrees():
    """The same op as two providers of one case, timed as the suite times them (interleaved
    rounds), gives a ratio near 1 even while the load of the machine changes."""
    ctx = _cpu_context()
    threads = torch.get_num_threads()

    def workload():
        return common.Workload(make_inputs=lambda: {"x": torch.randn(256, 1024)},
                               forward=lambda s: torch.softmax(s["x"], dim=-1))

    try:
        ctx.apply()
        prepared = [common.prepare(workload(), "fwd", ctx) for _ in range(2)]
        first, second = (t["time_ms"] for t in common.time_prepared(prepared, ctx))
    finally:
        torch.set_num_threads(threads)
    assert 0.75 < first / second < 1.33, (first, second)


def test_cpu_time_takes_the_smallest_round_median():
    """A callable that is slow in one round only (another process ran) reads as its fast time."""
    calls = {"n": 0}

    def sometimes_slow():
        calls["n"] += 1
        if calls["n"] <= 5:  # the first round (5 samples of one call)
            time.sleep(0.002)

    result = common.cpu_time(sometimes_slow, total_s=0.05, per_call_s=0.002, clock=time.perf_counter)
    assert result["time_ms"] < 1.0, result
    assert result["runs"] >= 3


def test_one_thread_samples_cpu_time_that_preemption_does_not_advance():
    """On one thread a sample is the thread's CPU time: a sleep (as a preemption) does not count,
    the work does."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert common.cpu_clock() is time.thread_time
        x = torch.randn(128, 128)

        def work_then_sleep():
            x @ x
            time.sleep(0.02)

        # the sleep dominates the wall time, so a loaded machine's slower matmul cannot hide it
        cpu = common.cpu_time(work_then_sleep, total_s=0.2, per_call_s=0.021)
        wall = common.cpu_time(work_then_sleep, total_s=0.2, per_call_s=0.021, clock=time.perf_counter)
        assert cpu["clock"] == "thread_cpu" and wall["clock"] == "wall"
        assert 0 < cpu["time_ms"] < wall["time_ms"] - 15, (cpu, wall)
        torch.set_num_threads(2)
        assert common.cpu_clock() is time.perf_counter
    finally:
        torch.set_num_threads(threads)


def test_other_runnable_tasks_sees_a_busy_core():
    """A spinning child process is seen as (about) one other runnable task."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        others = common.other_runnable_tasks()
        busy = common.cpu_is_busy(common.Context(device="cpu"))  # while the spinner still runs
    finally:
        spinner.kill()
        spinner.wait()
    assert others is not None and others >= 0.5
    assert busy


def test_tables_show_the_speed_relative_to_torch(tmp_path):
    _fixture(tmp_path, {"fastattn-cpu": 0.25, "torch": 0.5, "naive": 2.0})
    data = common.load_family_results(tmp_path / "test-gpu-80gb")[0]
    markdown = report.render_family_markdown(data, plots=False)
    header = next(line for line in markdown.splitlines() if line.startswith("| row length N |"))
    assert header.endswith("| `fastattn-cpu` vs `torch` |")
    row_1k = next(line for line in markdown.splitlines() if line.startswith("| 1k |"))
    assert row_1k.endswith("| 2.00x |")  # torch 0.5 ms / fastattn 0.25 ms
    memory_header = [line for line in markdown.splitlines() if line.startswith("| row length N |")][-1]
    assert "vs" not in memory_header  # peak memory tables carry no speed ratio
