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


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry")
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
    assert {"summary.md", "gpu_check.json", "log.txt", "junit.xml", "results.tar.gz"} <= {f.name for f in files}


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


def test_budget_holds_when_a_stage_hangs(tmp_path):
    budget = 20
    started = time.monotonic()
    proc = start(tmp_path, "--budget-s", str(budget), hang="build")
    proc.wait(timeout=60)
    elapsed = time.monotonic() - started
    assert elapsed <= budget * 130 / 120 + 3, f"{elapsed:.1f} s for a {budget} s budget"
    state = read_state(tmp_path)
    assert state["finished"] and state["stages"]["build"]["status"] == "timeout"
    assert process_gone(state["stages"]["build"]["pid"])


def test_limits_truncate_the_log_and_drop_strays(tmp_path):
    (tmp_path / "log.txt").write_bytes(b"x" * (gpu_check.LOG_LIMIT_BYTES + 1000) + b"the end\n")
    (tmp_path / "stray.bin").write_bytes(b"?")
    gpu_check.enforce_limits(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["log.txt"]
    log = (tmp_path / "log.txt").read_text()
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
