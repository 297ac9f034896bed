"""``rlfuse bench``: run scenarios (op and end-to-end), print the tables, write the reports.

    rlfuse bench --list                          # every scenario, its engines and sizes
    rlfuse bench                                 # the op scenarios, full sweep (GPU sizes with CUDA)
    rlfuse bench --quick                         # the op scenarios, small sweep (< 5 min on a 2-core CPU)
    rlfuse bench --scenarios gae ppo_loss --sizes target
    rlfuse bench --sizes logprobs:N=8192,V=32000 gae:B=128,T=512
    rlfuse bench --scenarios e2e --sizes e2e:model=smollm2 --repeats 2
    rlfuse bench --scenarios all --quick         # every scenario, small sizes
    rlfuse bench --scenarios memory              # what `rlfuse memory` measures
    python -m rlfuse.benchmarks.runner --quick --out /tmp/bench

Reports go to OUT/<machine>/<scenario>/ (OUT defaults to benchmarks/results). An op scenario's
--quick, --sizes target and explicit sizes go to .../<scenario>/quick|target|custom/, and a rerun
replaces that scenario's rows there. A run scenario writes one JSON per size there and rebuilds
that folder's results.md and PNG from all of its JSON files. ``--ops`` is an alias of ``--scenarios``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from . import machine, measure, report
from .spec import OPS, PRESETS, SCENARIOS, load_bench, size_key

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlfuse bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", "--ops", nargs="+", metavar="NAME", dest="scenarios",
                   help=f"scenarios (space or comma separated; 'all'; default the op scenarios): "
                        f"{', '.join(SCENARIOS)}")
    p.add_argument("--sizes", nargs="+", metavar="SPEC",
                   help=f"a preset ({', '.join(PRESETS)}) or explicit sizes 'K=V,K=V' / 'name:K=V,...' "
                        "(missing keys come from the scenario's default size)")
    p.add_argument("--quick", action="store_true", help="the quick preset (< 5 minutes for the op scenarios)")
    p.add_argument("--list", action="store_true", help="list the scenarios and their sizes, and exit")
    p.add_argument("--gpu", action="store_true", help="GPU sizes on CUDA (default when CUDA is present)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="device (default: cuda when available)")
    p.add_argument("--backend", default=None,
                   help="rlfuse backend for the 'rlfuse' rows (default: cpp on CPU when built, else auto)")
    p.add_argument("--compare-backends", nargs="*", default=[], metavar="NAME",
                   help="also measure rlfuse on these backends, as 'rlfuse[NAME]' rows (e.g. torch)")
    p.add_argument("--impls", nargs="+", metavar="IMPL", help="only these implementations (rlfuse is always run)")
    p.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd", "step"), help="only these modes")
    p.add_argument("--repeats", type=int, default=None, help="run scenarios: repeats per engine")
    p.add_argument("--engines", nargs="+", metavar="ENGINE", help="run scenarios: only these engines")
    p.add_argument("--idle-wait", type=float, default=0.0, metavar="S",
                   help="before each child, wait up to S seconds for the load to fall below half the cores")
    p.add_argument("--out", default=None, help=f"results root (default {DEFAULT_OUT})")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (run scenarios: 1)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per child before it is abandoned")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every op case in this process (faster start; memory numbers less clean)")
    p.add_argument("--no-progress", action="store_true", help="(kept for old scripts: progress is plain lines)")
    return p


def _split(values):
    return [x for v in values or [] for x in v.replace(",", " ").split() if x]


def _parse_value(text: str):
    text = text.strip()
    mult = 1
    if text[-1:] in ("K", "k") and text[:-1].isdigit():
        mult, text = 1024, text[:-1]
    elif text[-1:] in ("M", "m") and text[:-1].isdigit():
        mult, text = 1 << 20, text[:-1]
    try:
        return int(text) * mult
    except ValueError:
        return text


def resolve_sizes(specs: list[str] | None, names: list[str], default_preset: str) -> tuple[str, dict]:
    """(preset name, {scenario: [size, ...]}) from the --sizes arguments; a preset a scenario
    does not declare gives it no sizes."""
    def preset_sizes(name, preset):
        bench = load_bench(name)
        return bench.sizes(preset) if preset in bench.sizes_by_preset else []

    if not specs:
        return default_preset, {n: preset_sizes(n, default_preset) for n in names}
    preset = None
    explicit: dict[str, list[dict]] = {n: [] for n in names}
    for spec in specs:
        if spec in PRESETS:
            preset = preset or spec
            for n in names:
                explicit[n] += preset_sizes(n, spec)
            continue
        name, _, body = spec.rpartition(":")
        pairs = dict(kv.split("=", 1) for kv in body.split(",") if "=" in kv)
        if not pairs:
            raise SystemExit(f"rlfuse bench: cannot parse size spec {spec!r} (want K=V,K=V or name:K=V,...)")
        for n in ([name] if name else names):
            if n not in names:
                continue
            base = load_bench(n).default_size()
            if name or set(pairs) <= set(base):
                explicit[n].append({**base, **{k: _parse_value(v) for k, v in pairs.items()}})
        preset = preset or "custom"
    for n in names:  # de-duplicate, keep order
        seen = set()
        explicit[n] = [s for s in explicit[n] if not (size_key(s) in seen or seen.add(size_key(s)))]
    return preset or default_preset, explicit


def list_scenarios(names: list[str], sizes: dict, preset: str) -> None:
    for n in names:
        bench = load_bench(n)
        who = bench.impls() if bench.family == "op" else bench.engines
        print(f"{n:<16} {bench.family:<4} {bench.title}")
        print(f"{'':<21}engines: {', '.join(who)}; presets: {', '.join(bench.sizes_by_preset)}")
        for s in sizes.get(n, []):
            print(f"{'':<21}{preset}: {bench.label(s)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    machine.drop_repo_root_from_path()  # before anything imports transformers (see there)
    import torch

    names = _split(args.scenarios) or list(OPS)
    if names == ["all"]:
        names = list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"rlfuse bench: unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if args.gpu and not cuda:
        print("rlfuse bench: --gpu needs a CUDA device and none is available", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if (args.gpu or cuda) else "cpu")
    if device == "cuda" and not cuda:
        print("rlfuse bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    default_preset = "quick" if args.quick else ("gpu" if device == "cuda" else "full")
    preset, sizes = resolve_sizes([x for v in args.sizes or [] for x in v.split()] or None, names, default_preset)
    if args.list:
        list_scenarios(names, sizes, preset)
        return 0

    import rlfuse.kernels as K
    available = K.available_backends()
    backend = args.backend or ("cpp" if device == "cpu" and "cpp" in available else "auto")
    if backend != "auto" and backend not in available:
        print(f"rlfuse bench: backend {backend!r} is not available here "
              f"({K.unavailable_reasons().get(backend, 'unknown')})", file=sys.stderr)
        return 2
    info = machine.machine_info(device)
    slug = machine.machine_slug(info)
    root = (Path(args.out) if args.out else DEFAULT_OUT) / slug
    print(f"rlfuse bench: {', '.join(names)} on {slug} ({device}), preset {preset}, backend "
          f"{machine.describe_backend(backend, device)} -> {root}", flush=True)
    if (info.get("loadavg_at_start") or [0])[0] > 0.5 * (info.get("logical_cores") or 1):
        print(f"rlfuse bench: warning: load average {info['loadavg_at_start']} - other processes are running, "
              "timings will be noisy (ratios less so: engines are interleaved); consider --idle-wait", flush=True)
    pool = measure.ChildPool(isolate=not args.no_isolate, idle_wait_s=args.idle_wait)
    ops = [n for n in names if load_bench(n).family == "op" and sizes[n]]
    runs = [n for n in names if load_bench(n).family == "run" and sizes[n]]
    failed = 0
    if ops:
        failed += run_ops(ops, sizes, preset, args, pool, device, backend, info, root)
    for n in runs:
        failed += run_scenario(load_bench(n), sizes[n], args, pool, device, info, root / n)
    return 1 if failed else 0


# --------------------------------------------------------------------------- op scenarios

def run_ops(ops, sizes, preset, args, pool, device, backend, info, root) -> int:
    backend_resolved = machine.describe_backend(backend, device)
    extra_impls = [f"rlfuse[{b}]" for b in _split(args.compare_backends) if b != backend_resolved]
    policy = measure.TimingPolicy.for_preset(preset)
    groups = []  # one per (op, size): its implementations are timed together, interleaved
    for op in ops:
        bench = load_bench(op)
        impls = [i for i in bench.impls() if not args.impls or i in args.impls or i == bench.primary]
        if op != "ppo_step":
            impls[1:1] = extra_impls
        for size in sizes[op]:
            cases = [dict(op=op, size=size, impl=impl, modes=modes, device=device, backend=backend,
                          threads=args.threads, seed=0, label=bench.label(size))
                     for impl in impls
                     if (modes := [m for m in bench.modes_for(impl) if not args.modes or m in args.modes])]
            if cases:
                groups.append((bench, size, cases))
    results = []
    t_start = time.perf_counter()
    with _progress(sum(len(c) + 1 for _b, _s, c in groups), disable=args.no_progress) as advance:
        for bench, size, cases in groups:
            timeout = args.timeout or bench.timeout_s
            rows = []  # 1. peak memory: each implementation alone in a fresh process
            for case in cases:
                desc = f"{case['op']} {case['label']} {case['impl']} (memory)"
                advance(desc, None)
                res = pool.run(case, timeout=timeout)
                res.setdefault("label", case["label"])
                rows.append(res)
                advance(desc, 1)
            ok = [r for r in rows if r["status"] == "ok"]  # 2. time: those that ran, interleaved in one process
            desc = f"{bench.op} {bench.label(size)} timing {len(ok)} impls"
            advance(desc, None)
            if ok:
                group = dict(job="time_group", op=bench.op, size=size, impls=[r["impl"] for r in ok],
                             modes=sorted({m for r in ok for m in r["modes"]}, key=["fwd", "fwd+bwd", "step"].index),
                             device=device, backend=backend, threads=args.threads, seed=0, policy=vars(policy))
                _merge_timing(ok, pool.run(group, timeout=timeout * max(1, len(ok))))
            results += rows
            advance(desc, 1)
    elapsed = time.perf_counter() - t_start
    info = dict(info, loadavg_at_end=measure.load_1min())
    sub = {"quick": "quick", "target": "target", "custom": "custom"}.get(preset, "")
    combined = None
    for op in ops:
        bench = load_bench(op)
        data = {"schema": report.SCHEMA, "slug": root.name, "generated": report.now_iso(), "machine": info,
                "config": {"preset": preset, "device": device, "backend": backend,
                           "backend_resolved": backend_resolved, "ops": [op], "threads": args.threads,
                           "isolated": not args.no_isolate, "timing_policy": vars(policy),
                           "elapsed_s": round(elapsed, 1)},
                "ops": {op: {"title": bench.title, "descriptions": bench.descriptions, "sizes": sizes[op],
                             "run_at": report.now_iso(), "preset": preset, "backend": backend_resolved,
                             "x_label": bench.x_label}},
                "results": [r for r in results if r["op"] == op], "ran_ops": [op]}
        data, written = report.write_all(root / op / sub if sub else root / op, data, plots=not args.no_plots)
        print(f"rlfuse bench: {op}: wrote " + ", ".join(str(p) for p in written), flush=True)
        combined = data if combined is None else report.combine(combined, data)
    report.print_table(combined)
    print(f"rlfuse bench: op scenarios done in {elapsed:.0f} s")
    return sum(r["status"] == "error" for r in results)


def _merge_timing(rows: list[dict], timing: dict) -> None:
    """Each row's timed modes from the interleaved group; its one memory call's time kept aside."""
    for r in rows:
        r["timing_group_wall_s"] = timing.get("wall_s")
        t = timing.get("impls", {}).get(r["impl"])
        if timing.get("status") != "ok" or t is None or t.get("status") != "ok":
            r.update(status="error", error=f"timing: {(t or {}).get('error') or timing.get('error') or 'not timed'}")
            continue
        for mode, m in r["modes"].items():
            if mode in t["modes"]:
                single = m.pop("time_s")
                for k in ("time_min_s", "time_max_s", "reps", "warmup_s"):
                    m.pop(k, None)
                m.update(t["modes"][mode], memory_call_time_s=single)


# --------------------------------------------------------------------------- run scenarios

def run_scenario(bench, sizes, args, pool, device, info, out_dir) -> int:
    """Each size: ``prepare`` once, then every (repeat, engine) in a fresh child, engines
    interleaved and the order reversed every other repeat; one result JSON per size."""
    failed = 0
    wanted = [e for e in bench.engines if not getattr(args, "engines", None) or e in _split(args.engines)]
    engines = [e for e in wanted if not bench.unavailable(e)]
    for e in set(wanted) - set(engines):
        print(f"rlfuse bench: {bench.op}: {e} skipped: {bench.unavailable(e)}", flush=True)
    repeats = args.repeats or (1 if args.quick else bench.repeats)
    for size in sizes:
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        errors = []
        with tempfile.TemporaryDirectory(prefix=f"rlfuse-bench-{bench.op}-") as work:
            ctx = bench.prepare(size, work)
            for r in range(repeats):
                for e in engines if r % 2 == 0 else engines[::-1]:
                    job = dict(job="run", op=bench.op, engine=e, size=size, ctx=ctx, device=device,
                               threads=args.threads or 1, seed=0)
                    res = pool.run(job, timeout=args.timeout or bench.timeout_s)
                    if res["status"] != "ok":
                        errors.append(f"{e}: {res.get('error')}")
                        print(f"rlfuse bench: {bench.op} {bench.label(size)} {e} failed: {res.get('error')}\n"
                              f"{res.get('traceback', '')}", file=sys.stderr, flush=True)
                        continue
                    runs[e].append({**res["metrics"], "load_at_start": res.get("load_at_start"),
                                    "wall_s": res.get("wall_s")})
                    print(f"  [{time.strftime('%H:%M:%S')}] {bench.op} {bench.label(size)} repeat {r + 1}/{repeats} "
                          f"{e}: {report.brief(res['metrics'])}", flush=True)
        if errors and not all(runs.values()):
            failed += 1
            continue
        res = bench.summarize(size, runs)
        res.update(repeats=repeats, errors=errors, load_1min=measure.load_1min(), measured_at=report.utc_now(),
                   machine=f"{info.get('cpu_model')}, {info.get('logical_cores')} cores"
                           + (f", {info['gpu']['name']}" if info.get("gpu") else ""))
        for path in report.write_run(out_dir, bench, res, plots=not args.no_plots):
            print(f"rlfuse bench: {bench.op}: wrote {path}", flush=True)
        print(report.run_markdown(bench, [res]).splitlines()[-1], flush=True)
    return failed


class _progress:
    """Progress lines: ``advance(desc, None)`` before a child, ``advance(desc, n)`` after it."""

    def __init__(self, total: int, disable: bool = False):
        self.total, self._done = total, 0

    def __enter__(self):
        return self._advance

    def _advance(self, desc, n):
        if n is None:
            print(f"  [{time.strftime('%H:%M:%S')}] {self._done + 1}/{self.total} {desc}", flush=True)
        else:
            self._done += n

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
