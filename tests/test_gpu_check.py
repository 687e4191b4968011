"""The GPU check harness (benchmarks/gpu_check.py), without a GPU: the dry run completes, a killed
run leaves a readable summary, the budget holds, and what comes back fits the transport."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO_ROOT = Path(__file__).resolve().parent.parent


def start(out: Path, *extra: str, hang: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("FASTATTN_GPU_CHECK_HANG", None)
    if hang:
        env["FASTATTN_GPU_CHECK_HANG"] = hang
    return subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), *extra],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_state(out: Path) -> dict | None:
    try:
        return json.loads((out / "gpu_check.json").read_text())
    except (OSError, ValueError):
        return None


def wait_for_running(out: Path, stage: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = read_state(out)
        if state and state["stages"][stage]["status"] == "running":
            return state
        time.sleep(0.2)
    raise AssertionError(f"stage {stage} never started: {read_state(out)}")


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


TEE_LOG = "a log the caller tees into OUT (make gpu-check | tee $OUT/log.txt)\n"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
    (out / "log.txt").write_text(TEE_LOG)
    proc = start(out)
    assert proc.wait(timeout=180) == 0
    return out


def test_dry_run_completes_and_reports_every_stage(dry_run):
    summary = (dry_run / "summary.md").read_text()
    for stage in gpu_check.STAGES:
        assert f"- {stage}: ok" in summary, summary
    state = read_state(dry_run)
    assert state["finished"] and all(s["status"] == "ok" for s in state["stages"].values())
    assert state["results"]["bench"]["attention_rows"], "the bench stage measured no attention case"
    assert "| sdpa-flash |" in summary and "PASS" in summary


def test_out_dir_fits_the_transport(dry_run):
    files = list(dry_run.iterdir())
    assert 0 < len(files) <= gpu_check.MAX_FILES and all(f.is_file() for f in files)
    assert all(f.stat().st_size < gpu_check.MAX_FILE_BYTES for f in files)
    assert {f.name for f in files} == set(gpu_check.OWN_FILES) | {"log.txt"}
    # the caller's tee'd log.txt is neither replaced nor written to: the harness logs to gpu_check.log
    assert (dry_run / "log.txt").read_text() == TEE_LOG
    assert "stage bench: ok" in (dry_run / gpu_check.LOG_NAME).read_text()


def test_dry_run_records_the_launch_configs_of_every_triton_family(dry_run):
    """The interpreter launches one config (nothing to tune): autotune.json still names the config
    of every kernel family the bench measures, with its shapes; the summary has the section."""
    data = json.loads((dry_run / "autotune.json").read_text())
    kernels = {(r["family"], r["kernel"]) for r in data["fixed_configs"]}
    for family, kernel in (("attention", "_attn_fwd_kernel"), ("attention", "_attn_bwd_dkdv_kernel"),
                           ("attention", "_attn_bwd_dq_kernel")):
        assert (family, kernel) in kernels, kernels
    assert {"softmax", "norm", "ffn"} <= {family for family, _ in kernels}, kernels
    fwd = next(r for r in data["fixed_configs"] if r["kernel"] == "_attn_fwd_kernel")
    assert fwd["config"]["kwargs"]["BLOCK_M"] > 0 and fwd["shapes"] and fwd["calls"] > 0
    assert data["tune_pass"]["families"]["attention"]["cases"] > 0 and not data["tune_pass"]["errors"]
    summary = (dry_run / "summary.md").read_text()
    assert "## Triton autotuning (autotune.json)" in summary and "attention _attn_bwd_dq_kernel" in summary
    tests = read_state(dry_run)["results"]["tests"]
    assert tests["speed"]["returncode"] == 0 and tests["suite"]["returncodes"] == [0] and tests["serial"]["returncode"] == 0
    assert read_state(dry_run)["results"]["bench"]["precompile"]["returncodes"] == [0]
    names = (dry_run / "junit.xml").read_text()
    for name in ("test_cpu_autocast_returns_torchs_dtype", "test_scalar_and_1d", "test_length_bucket",
                 "test_empty"):  # every part's cases are in the one junit XML
        assert name in names, name


RECORDER_SCRIPT = """
import json, os, sys, time
os.environ["TRITON_INTERPRET"] = "1"
import torch, triton, triton.language as tl
from benchmarks import gpu_check

def bench(fn, quantiles=None, **kw):  # the interpreter has no GPU timer: the call's wall time
    t = time.perf_counter(); fn(); t = (time.perf_counter() - t) * 1e3
    return [t, t, t]

configs = [triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=2)]

@triton.autotune(configs=configs, key=["n"], do_bench=bench)
@triton.jit
def double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

if sys.argv[1:] == ["0", "broken"]:  # config 0 cannot run: config 1 takes over
    run = double.fn.run
    double.fn.run = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("out of resources")) \
        if kw["BLOCK"] == 16 else run(*a, **kw)
from triton.runtime.interpreter import InterpretedFunction
original = InterpretedFunction.run
if sys.argv[1] == "record":
    recorder = gpu_check.TuningRecorder()
    recorder.install()
    assert InterpretedFunction.run is not original
else:
    gpu_check.force_config_index(int(sys.argv[1]))
x = torch.randn(100)
for n in (100, 100, 50):
    y = torch.zeros_like(x)
    double[lambda m: (triton.cdiv(n, m["BLOCK"]),)](x, y, n)
    assert torch.equal(y[:n], 2 * x[:n]) and not y[n:].any()
if sys.argv[1] == "record":
    recorder.stop_launches()  # launches cost nothing more; a new key is still recorded
    assert InterpretedFunction.run is original
    double[lambda m: (triton.cdiv(70, m["BLOCK"]),)](x, y, 70)
    print(json.dumps(recorder.as_json(), default=str))
else:
    print(json.dumps({"cache": len(double.cache), "best": double.best_config.kwargs}))
"""


def run_script(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", RECORDER_SCRIPT, *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_recorder_records_each_autotuning_once():
    """Two keys (n=100 twice, n=50): two tunings, each with the config chosen, the configs tried and
    the time it took; the launches inside the tuning are not counted as untuned launches."""
    got = run_script("record")
    assert [t["key"]["n"] for t in got["tunings"]] == [100, 50, 70]
    for t in got["tunings"]:
        assert t["kernel"] == "double" and t["configs_tried"] == 2 and len(t["timings_ms"]) == 2
        assert t["chosen"]["kwargs"]["BLOCK"] in (16, 32) and t["chosen"]["num_warps"] in (1, 2)
        assert 0 < t["autotune_s"] <= t["wall_s"]
    assert got["fixed_configs"] == []


@pytest.mark.parametrize("argv,block", [(["0"], 16), (["1"], 32), (["3"], 32), (["0", "broken"], 32)],
                         ids=["first", "second", "modulo", "falls-over"])
def test_precompile_worker_launches_its_config_untuned(argv, block):
    got = run_script(*argv)
    assert got == {"cache": 0, "best": {"BLOCK": block}}


def test_merge_junit_keeps_every_run_and_survives_a_broken_one(tmp_path):
    (tmp_path / "a.xml").write_text('<testsuites><testsuite name="a"><testcase classname="t" name="x[triton]"/>'
                                    '</testsuite></testsuites>')
    (tmp_path / "b.xml").write_text('<testsuite name="b"><testcase classname="t" name="y[cuda]">'
                                    '<failure message="m"/></testcase></testsuite>')
    (tmp_path / "c.xml").write_text('<testsuite name="c"><testcase')  # killed while writing
    gpu_check.merge_junit([tmp_path / n for n in ("a.xml", "b.xml", "c.xml", "missing.xml")], tmp_path / "j.xml")
    got = gpu_check.junit_summary(tmp_path / "j.xml")
    assert got["per_backend"] == {"triton": {"passed": 1, "failed": 0, "skipped": 0},
                                  "cuda": {"passed": 0, "failed": 1, "skipped": 0}}


def test_sigterm_mid_stage_kills_the_stage_and_keeps_the_summary(tmp_path):
    proc = start(tmp_path, "--budget-s", "60", hang="build")
    state = wait_for_running(tmp_path, "build")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=gpu_check.KILL_GRACE_S + 8) == 128 + signal.SIGTERM
    state = read_state(tmp_path)
    assert state["stages"]["env"]["status"] in ("ok", "timeout")
    assert state["stages"]["build"]["status"] == "killed"
    summary = (tmp_path / "summary.md").read_text()
    assert "- env: " in summary and "- build: killed" in summary
    assert process_gone(state["stages"]["build"]["pid"]), "the hung stage outlived the harness"


def test_sigkill_of_the_harness_leaves_the_last_summary(tmp_path):
    proc = start(tmp_path, "--budget-s", "60", hang="build")
    state = wait_for_running(tmp_path, "build")
    proc.kill()
    proc.wait(timeout=5)
    orphan = state["stages"]["build"]["pid"]
    try:
        os.killpg(orphan, signal.SIGKILL)  # nobody is left to end it: its own session
    except ProcessLookupError:
        pass
    state = read_state(tmp_path)
    assert state is not None and not state["finished"]
    assert state["stages"]["env"]["status"] in ("ok", "timeout")
    assert "- build: running" in (tmp_path / "summary.md").read_text()


def test_a_120_s_budget_ends_within_130_s_when_the_last_stage_hangs(tmp_path):
    """The issue's bound: env, build, tests and sanitizer run for real (dry run), then the bench stage
    hangs (ignoring SIGTERM) and is killed at its deadline; the run ends within 130 s, reported."""
    budget = 120
    started = time.monotonic()
    proc = start(tmp_path, "--budget-s", str(budget), hang="bench")
    proc.wait(timeout=200)
    elapsed = time.monotonic() - started
    assert elapsed <= 130, f"{elapsed:.1f} s for a {budget} s budget"
    assert elapsed >= 0.9 * budget, "the hung stage was not given the rest of the budget"
    state = read_state(tmp_path)
    assert state["finished"] and state["stages"]["bench"]["status"] == "timeout"
    # on a loaded CPU the dry run's tests may need more than their share of 120 s: pytest interrupted
    # at the deadline fails the stage, or the stage itself runs out; either way it is reported
    stages = {name: rec["status"] for name, rec in state["stages"].items()}
    assert stages["tests"] in ("ok", "failed", "timeout") and stages["sanitizer"] in ("ok", "timeout"), stages
    assert state["stages"]["env"]["status"] == state["stages"]["build"]["status"] == "ok", state["stages"]
    assert process_gone(state["stages"]["bench"]["pid"])
    assert "- bench: timeout" in (tmp_path / "summary.md").read_text()


def test_limits_truncate_the_log_and_drop_strays(tmp_path):
    (tmp_path / gpu_check.LOG_NAME).write_bytes(b"x" * (gpu_check.LOG_LIMIT_BYTES + 1000) + b"the end\n")
    (tmp_path / "stray.bin").write_bytes(b"?")
    (tmp_path / "log.txt").write_text(TEE_LOG)
    gpu_check.enforce_limits(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([gpu_check.LOG_NAME, "log.txt"])
    assert (tmp_path / "log.txt").read_text() == TEE_LOG
    log = (tmp_path / gpu_check.LOG_NAME).read_text()
    assert log.endswith("the end\n") and log.startswith("[... truncated") and len(log) < gpu_check.MAX_FILE_BYTES


def test_junit_summary_counts_per_backend(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite>'
        '<testcase classname="t" name="test_a[triton-x]"/>'
        '<testcase classname="t" name="test_a[cuda-x]"><failure message="m"/></testcase>'
        '<testcase classname="t" name="test_b[2-cuda]"><skipped/></testcase>'
        '<testcase classname="t" name="test_c"/>'
        '</testsuite></testsuites>')
    got = gpu_check.junit_summary(tmp_path / "j.xml")
    assert got["per_backend"] == {"triton": {"passed": 1, "failed": 0, "skipped": 0},
                                  "cuda": {"passed": 0, "failed": 1, "skipped": 1},
                                  "other": {"passed": 1, "failed": 0, "skipped": 0}}
    assert got["failures"] == ["t::test_a[cuda-x]"]


def test_per_test_timeout_plugin_fails_a_hanging_test(tmp_path):
    (tmp_path / "test_sleep.py").write_text("import time\n\ndef test_sleeps():\n    time.sleep(30)\n\n"
                                            "def test_quick():\n    pass\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "benchmarks.pytest_timeout_plugin", "-p", "no:xdist",
                           "-p", "no:cacheprovider", "--per-test-timeout", "1", "-q", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_sleep.py")],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True,
                          timeout=60)
    assert time.monotonic() - started < 20
    assert done.returncode == 1 and "1 failed, 1 passed" in done.stdout, done.stdout
    assert "per-test timeout" in done.stdout


def test_shards_are_disjoint_cover_everything_and_keep_a_function_together(tmp_path):
    (tmp_path / "test_many.py").write_text(
        "import pytest\n\n" + "".join(f"def test_f{i}():\n    pass\n\n" for i in range(6))
        + "@pytest.mark.parametrize('x', range(4))\ndef test_p(x):\n    pass\n")
    seen = []
    for i in range(3):
        done = subprocess.run([sys.executable, "-m", "pytest", "-p", "benchmarks.pytest_timeout_plugin", "-p", "no:xdist",
                               "-p", "no:cacheprovider", "--shard", f"{i}/3", "--collect-only", "-q", "--rootdir",
                               str(tmp_path), str(tmp_path / "test_many.py")],
                              cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True,
                              text=True, timeout=60)
        ids = [line.split("::")[-1] for line in done.stdout.splitlines() if "::" in line]
        params = [t for t in ids if t.startswith("test_p[")]
        assert len(params) in (0, 4), ids  # all of test_p's parametrizations in one shard
        seen += ids
    assert sorted(seen) == sorted([f"test_f{i}" for i in range(6)] + [f"test_p[{x}]" for x in range(4)])


def test_precompile_kills_its_workers_at_the_deadline(tmp_path):
    started = time.monotonic()
    got = gpu_check.precompile([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), tmp_path,
                               "t", 1.0, 2)
    assert time.monotonic() - started < 15
    assert got["returncodes"] == ["timeout", "timeout"] and got["workers"] == 2
