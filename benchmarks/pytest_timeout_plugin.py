"""A per-test timeout and a collection filter for the GPU check, independent of tests/conftest.py.

    python -m pytest -p benchmarks.pytest_timeout_plugin --per-test-timeout 60 \
        --gpu-or-files test_attention.py,test_softmax.py tests

pytest-timeout may be absent on the GPU machine (no network), so a test that hangs is ended here
with SIGALRM (main thread, POSIX only) and fails with a clear message; the run goes on.
``--gpu-or-files`` keeps the ``gpu``-marked tests of every file plus all tests of the files named,
so one run (one junit XML) covers both selections. ``--shard I/K`` keeps one of K disjoint parts
(by test function), for K processes at once.
"""

from __future__ import annotations

import os
import signal
import zlib
from pathlib import Path

import pytest


class PerTestTimeout(Exception):
    pass


def pytest_addoption(parser):
    group = parser.getgroup("gpu-check")
    group.addoption("--per-test-timeout", type=float, default=60.0, help="seconds per test, 0 = none (default 60)")
    group.addoption("--gpu-or-files", default="", help="keep gpu-marked tests and every test of these files")
    group.addoption("--shard", default="", help="I/K: keep the tests of every K-th test function, from the I-th")


def shard_of(item, shards: int) -> int:
    """A test function's parametrizations stay in one shard (they share compiled kernels)."""
    function = item.nodeid.split("[", 1)[0]
    return zlib.crc32(function.encode()) % shards


def pytest_collection_modifyitems(config, items):
    names = {n.strip() for n in config.getoption("--gpu-or-files").split(",") if n.strip()}
    shard = config.getoption("--shard")
    index, shards = (int(x) for x in shard.split("/")) if shard else (0, 1)
    if not names and shards == 1:
        return
    kept, dropped = [], []
    for item in items:
        wanted = not names or "gpu" in item.keywords or Path(str(item.fspath)).name in names
        wanted = wanted and shard_of(item, shards) == index
        (kept if wanted else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    seconds = item.config.getoption("--per-test-timeout")
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise PerTestTimeout(f"{item.nodeid} ran past the per-test timeout ({seconds:g} s)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pytest_configure(config):
    # a precompile worker of the GPU check (benchmarks.gpu_check.precompile): launch one candidate
    # config per autotuned kernel, benchmark none
    index = os.environ.get("GPU_CHECK_CONFIG_INDEX")
    if index is not None:
        from benchmarks.gpu_check import force_config_index

        force_config_index(int(index))
