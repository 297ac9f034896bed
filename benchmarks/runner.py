"""``rlfuse bench``: run the benchmark suite, print the ratio table, write the reports.

    rlfuse bench                         # full sweep (CPU) or the GPU sizes (CUDA present)
    rlfuse bench --quick                 # all ops, small sweep (< 5 min on a 2-core CPU)
    rlfuse bench --ops gae ppo_loss      # some ops
    rlfuse bench --sizes target          # only the foundation targets' sizes
    rlfuse bench --sizes logprobs:N=8192,V=32000 gae:B=128,T=512
    rlfuse bench --gpu                   # force the GPU sizes (needs CUDA)
    rlfuse bench --ops generate [ARGS]   # the sampler benchmark (bench_generate.main(ARGS))
    rlfuse bench --ops e2e [ARGS]        # end-to-end GRPO step vs TRL (bench_e2e.main(ARGS))
    python -m rlfuse.benchmarks.runner --quick --out /tmp/bench

Reports go to OUT/<machine>/ (OUT defaults to benchmarks/results); --quick runs to
OUT/<machine>/quick/, --sizes target/custom to OUT/<machine>/<target|custom>/. Each op's rows
replace that op's rows of an earlier run in the same folder; other ops' rows are kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import machine, measure, report
from .spec import COMMAND_OPS, OPS, PRESETS, load_bench, size_key

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlfuse bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", metavar="OP",
                   help=f"ops to run (space or comma separated; default all): {', '.join(OPS)}; "
                        f"or one of {', '.join(COMMAND_OPS)}, whose own options follow")
    p.add_argument("--sizes", nargs="+", metavar="SPEC",
                   help=f"a preset ({', '.join(PRESETS)}) or explicit sizes 'K=V,K=V' / 'op:K=V,...' "
                        "(missing keys come from the op's target size)")
    p.add_argument("--quick", action="store_true", help="small sweep of every op (< 5 minutes on CPU)")
    p.add_argument("--gpu", action="store_true", help="GPU sizes on CUDA (default when CUDA is present)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="device (default: cuda when available)")
    p.add_argument("--backend", default=None,
                   help="rlfuse backend for the 'rlfuse' rows (default: cpp on CPU when built, else auto)")
    p.add_argument("--compare-backends", nargs="*", default=[], metavar="NAME",
                   help="also measure rlfuse on these backends, as 'rlfuse[NAME]' rows (e.g. torch)")
    p.add_argument("--impls", nargs="+", metavar="IMPL", help="only these implementations (rlfuse is always run)")
    p.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd", "step"), help="only these modes")
    p.add_argument("--out", default=None, help=f"results root (default {DEFAULT_OUT})")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each case (default: torch's)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per case before it is abandoned")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every case in this process (faster start; memory numbers less clean)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p


def _split(values):
    out = []
    for v in values or []:
        out += [x for x in v.replace(",", " ").split() if x]
    return out


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


def resolve_sizes(specs: list[str] | None, ops: list[str], default_preset: str) -> tuple[str, dict]:
    """(preset name, {op: [size, ...]}) from the --sizes arguments."""
    if not specs:
        return default_preset, {op: load_bench(op).sizes(default_preset) for op in ops}
    preset = None
    explicit: dict[str, list[dict]] = {op: [] for op in ops}
    for spec in specs:
        if spec in PRESETS:
            preset = spec if preset is None else preset
            for op in ops:
                explicit[op] += load_bench(op).sizes(spec)
            continue
        op_name, _, body = spec.rpartition(":")
        pairs = dict(kv.split("=", 1) for kv in body.split(",") if "=" in kv)
        if not pairs:
            raise SystemExit(f"rlfuse bench: cannot parse size spec {spec!r} (want K=V,K=V or op:K=V,...)")
        for op in ([op_name] if op_name else ops):
            if op not in ops:
                continue
            bench = load_bench(op)
            base = bench.default_size()
            if op_name or set(pairs) <= set(base):
                size = dict(base)
                size.update({k: _parse_value(v) for k, v in pairs.items()})
                explicit[op].append(size)
        preset = preset or "custom"
    for op in ops:  # de-duplicate, keep order
        seen, uniq = set(), []
        for s in explicit[op]:
            k = size_key(s)
            if k not in seen:
                seen.add(k)
                uniq.append(s)
        explicit[op] = uniq
    return preset or default_preset, explicit


def _command_op(argv: list[str]) -> tuple[str, list[str]] | None:
    """(op, its own argv) when ``--ops`` names one of COMMAND_OPS, else None. The command op
    gets every other argument, unparsed (``rlfuse bench --ops e2e --steps 3``)."""
    known = set(OPS) | set(COMMAND_OPS)
    for i, arg in enumerate(argv):
        if arg.startswith("--ops="):
            values, end = [arg.split("=", 1)[1]], i + 1
        elif arg == "--ops":
            end = i + 1  # nargs="+": the values run up to the next option or unknown word
            while end < len(argv) and not argv[end].startswith("-") and \
                    all(x in known for x in argv[end].replace(",", " ").split()):
                end += 1
            values = argv[i + 1:end]
        else:
            continue
        names = [x for v in values for x in v.replace(",", " ").split() if x]
        hits = [n for n in names if n in COMMAND_OPS]
        if not hits:
            return None
        if len(names) > 1:
            raise SystemExit(f"rlfuse bench: --ops {hits[0]} runs alone (got --ops {' '.join(names)}): "
                             "it has its own options")
        return hits[0], argv[:i] + argv[end:]
    return None


def run_command_op(op: str, argv: list[str]) -> int:
    """Dispatch to ``COMMAND_OPS[op]``'s ``main(argv) -> int``; one line when it is missing."""
    import importlib
    module = COMMAND_OPS[op]
    try:
        entry = importlib.import_module(module).main
    except (ImportError, AttributeError) as exc:
        print(f"rlfuse bench: --ops {op} needs {module}.main, which is not available here "
              f"({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    return int(entry(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_op(argv)
    if command is not None:
        machine.drop_repo_root_from_path()
        return run_command_op(*command)
    args = build_parser().parse_args(argv)
    machine.drop_repo_root_from_path()  # before anything imports transformers (see there)
    import torch

    ops = _split(args.ops) or list(OPS)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        print(f"rlfuse bench: unknown op(s) {unknown}; choose from {list(OPS)}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if args.gpu and not cuda:
        print("rlfuse bench: --gpu needs a CUDA device and none is available", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if (args.gpu or cuda) else "cpu")
    if device == "cuda" and not cuda:
        print("rlfuse bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    default_preset = "quick" if args.quick else ("gpu" if device == "cuda" or args.gpu else "full")
    specs = [x for v in args.sizes or [] for x in v.split()]
    preset, sizes = resolve_sizes(specs or None, ops, default_preset)
    if args.quick and not args.sizes:
        preset = "quick"

    import rlfuse.kernels as K
    available = K.available_backends()
    backend = args.backend or ("cpp" if device == "cpu" and "cpp" in available else "auto")
    if backend != "auto" and backend not in available:
        print(f"rlfuse bench: backend {backend!r} is not available here "
              f"({K.unavailable_reasons().get(backend, 'unknown')})", file=sys.stderr)
        return 2
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
            cases = []
            for impl in impls:
                modes = [m for m in bench.modes_for(impl) if not args.modes or m in args.modes]
                if modes:
                    cases.append(dict(op=op, size=size, impl=impl, modes=modes, device=device, backend=backend,
                                      threads=args.threads, seed=0, policy=measure.MEMORY_ONLY,
                                      label=bench.label(size)))
            if cases:
                groups.append((bench, size, cases))
    if args.list:
        for _bench, _size, cases in groups:
            for c in cases:
                print(f"{c['op']:<16} {c['label']:<32} {c['impl']:<28} {','.join(c['modes'])}")
        return 0

    info = machine.machine_info(device)
    slug = machine.machine_slug(info)
    sub = {"quick": "quick", "target": "target", "custom": "custom"}.get(preset, "")
    out_dir = Path(args.out) if args.out else DEFAULT_OUT
    out_dir = out_dir / slug / sub if sub else out_dir / slug
    n_cases = sum(len(c) for _b, _s, c in groups)
    print(f"rlfuse bench: {n_cases} cases in {len(groups)} groups on {slug} ({device}), preset {preset}, "
          f"rlfuse backend {backend_resolved} -> {out_dir}", flush=True)
    if info.get("loadavg_at_start") and info["loadavg_at_start"][0] > 0.5 * (info.get("logical_cores") or 1):
        print(f"rlfuse bench: warning: load average {info['loadavg_at_start']} - other processes are "
              "running, timings will be noisy (ratios less so: implementations are timed interleaved); "
              "multi-threaded ops suffer most - consider --threads 1 on a busy machine", flush=True)

    pool = measure.ChildPool(isolate=not args.no_isolate)
    results = []
    t_start = time.perf_counter()
    with _progress(n_cases + len(groups), disable=args.no_progress) as advance:
        for bench, size, cases in groups:
            timeout = args.timeout or bench.timeout_s
            # 1. peak memory: each implementation alone in a fresh process
            rows = []
            for case in cases:
                desc = f"{case['op']} {case['label']} {case['impl']} (memory)"
                advance(desc, None)
                res = pool.run(case, timeout=timeout)
                res.setdefault("label", case["label"])
                rows.append(res)
                advance(desc, 1)
            # 2. time: the implementations that ran, interleaved in one process
            ok = [r for r in rows if r["status"] == "ok"]
            desc = f"{bench.op} {bench.label(size)} timing {len(ok)} impls"
            advance(desc, None)
            if ok:
                group = dict(job="time_group", op=bench.op, size=size, impls=[r["impl"] for r in ok],
                             modes=sorted({m for r in ok for m in r["modes"]}, key=["fwd", "fwd+bwd", "step"].index),
                             device=device, backend=backend, threads=args.threads, seed=0, policy=vars(policy))
                timing = pool.run(group, timeout=timeout * max(1, len(ok)))
                for r in ok:
                    r["timing_group_wall_s"] = timing.get("wall_s")
                for r in ok:
                    t = timing.get("impls", {}).get(r["impl"])
                    if timing.get("status") != "ok" or t is None or t.get("status") != "ok":
                        why = (t or {}).get("error") or timing.get("error") or "not timed"
                        r.update(status="error", error=f"timing: {why}")
                        continue
                    for mode, m in r["modes"].items():
                        tm = t["modes"].get(mode)
                        if tm is None:
                            continue
                        single = m.pop("time_s")
                        for k in ("time_min_s", "time_max_s", "reps", "warmup_s"):
                            m.pop(k, None)
                        m.update(tm)
                        m["memory_call_time_s"] = single
            results += rows
            advance(desc, 1)
    elapsed = time.perf_counter() - t_start
    try:
        import os
        info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        pass

    data = {
        "schema": report.SCHEMA, "slug": slug, "generated": report.now_iso(), "machine": info,
        "config": {"preset": preset, "device": device, "backend": backend, "backend_resolved": backend_resolved,
                   "ops": ops, "threads": args.threads, "isolated": not args.no_isolate,
                   "timing_policy": vars(policy), "elapsed_s": round(elapsed, 1)},
        "ops": {}, "results": results, "ran_ops": ops,
    }
    for op in ops:
        bench = load_bench(op)
        data["ops"][op] = {"title": bench.title, "descriptions": bench.descriptions, "sizes": sizes[op],
                           "run_at": data["generated"], "preset": preset, "backend": backend_resolved,
                           "x_label": bench.x_label}
    data, written = report.write_all(out_dir, data, plots=not args.no_plots)
    report.print_table(data)
    print(f"rlfuse bench: done in {elapsed:.0f} s; wrote " + ", ".join(str(p) for p in written))
    errors = [r for r in results if r["status"] == "error"]
    return 1 if errors else 0


class _progress:
    """A rich progress bar (tqdm, then plain lines, as fallbacks)."""

    def __init__(self, total: int, disable: bool = False):
        self.total, self.disable = total, disable
        self._bar = None

    def __enter__(self):
        if self.disable:
            return self._plain
        try:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self._bar = Progress(TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"))
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self.total)
            return self._rich
        except ImportError:
            pass
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, unit="case")
            return self._tqdm
        except ImportError:
            return self._plain

    def _rich(self, desc, n):
        self._bar.update(self._task, description=desc, advance=n or 0)

    def _tqdm(self, desc, n):
        self._bar.set_description(desc)
        if n:
            self._bar.update(n)

    def _plain(self, desc, n):
        if n is None:
            self._done = getattr(self, "_done", 0)
            print(f"  [{time.strftime('%H:%M:%S')}] {self._done + 1}/{self.total} {desc}", flush=True)
        else:
            self._done = getattr(self, "_done", 0) + n

    def __exit__(self, *exc):
        if self._bar is not None:
            if hasattr(self._bar, "__exit__") and hasattr(self._bar, "add_task"):
                self._bar.__exit__(*exc)
            else:
                self._bar.close()
        return False


if __name__ == "__main__":
    sys.exit(main())
