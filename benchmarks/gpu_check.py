"""One prepared GPU check that fits one 10-minute call: environment and ceilings, build, tests,
compute-sanitizer, key benchmarks, summary.

    python -m benchmarks.gpu_check --out DIR [--budget-s 480] [--dry-run]     (make gpu-check OUT=DIR)

Each stage runs as a subprocess in its own session with a deadline: its share of the budget left.
Past it the stage's process group is killed (SIGTERM, SIGKILL 5 s later) and the stage is recorded
as "timeout"; the run goes on. summary.md and gpu_check.json are rewritten atomically after every
stage, and on SIGTERM/SIGINT the running stage is killed and recorded as "killed" first, so a
killed call still returns its finished stages. --out holds at most 8 files of at most 16 MiB (the
transport's limits): the 7 of OWN_FILES (the harness's log is gpu_check.log) and a log.txt the caller
may tee there (`make gpu-check ... | tee $OUT/log.txt`), which is never touched. --dry-run runs every
stage on the CPU with tiny sizes (Triton in the interpreter; CI runs it).
Test hook: FASTATTN_GPU_CHECK_HANG=<stage> makes that stage sleep, ignoring SIGTERM, until it is killed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# Stage name -> weight: a stage's deadline is weight / (weights of the stages left) of the time left,
# so time a fast stage does not use goes to the later ones.
STAGES = {"env": 0.06, "build": 0.24, "tests": 0.26, "sanitizer": 0.08, "bench": 0.36}
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
LOG_LIMIT_BYTES = 15 * 2**20
LOG_NAME = "gpu_check.log"
# What the harness writes to --out; FOREIGN_FILES are the caller's (a `| tee $OUT/log.txt`, or the
# device harness's own log): kept as they are and counted against MAX_FILES.
OWN_FILES = ("summary.md", "gpu_check.json", LOG_NAME, "junit.xml", "results.tar.gz", "autotune.json", "sanitizer.txt")
FOREIGN_FILES = ("log.txt",)
assert len(OWN_FILES) + len(FOREIGN_FILES) <= MAX_FILES
KILL_GRACE_S = 5.0
SUMMARY_RESERVE_S = 4.0  # kept back for the last summary and packing
MIN_STAGE_S = 10.0  # importing torch alone takes seconds: a stage's deadline is at least this (or what is left)
TEST_FILES = ("test_attention.py", "test_softmax.py", "test_ffn.py", "test_norm.py")
BENCH_FAMILIES = "attention,softmax,ffn,norm"


class HarnessSignal(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# the harness
# ------------------------------------------------------------------------------------------------


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's process group, SIGKILL it after the grace period."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # children that outlived their leader
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Harness:
    def __init__(self, args):
        self.args, self.out = args, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.log = self.out / LOG_NAME
        self.state = {"dry_run": args.dry_run, "budget_s": args.budget_s,
                      "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "stages": {name: {"status": "pending"} for name in STAGES}, "results": {}}

    def note(self, text: str) -> None:
        line = f"[gpu_check {time.monotonic() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def stage_command(self, name: str) -> list[str]:
        if os.environ.get("FASTATTN_GPU_CHECK_HANG") == name:
            # a stubborn hang: ignores SIGTERM, so the SIGKILL after the grace period is tested too
            return [sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    "while True: time.sleep(60)"]
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--stage", name, "--out", str(self.out),
               "--work", str(self.work)]
        return cmd + (["--dry-run"] if self.args.dry_run else [])

    def run_stage(self, name: str, remaining_weight: float) -> None:
        left = self.deadline - time.monotonic() - SUMMARY_RESERVE_S
        share = min(left, max(MIN_STAGE_S, left * STAGES[name] / remaining_weight))
        record = self.state["stages"][name]
        record.update(status="running", deadline_s=round(share, 1))
        if left <= 1.0:
            record.update(status="skipped", reason="the budget was used up")
            return
        self.note(f"stage {name}: deadline {share:.0f} s")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1", GPU_CHECK_STAGE_BUDGET_S=f"{share:.1f}")
        if self.args.dry_run:  # the Triton kernels in the interpreter, on the CPU
            env["TRITON_INTERPRET"] = "1"
        started = time.monotonic()
        with open(self.log, "a") as log:
            proc = subprocess.Popen(self.stage_command(name), cwd=REPO_ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        record["pid"] = proc.pid
        try:
            self.finish(final=False)  # the summary shows the stage running (and its pid) while it runs
            proc.wait(timeout=share)
            record["status"] = "ok" if proc.returncode == 0 else "failed"
            record["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            kill_group(proc)
            record.update(status="timeout", reason=f"ran past its deadline ({share:.0f} s)")
        except HarnessSignal as exc:
            for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the cleanup short
                signal.signal(sig, signal.SIG_IGN)
            kill_group(proc)
            record.update(status="killed", reason=f"the harness got signal {exc.args[0]}")
            raise
        finally:
            record["elapsed_s"] = round(time.monotonic() - started, 1)
            self.collect(name)
        self.note(f"stage {name}: {record['status']} in {record['elapsed_s']} s")

    def collect(self, name: str) -> None:
        """What the stage left behind, even when it was killed."""
        try:
            result = self.work / f"{name}.json"
            if result.exists():
                self.state["results"][name] = json.loads(result.read_text())
            if name == "bench":
                self.state["results"].setdefault("bench", {}).update(collect_bench(self.work, self.out))
        except Exception as exc:  # a half-written result must not cost the summary
            self.state["stages"][name]["collect_error"] = f"{type(exc).__name__}: {exc}"

    def on_signal(self, signum, frame):
        raise HarnessSignal(signum)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        code = 0
        try:
            names = list(STAGES)
            for i, name in enumerate(names):
                self.run_stage(name, sum(STAGES[n] for n in names[i:]))
                self.finish(final=False)
        except HarnessSignal as exc:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            code = 128 + exc.args[0]
            self.note(f"killed by signal {exc.args[0]}")
        self.finish(final=True)
        shutil.rmtree(self.work, ignore_errors=True)
        return code

    def finish(self, final: bool) -> None:
        self.state["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.state["finished"] = final
        atomic_write(self.out / "summary.md", render_summary(self.state))
        atomic_write(self.out / "gpu_check.json", json.dumps(self.state, indent=1, default=str))
        enforce_limits(self.out)


def enforce_limits(out: Path) -> None:
    """Truncate the harness's log from the front and drop extra files so the transport takes
    everything; the caller's FOREIGN_FILES (a tee'd log.txt still being written) are left alone."""
    log = out / LOG_NAME
    if log.exists() and log.stat().st_size > LOG_LIMIT_BYTES:
        data = log.read_bytes()[-LOG_LIMIT_BYTES:]
        atomic_write(log, "[... truncated from the front ...]\n" + data.decode(errors="replace"))
    for path in out.iterdir():
        if path.name in FOREIGN_FILES or (path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp")):
            continue
        if path.name not in OWN_FILES or (path.is_file() and path.stat().st_size > MAX_FILE_BYTES):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()


# ------------------------------------------------------------------------------------------------
# the summary
# ------------------------------------------------------------------------------------------------


def render_summary(state: dict) -> str:
    res = state["results"]
    lines = [f"# fastattn GPU check{' (dry run: CPU, tiny sizes)' if state['dry_run'] else ''}", "",
             f"Started {state['started_utc']}, budget {state['budget_s']:g} s, elapsed {state['elapsed_s']} s"
             f"{'' if state['finished'] else ' (still running or killed)'}.", "", "## Stages", ""]
    for name, rec in state["stages"].items():
        extra = f" in {rec['elapsed_s']} s" if "elapsed_s" in rec else ""
        lines.append(f"- {name}: {rec['status']}{extra}{' (' + rec['reason'] + ')' if rec.get('reason') else ''}")
    env = res.get("env", {})
    if env:
        lines += ["", "## Environment and ceilings", ""]
        lines += [f"- {k}: {v}" for k, v in env.get("stamp", {}).items()]
        for key, label in (("copy_gbps", "device copy (read+write) GB/s"), ("gemm_tflops", "bf16 GEMM TFLOP/s")):
            if key in env.get("ceilings", {}):
                lines.append(f"- {label}: {env['ceilings'][key]:.1f} ({env['ceilings']['what']})")
    build = res.get("build", {})
    built = state["stages"]["build"]["status"] == "ok" and build.get("cuda_backend") is None
    lines += ["", "## Build", "", f"- {build.get('what', 'not run')}; backends: {build.get('backends')}"]
    if not built:
        lines.append("- the CUDA backend is not usable: triton backend only")
    tests = res.get("tests", {})
    lines += ["", "## Tests (pass/fail per backend)", ""]
    for backend, counts in tests.get("per_backend", {}).items():
        verdict = "PASS" if counts["failed"] == 0 and counts["passed"] > 0 else "FAIL" if counts["failed"] else "NONE RAN"
        lines.append(f"- {backend}: {verdict}: {counts['passed']} passed, {counts['failed']} failed, "
                     f"{counts['skipped']} skipped")
    if tests.get("interrupted_at_deadline"):
        lines.append("- pytest was interrupted at the stage's deadline: the counts cover the tests that ran")
    lines += [f"- first failures: {f}" for f in tests.get("failures", [])[:10]]
    san = res.get("sanitizer", {})
    lines += ["", "## compute-sanitizer", ""] + [f"- {k}: {v}" for k, v in san.items()]
    lines += ["", "## Attention TFLOP/s (bench)", ""] + attention_table(res.get("bench", {}), env)
    bench = res.get("bench", {})
    if bench:
        lines += ["", f"Bench families: {bench.get('families')}; raw results: results.tar.gz "
                      f"(`tar xzf results.tar.gz -C benchmarks/results` gives benchmarks/results/{bench.get('results_dir')}/)"]
        lines += ["", "## Triton autotuning (autotune.json)", ""]
        pre = bench.get("precompile")
        if pre:
            lines.append(f"- precompile: {pre['workers']} workers, {pre['elapsed_s']} s (deadline {pre['deadline_s']} s)")
        tune = bench.get("tune_pass") or {}
        if tune:
            lines.append(f"- tune pass over the measured shapes: {tune.get('elapsed_s')} s; per family "
                         f"{tune.get('families')}; errors {tune.get('errors') or 'none'}")
        tuned = bench.get("autotune_kernels", {})
        if tuned:
            lines += ["", "| kernel | tunings | autotune s (Triton) | wall s (with compiles) | configs chosen |",
                      "|---|---|---|---|---|"]
            lines += [f"| {k} | {v['tunings']} | {v['autotune_s']} | {v['wall_s']} | {'; '.join(v['chosen'][:6])} |"
                      for k, v in tuned.items()]
        fixed = bench.get("fixed_kernels", {})
        if fixed:
            lines.append("")
            lines.append("- launched untuned (one config or heuristic blocks): "
                         + ", ".join(f"{k} ({n} configs)" for k, n in fixed.items()))
    return "\n".join(lines) + "\n"


def attention_table(bench: dict, env: dict) -> list[str]:
    rows = bench.get("attention_rows", [])
    if not rows:
        return ["(no attention results)"]
    gemm = env.get("ceilings", {}).get("gemm_tflops")
    flash = {(r["series"], r["x"], r["mode"]): r["tflops"] for r in rows if r["provider"] == "sdpa-flash"}
    out = ["| series | N | mode | provider | TFLOP/s | vs sdpa-flash | vs GEMM ceiling |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] == "bwd":  # fwd and fwd+bwd here; the backward alone is in results.tar.gz
            continue
        ref = flash.get((r["series"], r["x"], r["mode"]))
        vs_flash = f"{r['tflops'] / ref:.2f}" if ref else "-"
        vs_gemm = f"{r['tflops'] / gemm:.2f}" if gemm else "-"
        out.append(f"| {r['series']} | {r['x']} | {r['mode']} | {r['provider']} | {r['tflops']:.3g} | {vs_flash} | "
                   f"{vs_gemm} |")
    return out


# ------------------------------------------------------------------------------------------------
# the stages (each runs as `python -m benchmarks.gpu_check --stage NAME`)
# ------------------------------------------------------------------------------------------------


def _sh(cmd: list[str], timeout: float = 30.0) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (done.stdout or done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"


def _event_time_ms(fn, reps: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _cpu_time_ms(fn, reps: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) * 1e3 / reps


def stage_env(args) -> dict:
    import torch
    import triton

    gpu = torch.cuda.is_available() and not args.dry_run
    stamp = {"gpu": torch.cuda.get_device_name() if gpu else "none (dry run)",
             "driver": _sh(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if gpu else "-",
             "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
             "nvcc": _sh(["nvcc", "--version"]).splitlines()[-1] if shutil.which("nvcc") else "not found",
             "commit": _sh(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if gpu:
        stamp["arch"] = "{}.{}".format(*torch.cuda.get_device_capability())
        src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = _event_time_ms(lambda: dst.copy_(src), 20)
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        gemm_ms = _event_time_ms(lambda: a @ b, 20)
        ceilings = {"what": "CUDA events, 1 GiB copy, bf16 8192^3 GEMM", "n_copy": 2**30, "n_gemm": 8192}
    else:  # stand-ins on the CPU with tiny sizes: the code path, not the figures
        src = torch.empty(2**24, dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy_ms = _cpu_time_ms(lambda: dst.copy_(src), 5)
        a, b = torch.randn(256, 256), torch.randn(256, 256)
        gemm_ms = _cpu_time_ms(lambda: a @ b, 5)
        ceilings = {"what": "CPU stand-ins (16 MiB copy, fp32 256^3 GEMM), not GPU ceilings", "n_copy": 2**24,
                    "n_gemm": 256}
    ceilings["copy_gbps"] = 2 * ceilings["n_copy"] / (copy_ms * 1e-3) / 1e9
    ceilings["gemm_tflops"] = 2 * ceilings["n_gemm"] ** 3 / (gemm_ms * 1e-3) / 1e12
    return {"stamp": stamp, "ceilings": ceilings}


def _arch() -> str:
    env = Path(os.environ.get("GPU_CHECK_WORK", "")) / "env.json"
    if env.is_file():
        arch = json.loads(env.read_text()).get("stamp", {}).get("arch")
        if arch:
            return arch
    return _sh(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]).splitlines()[0]


def stage_build(args) -> dict:
    result = {}
    if args.dry_run:
        result["what"] = "dry run: build skipped, the installed extension checked"
    else:
        arch, jobs = _arch(), os.cpu_count() or 1
        env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(jobs))
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                              cwd=REPO_ROOT, env=env)
        result["what"] = (f"TORCH_CUDA_ARCH_LIST={arch} MAX_JOBS={jobs} pip install -e .: rc {done.returncode} in "
                          f"{time.monotonic() - started:.0f} s")
        result["build_s"], result["returncode"] = round(time.monotonic() - started, 1), done.returncode
    probe = _sh([sys.executable, "-c", "import fastattn, json; print(json.dumps(fastattn.backends()))"], timeout=120)
    try:
        result["backends"] = json.loads(probe.splitlines()[-1])
        result["cuda_backend"] = result["backends"].get("cuda")
    except (ValueError, IndexError):
        result["backends"], result["cuda_backend"] = probe[-500:], "import failed"
    return result


def junit_summary(path: Path) -> dict:
    from fastattn.dispatch import BACKENDS  # the registry's names (no backend is loaded)

    kernel_backends = [name for name in BACKENDS if name != "reference"]
    per_backend: dict[str, dict] = {}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        params = name[name.find("[") + 1:-1].split("-") if "[" in name else []
        backend = next((p for p in params if p in kernel_backends), "other")
        counts = per_backend.setdefault(backend, {"passed": 0, "failed": 0, "skipped": 0})
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failures.append(f"{case.get('classname')}::{name}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {"per_backend": per_backend, "failures": failures}


def pytest_command(selection: list[str], junit: Path | None, per_test_s: float) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "benchmarks.pytest_timeout_plugin", "-p", "no:cacheprovider",
           "-p", "no:xdist", "--per-test-timeout", str(per_test_s), "-q", "-rfE"]
    return cmd + ([f"--junitxml={junit}"] if junit else []) + selection


# The speed tests compare autotuned kernels with torch's: they run with autotuning, after the
# compiles are done in parallel (precompile); everything else runs with FASTATTN_AUTOTUNE=0 (one fixed
# config per kernel: autotuning each test's shapes would compile ~10-20 configs per shape at 1-3 s each).
SPEED_TESTS = "tests/test_attention_speed.py"


def precompile(command: list[str], env: dict, work: Path, name: str, deadline_s: float, workers: int) -> dict:
    """Runs ``command`` in ``workers`` processes at once, worker i with GPU_CHECK_CONFIG_INDEX=i (every
    Autotuner launches its i-th config, benchmarking none): the candidates compile on all cores into
    Triton's disk cache, so the autotuning that follows in one process only loads them. Best effort:
    killed at ``deadline_s``; what they compiled by then is kept. The workers stay in the stage's
    process group, so a stage killed at its deadline (or with the harness) takes them with it."""
    started, procs = time.monotonic(), []
    for i in range(workers):
        log = open(work / f"precompile_{name}_{i}.log", "w")
        procs.append((subprocess.Popen(command, cwd=REPO_ROOT, env=dict(env, GPU_CHECK_CONFIG_INDEX=str(i)), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log))
    codes = []
    for proc, log in procs:
        try:
            proc.wait(timeout=max(0.1, started + deadline_s - time.monotonic()))
            codes.append(proc.returncode)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            codes.append("timeout")
        log.close()
    return {"workers": workers, "returncodes": codes, "elapsed_s": round(time.monotonic() - started, 1),
            "deadline_s": round(deadline_s, 1)}


def force_config_index(index: int) -> None:
    """Every triton.autotune'd kernel launches its ``index``-th config (modulo the configs left after
    its pruning) without benchmarking: a precompile worker's way to compile one candidate per kernel.
    A config that cannot run (out of shared memory, say: the autotuner would time it as infinite)
    hands over to the next one, so the worker's later kernels (the backward) still compile."""
    from triton.runtime.autotuner import Autotuner

    def run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
            for attempt in range(len(configs)):
                config = configs[(index + attempt) % len(configs)]
                self.best_config = config
                if config.pre_hook is not None:
                    config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
                try:
                    return self.fn.run(*args, **kwargs, **config.all_kwargs())
                except Exception:
                    if attempt == len(configs) - 1:
                        raise
        finally:
            self.nargs = None

    Autotuner.run = run


def merge_junit(parts: list[Path], out: Path) -> None:
    """One junit XML (the transport's file count) from the runs' files."""
    root = ET.Element("testsuites")
    for part in parts:
        if not part.is_file():
            continue
        try:
            got = ET.parse(part).getroot()
        except ET.ParseError:  # a run killed while writing: its cases are lost, the others kept
            continue
        root.extend(got.iter("testsuite") if got.tag == "testsuites" else [got])
    tmp = out.with_name(f".{out.name}.tmp")
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, out)


def run_pytest(selections: list[list[str]], junits: list[Path], budget_s: float, env: dict,
               per_test_s: float) -> dict:
    """pytest runs at once (one per selection), each interrupted (SIGINT) at ``budget_s`` so that it
    still writes the junit XML of what ran. Exit code 5 (a shard with no test) counts as success."""
    procs = [subprocess.Popen(pytest_command(sel, junit, per_test_s), cwd=REPO_ROOT, env=env)
             for sel, junit in zip(selections, junits)]
    started, interrupted = time.monotonic(), False
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, started + max(5.0, budget_s) - time.monotonic()))
        except subprocess.TimeoutExpired:
            interrupted = True
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, started + max(5.0, budget_s) + 10 - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    codes = [0 if p.returncode == 5 else p.returncode for p in procs]
    return {"returncode": max(codes, key=abs), "returncodes": codes, "interrupted_at_deadline": interrupted,
            "elapsed_s": round(time.monotonic() - started, 1)}


def stage_tests(args) -> dict:
    """The bandwidth tests first, alone (they time the GPU: nothing else may run), then the other
    gpu-marked tests and the CPU suite's attention/softmax/FFN/norm tests on CUDA tensors, in shards
    run at once (compiling is most of their time: all cores compile), then the speed tests,
    autotuned, after a precompile; one junit.xml, rewritten after each part."""
    junit = args.out / "junit.xml"
    # (the dry run: one shard, and no speed precompile, whose code the bench stage's precompile runs:
    # every pytest start costs seconds on a small CPU)
    shards = 1 if args.dry_run else max(1, min(6, (os.cpu_count() or 2) // 2))
    parts = {"serial": [args.work / "junit_serial.xml"], "suite": [args.work / f"junit_suite_{i}.xml" for i in range(shards)],
             "speed": [args.work / "junit_speed.xml"]}
    if args.dry_run:
        serial = ["tests/test_attention.py", "-k", "empty", "-x"]
        suite = ["tests/test_softmax.py", "-k", "cpu_autocast or scalar_and_1d"]
        speed = [SPEED_TESTS, "-k", "length_bucket", "-x"]
        workers = 0
    else:
        serial = ["tests", "-m", "gpu", "-k", "bandwidth", f"--ignore={SPEED_TESTS}"]
        suite = ["tests", "--gpu-or-files", ",".join(TEST_FILES), "-k", "not bandwidth", f"--ignore={SPEED_TESTS}"]
        speed = [SPEED_TESTS, "-m", "gpu"]
        workers = min(16, os.cpu_count() or 1)
    budget = float(os.environ.get("GPU_CHECK_STAGE_BUDGET_S", "600")) - 20  # 20 s for the last junit and summary
    started = time.monotonic()
    env = dict(os.environ)
    fixed = dict(env, FASTATTN_AUTOTUNE="0")
    all_parts = [p for group in parts.values() for p in group]
    result = {"serial": run_pytest([serial], parts["serial"], 0.15 * budget, fixed, 60.0)}
    merge_junit(all_parts, junit)
    left = budget - (time.monotonic() - started)
    # each shard's Inductor compiles with its share of the cores (its default is one worker per core)
    threads = str(max(1, (os.cpu_count() or 1) // shards))
    result["suite"] = run_pytest([suite + ["--shard", f"{i}/{shards}"] for i in range(shards)], parts["suite"],
                                 0.6 * left, dict(fixed, TORCHINDUCTOR_COMPILE_THREADS=threads), 60.0)
    merge_junit(all_parts, junit)
    left = budget - (time.monotonic() - started)
    env.pop("FASTATTN_AUTOTUNE", None)
    # the speed tests' figures are also in the bench stage's tables: they come last
    result["speed_precompile"] = precompile(pytest_command(speed, None, 120.0), env, args.work, "speed",
                                            0.35 * left, workers)
    left = budget - (time.monotonic() - started)
    result["speed"] = run_pytest([speed], parts["speed"], left, env, 90.0)
    merge_junit(all_parts, junit)
    runs = [result[k] for k in ("serial", "suite", "speed")]
    result["returncode"] = max((r["returncode"] or 0 for r in runs), key=abs)
    result["interrupted_at_deadline"] = any(r["interrupted_at_deadline"] for r in runs)
    if junit.exists():
        result.update(junit_summary(junit))
    return result


SANITIZER_SELECTION = ["tests/test_attention.py", "tests/test_softmax.py", "-k",
                       "cuda and (causal_top_left or small_shapes or fully_masked)"]


def stage_sanitizer(args) -> dict:
    report = args.out / "sanitizer.txt"
    version = _sh(["compute-sanitizer", "--version"])
    if not shutil.which("compute-sanitizer") or "unavailable" in version or "NVIDIA" not in version:
        atomic_write(report, f"compute-sanitizer unavailable: {version}\n")
        return {"probe": f"unavailable: {version[-300:]}"}
    result = {"probe": version.splitlines()[-1]}
    if args.dry_run:
        result["runs"] = "dry run: probe only"
        atomic_write(report, f"{version}\n(dry run: probe only)\n")
        return result
    budget = float(os.environ.get("GPU_CHECK_STAGE_BUDGET_S", "120"))
    with open(report, "w") as f:
        f.write(version + "\n")
        for tool in ("memcheck", "racecheck"):
            cmd = ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=99"]
            cmd += pytest_command(SANITIZER_SELECTION, None, 120.0)
            f.write(f"\n=== {' '.join(cmd)}\n")
            f.flush()
            try:
                done = subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=budget * 0.45)
                result[tool] = "clean" if done.returncode == 0 else f"rc {done.returncode} (see sanitizer.txt)"
            except subprocess.TimeoutExpired:
                result[tool] = f"timeout after {budget * 0.45:.0f} s"
    return result


def _config_dict(config) -> dict:
    return {"kwargs": dict(getattr(config, "kwargs", {}) or {}), "num_warps": getattr(config, "num_warps", None),
            "num_stages": getattr(config, "num_stages", None)}


def _scalars(names, args, kwargs) -> dict:
    """The integer arguments of a launch (sizes, buckets), strides left out: the shape a record is for."""
    pairs = list(zip(names, args)) + list(kwargs.items())
    return {k: v for k, v in pairs if type(v) is int and "stride" not in k and not k.startswith("num_")}


def _kernel_name(fn) -> tuple[str, str]:
    """(family, kernel) of a Triton kernel: fastattn.triton.<family>, the Python function's name."""
    base = getattr(fn, "base_fn", None) or getattr(fn, "fn", None) or fn
    while hasattr(base, "fn") and not callable(getattr(base, "__code__", None)):
        base = base.fn
    module = getattr(base, "__module__", "") or ""
    return module.rsplit(".", 1)[-1], getattr(base, "__name__", repr(base))


class TuningRecorder:
    """Records, in this process, every autotuning Triton does (kernel, key, the config chosen, how many
    were tried, how long it took: Triton's own bench_time and the wall time of the call, compiles
    included) and the launch configs of the kernels that are not autotuned (one config, or the
    softmax/norm kernels' heuristic blocks), with the first call's wall time (its compile)."""

    LIMIT = 2000  # records kept; autotune.json stays far below the transport's 16 MiB

    def __init__(self):
        self.tunings: list[dict] = []
        self.fixed: dict[tuple, dict] = {}
        self.known: dict[int, set] = {}  # id(Autotuner) -> the cache keys recorded
        self.depth = 0
        self.launches = True  # record untuned launch configs (stop_launches: not while timing)
        self.originals: list[tuple] = []

    def install(self) -> None:
        from triton.runtime import autotuner, jit

        recorder = self
        tune_run = autotuner.Autotuner.run

        def run_autotuner(tuner, *args, **kwargs):
            # a len() and a clock per launch: cheap enough to stay on while the bench times kernels
            cached = len(tuner.cache)
            recorder.depth += 1
            started = time.perf_counter()
            try:
                return tune_run(tuner, *args, **kwargs)
            finally:
                recorder.depth -= 1
                if len(tuner.cache) != cached or (recorder.launches and len(tuner.configs) <= 1):
                    recorder.after_autotuner(tuner, time.perf_counter() - started, args, kwargs)

        self.originals.append((autotuner.Autotuner, tune_run))
        autotuner.Autotuner.run = run_autotuner
        classes = [jit.JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        except ImportError:
            pass
        for cls in classes:
            self.originals.append((cls, cls.run))
            cls.run = self._wrap_launch(cls.run)

    def stop_launches(self) -> None:
        """Untuned launches are no longer recorded, and cost nothing more (the bench times them);
        autotunings still are."""
        self.launches = False
        for cls, run in self.originals[1:]:
            cls.run = run

    def _wrap_launch(self, launch):
        recorder = self

        def run(fn, *args, **kwargs):
            if recorder.depth:  # inside an Autotuner: recorded there
                return launch(fn, *args, **kwargs)
            started = time.perf_counter()
            try:
                return launch(fn, *args, **kwargs)
            finally:
                recorder.after_launch(fn, time.perf_counter() - started, args, kwargs)

        return run

    def _names(self, fn) -> list[str]:
        names = getattr(fn, "arg_names", None)
        if names is None:
            import inspect

            names = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
        return list(names)

    def after_autotuner(self, tuner, wall_s: float, args, kwargs) -> None:
        try:
            family, kernel = _kernel_name(tuner)
            names = self._names(tuner)
            if len(tuner.configs) <= 1:  # Triton launches a single config untuned
                config = _config_dict(tuner.configs[0]) if tuner.configs else {}
                self._fixed(family, kernel, config, wall_s, _scalars(names, args, kwargs), autotuned=False)
                return
            timings = dict(getattr(tuner, "configs_timings", None) or {})
            known = self.known.setdefault(id(tuner), set())
            for key in [k for k in tuner.cache if k not in known]:
                known.add(key)
                if len(self.tunings) >= self.LIMIT:
                    return
                keys = list(getattr(tuner, "keys", []))
                self.tunings.append({
                    "family": family, "kernel": kernel, "key": {**dict(zip(keys, key)), "dtypes": list(key[len(keys):])},
                    "chosen": _config_dict(tuner.cache[key]), "configs_tried": len(timings),
                    "autotune_s": round(getattr(tuner, "bench_time", float("nan")), 3), "wall_s": round(wall_s, 3),
                    "timings_ms": {str(c): t for c, t in timings.items()}})
        except Exception as exc:  # a record must never cost the launch
            self.tunings.append({"record_error": f"{type(exc).__name__}: {exc}"})

    def after_launch(self, fn, wall_s: float, args, kwargs) -> None:
        try:
            family, kernel = _kernel_name(fn)
            config = {k: v for k, v in kwargs.items() if type(v) in (int, bool) and (k.isupper() or k.startswith("num_"))}
            self._fixed(family, kernel, config, wall_s, _scalars(self._names(fn), args, kwargs), autotuned=False)
        except Exception as exc:
            self.fixed[("error",)] = {"record_error": f"{type(exc).__name__}: {exc}"}

    def _fixed(self, family, kernel, config, wall_s, shape, autotuned) -> None:
        key = (family, kernel, json.dumps(config, sort_keys=True, default=str))
        rec = self.fixed.get(key)
        if rec is None:
            if len(self.fixed) >= self.LIMIT:
                return
            rec = self.fixed[key] = {"family": family, "kernel": kernel, "config": config, "autotuned": autotuned,
                                     "first_call_s": round(wall_s, 3), "calls": 0, "shapes": []}
        rec["calls"] += 1
        if shape not in rec["shapes"] and len(rec["shapes"]) < 32:
            rec["shapes"].append(shape)

    def as_json(self) -> dict:
        return {"tunings": self.tunings, "fixed_configs": list(self.fixed.values())}


def bench_contexts(args) -> dict:
    """family -> (the benchmarks.run arguments, its Context): what the bench stage measures."""
    from benchmarks.common import default_context

    out = {}
    for family in BENCH_FAMILIES.split(","):
        if args.dry_run:
            argv, size, device = ["--size", "tiny", "--device", "cpu", "--no-memory"], "tiny", "cpu"
        elif family == "attention":  # N 1k, 4k, 16k; d64 and d128; causal and not: the peers of the issue
            argv, size, device = ["--quick", "--providers", ATTENTION_PROVIDERS], "quick", "cuda"
        else:
            argv, size, device = [], "full", "cuda"
        out[family] = (argv, default_context(device, size, None, None))
    return out


ATTENTION_PROVIDERS = "fastattn-triton,fastattn-cuda,sdpa-flash,sdpa-cudnn,sdpa-efficient,flex-attention"


def run_triton_cases(args, deadline: float, on_case=None) -> dict:
    """Every case the bench measures, run once with fastattn's Triton backend (forward alone, then
    forward and backward): in a precompile worker it compiles, in the bench stage it autotunes before
    the timing starts (so the bench's probes find every config chosen). Stops at ``deadline``."""
    import torch

    from benchmarks import run
    from benchmarks.common import Runner

    done, errors = {}, {}
    for family, (_, ctx) in bench_contexts(args).items():
        module = run.family_module(family)
        started, count = time.monotonic(), 0
        for case in module.cases(ctx):
            if time.monotonic() > deadline:
                errors[family] = "stopped at the deadline"
                break
            try:
                workload = module.build("fastattn-triton", case.params, ctx)
                for mode in ("fwd", "fwd_bwd"):
                    Runner(workload, mode, copies=1)()
                if ctx.gpu:
                    torch.cuda.synchronize()
                count += 1
            except Exception as exc:  # recorded; the bench's own probe will say the same
                errors.setdefault(family, f"{case.series} {case.x}: {type(exc).__name__}: {str(exc)[:300]}")
            if on_case:
                on_case()
        done[family] = {"cases": count, "elapsed_s": round(time.monotonic() - started, 1)}
    return {"families": done, "errors": errors}


def stage_bench(args) -> dict:
    """Precompile (every autotune candidate compiled on all cores at once), then the autotuning of
    every Triton kernel for the shapes measured, recorded in autotune.json as it goes, then the
    families one at a time (attention first), so a stage killed at its deadline still leaves what
    it finished."""
    budget = float(os.environ.get("GPU_CHECK_STAGE_BUDGET_S", "200"))
    started = time.monotonic()
    result: dict = {}
    workers = 1 if args.dry_run else min(16, os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--stage", "precompile", "--out", str(args.out),
           "--work", str(args.work)] + (["--dry-run"] if args.dry_run else [])
    result["precompile"] = precompile(cmd, dict(os.environ), args.work, "bench", 0.2 * budget, workers)

    recorder = TuningRecorder()
    recorder.install()
    record: dict = {"note": "tunings: each autotuning (key, chosen config, configs tried, Triton's bench_time "
                            "autotune_s and the call's wall_s, compiles included); fixed_configs: kernels "
                            "launched with one config (not autotuned), first_call_s includes the compile"}

    def dump():
        atomic_write(args.out / "autotune.json", json.dumps({**record, **recorder.as_json()}, indent=1, default=str))

    tune_started = time.monotonic()
    record["tune_pass"] = run_triton_cases(args, started + 0.5 * budget, on_case=dump)
    record["tune_pass"]["elapsed_s"] = round(time.monotonic() - tune_started, 1)
    dump()
    result["tune_pass"] = record["tune_pass"]
    recorder.stop_launches()

    from benchmarks import FAMILIES, run

    contexts = bench_contexts(args)
    assert set(contexts) <= set(FAMILIES)
    errors = {}
    for family, (extra, ctx) in contexts.items():
        left = budget - (time.monotonic() - started) - 10
        families_left = list(contexts)[list(contexts).index(family):]
        total = sum(run.family_module(f).BUDGET_S["cuda" if ctx.gpu else "cpu"] for f in families_left)
        scale = max(0.01, 0.8 * left / total) if not args.dry_run else 0.1
        argv = ["--only", family, "--no-progress", "--quiet", "--no-plots", "--out", str(args.work / "results"),
                "--budget-scale", f"{scale:.3f}", *extra]
        try:
            run.main(argv)
        except Exception as exc:  # the next family still runs
            errors[family] = f"{type(exc).__name__}: {exc}"
        dump()  # tunings the bench's own probes did (a shape the tune pass did not reach)
    result.update(errors=errors, autotuned=len(recorder.tunings), fixed_configs=len(recorder.fixed),
                  autotune_s=round(sum(t.get("autotune_s") or 0 for t in recorder.tunings), 1))
    return result


def stage_precompile(args) -> dict:
    """A precompile worker of the bench stage (GPU_CHECK_CONFIG_INDEX set by precompile())."""
    force_config_index(int(os.environ.get("GPU_CHECK_CONFIG_INDEX", "0")))
    budget = float(os.environ.get("GPU_CHECK_STAGE_BUDGET_S", "100"))
    return run_triton_cases(args, time.monotonic() + budget)


def autotune_summary(path: Path) -> dict:
    """Per (family, kernel): tunings, their total time, the configs chosen; and the fixed configs."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    kernels: dict[str, dict] = {}
    for t in data.get("tunings", []):
        if "kernel" not in t:
            continue
        k = kernels.setdefault(f"{t['family']} {t['kernel']}", {"tunings": 0, "autotune_s": 0.0, "wall_s": 0.0,
                                                                   "chosen": []})
        k["tunings"] += 1
        k["autotune_s"] = round(k["autotune_s"] + (t.get("autotune_s") or 0), 2)
        k["wall_s"] = round(k["wall_s"] + (t.get("wall_s") or 0), 2)
        c = t["chosen"]
        label = ",".join(f"{n}={v}" for n, v in c["kwargs"].items()) + f",w{c['num_warps']},s{c['num_stages']}"
        if label not in k["chosen"]:
            k["chosen"].append(label)
    fixed: dict[str, list] = {}
    for f in data.get("fixed_configs", []):
        if "kernel" in f:
            fixed.setdefault(f"{f['family']} {f['kernel']}", []).append(f["config"])
    return {"autotune_kernels": kernels, "fixed_kernels": {k: len(v) for k, v in fixed.items()},
            "tune_pass": data.get("tune_pass")}


def collect_bench(work: Path, out: Path) -> dict:
    """Packs the bench results that exist (whatever the stage's end) and reads the attention rows."""
    results = work / "results"
    if not results.is_dir():
        return {}
    stamps = [json.loads(p.read_text()).get("stamp", {}) for p in sorted(results.glob("*.json"))]
    # named as benchmarks/results/ names it: `tar xzf results.tar.gz -C benchmarks/results` puts it in place
    slug = next((st["device_slug"] for st in stamps if st.get("device_slug")), "unknown-device")
    with tarfile.open(out / ".results.tar.gz.tmp", "w:gz") as tar:
        tar.add(results, arcname=slug)
    os.replace(out / ".results.tar.gz.tmp", out / "results.tar.gz")
    found = {"families": ",".join(sorted(p.stem for p in results.glob("*.json"))), "results_dir": slug}
    found.update(autotune_summary(out / "autotune.json"))
    if (results / "attention.json").is_file():
        attention = json.loads((results / "attention.json").read_text())
        found["attention_rows"] = [
            {"series": r["series"], "x": r["x"], "mode": r["mode"], "provider": r["provider"], "tflops": r["metric"]}
            for r in attention["results"] if r["status"] == "ok" and r.get("metric")]
    return found


STAGE_FUNCTIONS = {"env": stage_env, "build": stage_build, "tests": stage_tests, "sanitizer": stage_sanitizer,
                   "bench": stage_bench, "precompile": stage_precompile}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (at most 8 files come back)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="total seconds for all stages (default 480)")
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU with tiny sizes")
    parser.add_argument("--stage", choices=list(STAGE_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.stage is None:
        return Harness(args).run()
    os.environ["GPU_CHECK_WORK"] = str(args.work)
    result = STAGE_FUNCTIONS[args.stage](args)
    name = args.stage if args.stage != "precompile" else f"precompile_{os.environ.get('GPU_CHECK_CONFIG_INDEX', 0)}"
    atomic_write(args.work / f"{name}.json", json.dumps(result, indent=1, default=str))
    failed = (args.stage == "tests" and result.get("returncode") != 0) or \
             (args.stage == "build" and (result.get("returncode") or result.get("cuda_backend") == "import failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
