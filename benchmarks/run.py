"""Run the benchmarks that fit the device present and write benchmarks/results/<device>/.

    python -m benchmarks.run                          # everything, full sizes (make bench)
    python -m benchmarks.run --only attention --quick # one family, small sizes
    python -m benchmarks.run --list                   # families and providers, with why one cannot run

For each family: every (case, provider, mode) is probed, then timed; a provider that cannot run
(not installed, wrong device, a case its kernel does not support, out of memory) is recorded with
its reason, never dropped. Larger sizes of a provider are skipped once a call took longer than the
per-call limit or ran out of memory, and a family stops at its time budget, so a run is bounded.
Writes <family>.json (raw numbers + stamp), <family>.md and PNG plots, then prints the tables.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import FAMILIES
from benchmarks.common import (
    MEMORY_MODES,
    METRICS,
    RESULTS_ROOT,
    SCHEMA_VERSION,
    TIMING,
    Context,
    busy_warning,
    choose_cpu_threads,
    classify_error,
    collect_stamp,
    cpu_peak_memory,
    default_context,
    metric_value,
    prepare,
    recording_warnings,
    settle_garbage,
    time_prepared,
    write_json,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated families ({', '.join(FAMILIES)})")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick", help="small sizes, short timings")
    size.add_argument("--size", choices=sorted(TIMING), help="size preset: full (default), quick, tiny (tests)")
    parser.set_defaults(size="full")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is present")
    parser.add_argument("--dtype", help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: all cores; 1 for --size tiny or when the CPU is busy)")
    parser.add_argument("--providers", help="comma-separated providers to run (default: all that can)")
    parser.add_argument("--out", type=Path, help="output directory (default: benchmarks/results/<device>)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every family's time budget")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    parser.add_argument("--no-plots", action="store_true", help="write JSON and Markdown only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--quiet", action="store_true", help="do not print the tables at the end")
    parser.add_argument("--list", action="store_true", help="list families and providers, then exit")
    args = parser.parse_args(argv)
    args.families = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; expected some of {', '.join(FAMILIES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.selected = None if not args.providers else {p.strip() for p in args.providers.split(",") if p.strip()}
    return args


def family_module(family: str):
    return importlib.import_module(f"benchmarks.bench_{family}")


def provider_reasons(module, ctx: Context, selected: set[str] | None) -> dict[str, str | None]:
    reasons = module.providers(ctx)
    if selected is not None:
        reasons = {p: (r if p in selected else r or "not selected (--providers)") for p, r in reasons.items()}
    return reasons


class Progress:
    """tqdm when available (and wanted), else nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="meas", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text[:60], refresh=False)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _free(ctx: Context) -> None:
    settle_garbage()
    if ctx.gpu:
        torch.cuda.empty_cache()


# No provider may use more than this fraction of its family's time budget (a torch.compile per
# shape, say), so that one slow provider cannot starve the others of their large sizes.
PROVIDER_SHARE = 0.4
# The CPU memory subprocess of a family gets this fraction of the family's budget on top of it.
MEMORY_SHARE = 0.3


class FamilyTimer:
    """Probes and times every (case, runnable provider, mode) of a family, smallest sizes first,
    within the family's time budget."""

    def __init__(self, module, ctx: Context, budget_s: float, progress: Progress):
        self.module, self.ctx, self.budget_s, self.progress = module, ctx, budget_s, progress
        self.deadline = time.monotonic() + budget_s
        self.limit_s = TIMING[ctx.size][3]
        self.blocked: dict[tuple, str] = {}  # (provider, series, mode) -> why larger sizes are skipped
        self.spent = Counter()  # provider -> seconds

    def run(self, cases: list, providers: list[str]) -> list[dict]:
        # Sizes in increasing order across all series: when the budget runs out, every series has
        # lost its largest sizes rather than one series everything.
        series_order = {c.series: i for i, c in reversed(list(enumerate(cases)))}
        records = []
        for case in sorted(cases, key=lambda c: (c.x, series_order[c.series])):
            records += self._case(case, providers)
            _free(self.ctx)
        return records

    def _case(self, case, providers: list[str]) -> list[dict]:
        """Every mode of every provider on one case. Per mode all providers are probed first, then
        timed together (interleaved on the CPU); a workload is built once per provider."""
        built: dict[str, dict] = {p: {} for p in providers}
        records = []
        for mode in self.module.MODES:
            prepared = []  # (record, runner, per-call seconds) of the providers that can run
            for provider in providers:
                self.progress.describe(f"{self.module.FAMILY} {provider} {case.x} {mode}")
                record = {"series": case.series, "x": case.x, "params": case.params, "provider": provider,
                          "mode": mode, "work": case.work.get(mode), "status": "ok", "reason": None}
                records.append(record)
                skip = self._skip_reason(provider, case.series, mode)
                if skip:
                    record.update(status="skipped", reason=skip)
                    continue
                started = time.monotonic()
                runner, failure = self._prepare(case, provider, mode, built[provider])
                self.spent[provider] += time.monotonic() - started
                if failure:
                    record.update(failure)
                    self._note_limits(record, (provider, case.series, mode))
                else:
                    prepared.append((record, *runner))
            if prepared:
                self.progress.describe(f"{self.module.FAMILY} {case.x} {mode}: timing {len(prepared)} providers")
                try:
                    timings = time_prepared([(r, pc) for _, r, pc in prepared], self.ctx)
                except Exception as exc:  # recorded for every provider timed together: the suite goes on
                    status, reason = classify_error(exc)
                    timings = [{"status": status, "reason": reason}] * len(prepared)
                for (record, _, _), timing in zip(prepared, timings):
                    timing = dict(timing)
                    self.spent[record["provider"]] += timing.pop("timing_s", 0.0)
                    record.update(timing)
                    self._note_limits(record, (record["provider"], case.series, mode))
            del prepared
            _free(self.ctx)
            for record in records[-len(providers):]:
                if record["status"] == "ok":
                    record["metric"] = metric_value(self.module.METRIC, record["work"], record["time_ms"])
                self.progress.update()
        return records

    def _skip_reason(self, provider: str, series: str, mode: str) -> str | None:
        if (provider, series, mode) in self.blocked:
            return self.blocked[(provider, series, mode)]
        if time.monotonic() > self.deadline:
            return f"the family's time budget ({self.budget_s:g} s) was used up"
        if self.spent[provider] > PROVIDER_SHARE * self.budget_s:
            return f"this provider used its share ({PROVIDER_SHARE * self.budget_s:g} s) of the family's time budget"
        return None

    def _prepare(self, case, provider: str, mode: str, built: dict):
        """((runner, per-call seconds), None), or (None, the status and reason of the failure); a
        failed build fails every mode."""
        caught = []
        try:
            with recording_warnings() as caught:
                if "error" in built:
                    raise built["error"]
                if "workload" not in built:
                    try:
                        built["workload"] = self.module.build(provider, case.params, self.ctx)
                    except Exception as exc:
                        built["error"] = exc
                        raise
                return prepare(built["workload"], mode, self.ctx), None
        except Exception as exc:  # classified and recorded: the suite goes on
            status, reason = classify_error(exc, caught)
            return None, {"status": status, "reason": reason}

    def _note_limits(self, record: dict, key: tuple) -> None:
        """Skip larger sizes of this provider, series and mode after an OOM or a too slow call."""
        x_name = self.module.X_LABEL.split(" (")[0]
        if record["status"] == "oom":
            self.blocked[key] = f"skipped: out of memory at {x_name} {record['x']}"
        elif record["status"] == "ok" and record["per_call_s"] > self.limit_s:
            self.blocked[key] = (f"skipped: {x_name} {record['x']} took {record['per_call_s']:.1f} s per call "
                                 f"(over the {self.limit_s:g} s limit)")


def _cpu_memory(module, ctx, records, progress, timeout_s) -> None:
    """Fill peak_mem_mib of the CPU records that ran, from one subprocess per family."""
    todo = [r for r in records if r["status"] == "ok" and r["mode"] in MEMORY_MODES]
    items = [{"provider": r["provider"], "params": r["params"], "mode": r["mode"]} for r in todo]
    progress.update(sum(r["mode"] in MEMORY_MODES for r in records) - len(items))  # planned, not needed
    if not items:
        return
    progress.describe(f"{module.FAMILY} peak memory (subprocess)")
    for answer in cpu_peak_memory(module.__name__, ctx, items, timeout_s=timeout_s):
        record = todo[answer["index"]]
        if "peak_mem_mib" in answer:
            record["peak_mem_mib"] = answer["peak_mem_mib"]
        else:
            record["memory_error"] = answer["error"]
        progress.update()


def provider_summary(reasons: dict[str, str | None], records: list[dict]) -> dict[str, dict]:
    """Per provider: ok (ran at least one case), or missing with the reason (the commonest one
    among its cases when it could be tried but never ran)."""
    summary = {}
    for provider, reason in reasons.items():
        if reason is not None:
            summary[provider] = {"status": "missing", "reason": reason}
            continue
        mine = [r for r in records if r["provider"] == provider]
        if any(r["status"] == "ok" for r in mine):
            summary[provider] = {"status": "ok", "reason": None}
        else:
            common = Counter(r["reason"] for r in mine if r["reason"]).most_common(1)
            summary[provider] = {"status": "missing", "reason": common[0][0] if common else "no case was run"}
    return summary


def run_family(family: str, ctx: Context, args, stamp: dict, progress: Progress, out_dir: Path) -> dict:
    module = family_module(family)
    started = time.monotonic()
    cases = module.cases(ctx)
    reasons = provider_reasons(module, ctx, args.selected)
    budget = module.BUDGET_S["cuda" if ctx.gpu else "cpu"] * args.budget_scale
    runnable = [p for p, reason in reasons.items() if reason is None]
    records = FamilyTimer(module, ctx, budget, progress).run(cases, runnable)
    if not args.no_memory and not ctx.gpu:
        _cpu_memory(module, ctx, records, progress, timeout_s=max(30.0, MEMORY_SHARE * budget))
    data = {
        "schema": SCHEMA_VERSION,
        "family": family,
        "title": module.TITLE,
        "x_label": module.X_LABEL,
        "metric": module.METRIC,
        "metric_unit": METRICS[module.METRIC][0],
        "modes": list(module.MODES),
        "headline_mode": module.HEADLINE_MODE,
        "stamp": stamp,
        "context": asdict(ctx),
        "providers": provider_summary(reasons, records),
        "results": records,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    write_json(out_dir / f"{family}.json", data)
    from benchmarks import report

    report.write_family_outputs(data, out_dir, plots=not args.no_plots)
    return data


def _planned_measurements(ctx: Context, args) -> int:
    total = 0
    for family in args.families:
        module = family_module(family)
        runnable = [p for p, r in provider_reasons(module, ctx, args.selected).items() if r is None]
        memory_modes = 0 if (args.no_memory or ctx.gpu) else sum(m in MEMORY_MODES for m in module.MODES)
        total += len(module.cases(ctx)) * len(runnable) * (len(module.MODES) + memory_modes)
    return total


def list_providers(ctx: Context, args) -> None:
    for family in args.families:
        module = family_module(family)
        print(f"{family}: {len(module.cases(ctx))} cases, modes {', '.join(module.MODES)}")
        for provider, reason in provider_reasons(module, ctx, args.selected).items():
            print(f"  {provider:18s} {'can run (each case is probed)' if reason is None else 'missing: ' + reason}")


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = default_context(args.device, args.size, args.dtype, args.threads)
    # OpenMP's barriers wait for threads the OS has descheduled: on a CPU shared with other work,
    # every multi-threaded call reads about one time slice (~8 ms); one thread keeps them meaningful.
    choose_cpu_threads(ctx)
    ctx.apply()
    if args.list:
        list_providers(ctx, args)
        return 0
    stamp = collect_stamp(ctx.device)
    out_dir = args.out or RESULTS_ROOT / stamp["device_slug"]
    print(f"benchmarking on {stamp['device_name']} ({ctx.device}, {ctx.dtype}, {ctx.size} sizes) -> {out_dir}",
          file=sys.stderr, flush=True)
    if busy_warning(stamp):
        print(f"warning: {busy_warning(stamp)}; running on {torch.get_num_threads()} thread(s)",
              file=sys.stderr, flush=True)
    progress = Progress(_planned_measurements(ctx, args), enabled=not args.no_progress)
    settle_garbage()
    written = []
    try:
        for family in args.families:
            written.append(run_family(family, ctx, args, stamp, progress, out_dir))
    finally:
        progress.close()
    if not args.quiet:
        from benchmarks import report

        for data in written:
            print(report.render_family_markdown(data, plots=False))
    print(f"results written to {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
