"""Host overhead per call (issue 17): the benchmark script end to end, its README section, and a
regression guard on the added host time of the hottest calls over torch's own op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastattn
from benchmarks import bench_overhead, report
from benchmarks.common import REPO_ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_run_writes_every_case_with_sane_values(tmp_path):
    assert bench_overhead.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert data["kind"] == "overhead" and data["target_us"] == 25.0
    assert data["stamp"]["device"] == "cpu" and data["stamp"]["torch"] == torch.__version__
    assert set(data["stamp"]["backends"]) == set(fastattn.backends())

    expected = {(case.name, mode) for case in bench_overhead.cases() for mode in bench_overhead.MODES}
    got = {(r["case"], r["mode"]) for r in data["results"]}
    assert got == expected and len(data["results"]) == len(expected)
    served = {name for name, reason in fastattn.backends().items() if reason is None}
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert r["torch_us"] > 0 and r["fastattn_us"] > 0, r
        assert r["torch_us"] < 50_000 and r["fastattn_us"] < 50_000, r  # microseconds, not seconds
        assert r["ratio"] == pytest.approx(r["fastattn_us"] / r["torch_us"])
        assert r["added_us"] == pytest.approx(r["fastattn_us"] - r["torch_us"])
        assert r["clock"] == "thread_cpu"  # one thread: the thread's CPU time
        # the backend fastattn's dispatch chose, per kernel family the call reached
        pairs = [item.split(":") for item in r["backend"].split(",")]
        assert pairs and all(backend in served for _, backend in pairs), r
    modules = {r["case"]: r["backend"] for r in data["results"] if r["mode"] == "inference"}
    assert {p.split(":")[0] for p in modules["nn.TransformerEncoderLayer"].split(",")} >= {"attention", "feed_forward"}

    markdown = (tmp_path / "overhead.md").read_text()
    assert "| call | mode | torch us | fastattn us | added us | ratio |" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| `")]
    assert len(rows) == len(expected)
    first = data["results"][0]
    assert f"{first['ratio']:.1f}x |" in rows[0] and first["mode"] in rows[0]
    assert (tmp_path / "overhead.png").read_bytes()[:8] == PNG_MAGIC


def test_train_forward_builds_a_graph_and_inference_does_not():
    """The two modes time what they say: grad mode on with grad-requiring inputs, or no_grad."""
    case = next(c for c in bench_overhead.cases() if c.name == "nn.LayerNorm")
    with torch.enable_grad():
        fast, ref = case.build(torch.device("cpu"), True)
        assert fast().requires_grad and ref().requires_grad
    with torch.no_grad():
        fast, ref = case.build(torch.device("cpu"), False)
        assert not fast().requires_grad and not ref().requires_grad


def test_a_failing_case_is_recorded_with_its_reason():
    def build(device, train):
        return (lambda: torch.zeros(3)), (lambda: torch.ones(3))  # disagree: the comparison is refused

    record = bench_overhead.measure_case(bench_overhead.Case("bad", "bad", build), "inference",
                                         torch.device("cpu"), "quick")
    assert record["status"] == "error" and "disagree" in record["reason"]
    assert bench_overhead.render_table({"results": [record]}).splitlines()[-1].startswith("| bad | inference | — | — | error: ")


def _fake_results(directory: Path, added: float) -> None:
    data = {"kind": "overhead", "target_us": 25.0, "clock_note": "test", "stamp": {
        "device": "cpu", "device_name": "Test CPU", "device_slug": "cpu-test", "cpu_threads": 1, "torch": "2.0",
        "commit": "abc1234", "commit_dirty": False, "date": "2026-01-01T00:00:00+00:00", "backends": {"cpu": None}},
        "results": [{"case": "softmax", "call": "`fastattn.softmax(x)`", "mode": "inference", "status": "ok",
                     "torch_us": 4.0, "fastattn_us": 4.0 + added, "added_us": added, "ratio": (4.0 + added) / 4.0,
                     "backend": "softmax:cpu"}]}
    (directory / "cpu-test").mkdir(parents=True, exist_ok=True)
    (directory / "cpu-test" / "overhead.json").write_text(json.dumps(data))


def test_readme_section_goes_after_the_results_section_and_follows_the_results(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    _fake_results(results, 30.0)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\n{report.START_MARKER}\ntable\n{report.END_MARKER}\n\n## Later\n\ntext\n")
    args = ["--readme", "--readme-path", str(readme), "--results", str(results)]
    assert bench_overhead.main(args + ["--check"]) == 1
    assert bench_overhead.main(args) == 0
    text = readme.read_text()
    start, end = text.index(bench_overhead.START_MARKER), text.index(bench_overhead.END_MARKER)
    assert text.index(report.END_MARKER) < start < end < text.index("## Later")
    section = text[start:end]
    assert "## Host overhead per call" in section and "### Test CPU" in section and "+25 us" in section
    assert "| `fastattn.softmax(x)` | inference | 4.0 | 34.0 | **+30.0** | 8.5x |" in section  # over target: bold
    assert "(benchmarks/results/cpu-test/overhead.png)" in section
    assert bench_overhead.main(args + ["--check"]) == 0
    assert bench_overhead.main(args) == 0 and readme.read_text() == text  # idempotent

    _fake_results(results, 10.0)  # a new run: the section follows it, once
    assert bench_overhead.main(args + ["--check"]) == 1
    bench_overhead.main(args)
    text = readme.read_text()
    assert text.count(bench_overhead.START_MARKER) == 1 and "| +10.0 |" in text and "+30.0" not in text
    assert f"{report.START_MARKER}\ntable\n{report.END_MARKER}" in text  # the results section is untouched


def test_committed_readme_section_is_up_to_date():
    assert bench_overhead.main(["--readme", "--check"]) == 0


# ------------------------------------------------------------------------------------------------
# the regression guard
# ------------------------------------------------------------------------------------------------

GUARDED = ("softmax", "sdpa", "sdpa-causal", "nn.LayerNorm")
# Issue 17's target is +25 us per call, not met yet for attention and the norms (README, "Host
# overhead per call"). This is a regression guard at twice the level measured on a busy 2-core
# machine (tests share the cores, and a busy sibling core slows the interpreter too, which the
# thread-CPU clock does not discount): softmax ~+29, nn.LayerNorm ~+45, sdpa ~+70 us.
LIMITS_US = {"softmax": 2 * bench_overhead.TARGET_US, "nn.LayerNorm": 90.0, "sdpa": 140.0, "sdpa-causal": 140.0}
ATTEMPTS = 3


def _measure_in_a_subprocess(out: Path) -> dict[str, float]:
    """Added host us per guarded case, inference mode, one thread, thread-CPU clock, fresh process
    without the test suite's environment (no Triton interpreter, no output poisoning)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTATTN_POISON_OUTPUTS", "FASTATTN_BACKEND")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "benchmarks.bench_overhead", "--device", "cpu", "--modes", "inference",
           "--only", ",".join(GUARDED), "--no-plot", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "overhead.json").read_text())
    assert data["stamp"]["cpu_threads"] == 1
    assert all(r["clock"] == "thread_cpu" for r in data["results"])
    return {r["case"]: r["added_us"] for r in data["results"]}


@pytest.mark.xdist_group("overhead-timing")
def test_added_host_time_over_torch_stays_within_the_guard(tmp_path):
    """fastattn.softmax, scaled_dot_product_attention and nn.LayerNorm on tiny CPU inputs cost no
    more over torch's own op than the guard above allows. The best of up to 3 measurements per
    case (each already the smallest of several interleaved runs) counts: other processes can only
    make a measurement read high."""
    best = dict.fromkeys(GUARDED, float("inf"))
    for attempt in range(ATTEMPTS):
        for case, added in _measure_in_a_subprocess(tmp_path / str(attempt)).items():
            best[case] = min(best[case], added)
        if all(v <= LIMITS_US[case] for case, v in best.items()):
            break
    over = {case: round(v, 1) for case, v in best.items() if v > LIMITS_US[case]}
    assert not over, f"added host us per call over torch's op above the guard {LIMITS_US}: {over} (all: {best})"


def test_cuda_host_timing_synchronizes_outside_short_samples(monkeypatch):
    """The CUDA path (exercised here with a stand-in synchronize): every sample starts after a
    synchronize, and no sample queues more than 200 calls."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    fns = [lambda: events.append("a"), lambda: events.append("b")]
    timings = bench_overhead._cuda_host_time_interleaved(fns, time.thread_time)
    assert len(timings) == 2 and all(t["time_ms"] > 0 for t in timings)
    assert all(1 <= t["calls_per_sample"] <= bench_overhead.CUDA_MAX_CALLS_PER_SAMPLE for t in timings)
    runs, run = [], []
    for event in events:
        if event == "sync":
            if run:
                runs.append(run)
            run = []
        else:
            run.append(event)
    assert run == [] and runs  # ends synchronized
    samples = runs[len(fns):]  # after the per-call estimates of 10 calls each
    assert all(len(set(r)) == 1 and len(r) <= bench_overhead.CUDA_MAX_CALLS_PER_SAMPLE for r in samples)
    assert {r[0] for r in samples} == {"a", "b"}
