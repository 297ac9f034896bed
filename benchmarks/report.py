"""The one reporter: JSON, markdown and PNG for both kinds of scenario, and the terminal table.

* op scenarios: ``results.json``, ``results.md`` (ratio columns first), one PNG (time and peak
  extra memory vs size, fwd and fwd+bwd) per scenario folder;
* run scenarios: one JSON per measured size, ``results.md`` rebuilt from every JSON in the
  folder (the scenario's ``columns``), one PNG (each engine's number per size)."""

from __future__ import annotations

import datetime as _dt
import inspect
import json
import math
from pathlib import Path

from . import analysis
from .spec import MB, OPS, load_bench, size_key

SCHEMA = 1


# --------------------------------------------------------------------------- formatting

def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_mem(b: int | None) -> str:
    if b is None:
        return "-"
    if b >= 1 << 30:
        return f"{b / (1 << 30):.2f} GiB"
    return f"{b / MB:.1f} MiB"


def fmt_speed(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f}x" if x < 100 else f"{x:.0f}x"


def fmt_memratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# --------------------------------------------------------------------------- merge / save

def merge(previous: dict | None, current: dict) -> dict:
    """Replace the previous run's rows for the ops run now; keep the other ops' rows (each op's
    rlfuse row and baselines always come from one run)."""
    if not previous or previous.get("schema") != SCHEMA or previous.get("slug") != current.get("slug"):
        return current
    ran = set(current["ops"])
    merged = dict(current)
    merged["results"] = [r for r in previous.get("results", []) if r["op"] not in ran] + current["results"]
    ops = {k: v for k, v in previous.get("ops", {}).items() if k not in ran}
    ops.update(current["ops"])
    merged["ops"] = ops
    return merged


def finalize(data: dict) -> dict:
    """Recompute ratios and target verdicts from the rows."""
    data["ratios"] = analysis.ratio_rows(data["results"])
    data["roofline"] = analysis.roofline_rows(data["results"])
    targets = []
    for op in data["ops"]:
        with _suppress():
            targets += list(load_bench(op).targets)
    data["targets"] = analysis.evaluate_targets(targets, data["ratios"], data["results"])
    return data


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], Exception)


def write_all(out_dir: Path, data: dict, plots: bool = True) -> tuple[dict, list[Path]]:
    """Merge ``data`` into ``out_dir``'s results.json and write json, markdown and plots;
    returns (the merged data, the paths written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path_json = out_dir / "results.json"
    previous = None
    if path_json.exists():
        with _suppress():
            previous = json.loads(path_json.read_text())
    data = finalize(merge(previous, data))
    path_json.write_text(json.dumps(data, indent=1, default=str) + "\n")
    written = [path_json]
    path_md = out_dir / "results.md"
    path_md.write_text(markdown(data))
    written.append(path_md)
    if plots:
        written += write_plots(out_dir, data)
    return data, written


# --------------------------------------------------------------------------- markdown

def _machine_lines(data: dict) -> list[str]:
    m = data["machine"]
    v = m.get("versions", {})
    lines = [
        f"- **Machine**: `{data['slug']}` - {m.get('cpu_model')} ({m.get('logical_cores')} logical cores"
        + (f", {m['physical_cores']} physical" if m.get("physical_cores") else "")
        + f", torch threads {m.get('torch_threads')}"
        + (f", {m['memory_gb']} GiB RAM" if m.get("memory_gb") else "") + ")",
    ]
    if m.get("gpu"):
        g = m["gpu"]
        lines.append(f"- **GPU**: {g['name']} x{g.get('count', 1)} ({g['memory_gb']} GiB, sm_{g['capability']}, "
                     f"CUDA {g.get('cuda')})")
    else:
        lines.append("- **GPU**: none")
    lines.append("- **Versions**: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    lines.append(f"- **rlfuse backend** for the `rlfuse` rows: `{data['config'].get('backend_resolved')}`"
                 f" (requested `{data['config'].get('backend')}`; available: {', '.join(m.get('backends', []))})")
    missing = m.get("backends_missing") or {}
    if missing:
        lines.append("- **Backends not available**: " + "; ".join(f"{k}: {val}" for k, val in missing.items()))
    if m.get("loadavg_at_start") is not None:
        lines.append(f"- **Load average at start**: {m['loadavg_at_start']}"
                     + (" - the machine was busy; timings are noisy" if m["loadavg_at_start"][0]
                        > 0.5 * (m.get("logical_cores") or 1) else ""))
    if m.get("loadavg_at_end") is not None:
        lines.append(f"- **Load average at end**: {m['loadavg_at_end']}")
    threads = data["config"].get("threads")
    lines.append(f"- **Run** (finished): {data['generated']}, preset `{data['config'].get('preset')}`, "
                 f"device `{data['config'].get('device')}`, torch threads per case: "
                 f"{threads if threads else 'default (' + str(m.get('torch_threads')) + ')'}, "
                 f"wall time {data['config'].get('elapsed_s')} s")
    return lines


def markdown(data: dict) -> str:
    out = [f"# rlfuse benchmarks - `{data['slug']}`", ""]
    out += _machine_lines(data)
    out += ["",
            "Time is the median of repeated calls after one warm-up call. Peak extra memory is the peak "
            "memory of one call over what was resident once the inputs were built (outputs and "
            "gradients included): on CPU the peak RSS of a fresh child process per case "
            "(`VmHWM`, reset right before the call), on a GPU `torch.cuda.max_memory_allocated`. "
            "`fwd` for the log-prob ops is the no_grad scoring path; `fwd+bwd` back-propagates into "
            "the inputs. Every baseline is measured in the same run as the rlfuse row it is compared with.",
            ""]
    targets = [t for t in data.get("targets", []) if t.get("device", "cpu") == data["config"].get("device")]
    if targets:
        out += ["## Foundation targets", "", "| status | target | measured | backend |", "|---|---|---|---|"]
        for t in targets:
            out.append(f"| **{t['status']}** | {t['text']} | {t.get('detail', '-')} | {t.get('backend') or '-'} |")
        out.append("")
    out += roofline_markdown(data)
    out += ["## rlfuse vs each baseline",
            "",
            "Time ratio = baseline time / rlfuse time (>1: rlfuse faster). Memory ratio = rlfuse peak extra / "
            "baseline peak extra (<1: rlfuse uses less; '-' where the baseline's peak extra is below the "
            "64 KiB measurement floor).",
            "",
            "| time ratio | memory ratio | op | size | mode | vs | kind | rlfuse time | baseline time "
            "| rlfuse peak extra | baseline peak extra |",
            "|---:|---:|---|---|---|---|---|---:|---:|---:|---:|"]
    order = {op: i for i, op in enumerate(OPS)}
    ratios = sorted(data.get("ratios", []), key=lambda r: (order.get(r["op"], 99), _size_order(data, r),
                                                           r["mode"], r["baseline"]))
    for r in ratios:
        out.append(f"| **{fmt_speed(r['speedup'])}** | **{fmt_memratio(r['memory_ratio'])}** | {r['op']} | "
                   f"{r['label']} | {r['mode']} | {r['baseline']} | {r['kind']} | {fmt_time(r['rlfuse_time_s'])} | "
                   f"{fmt_time(r['baseline_time_s'])} | {fmt_mem(r['rlfuse_peak_extra_bytes'])} | "
                   f"{fmt_mem(r['baseline_peak_extra_bytes'])} |")
    out += ["", "## All measurements", "",
            "| op | size | mode | impl | time (median) | min | reps | first call | peak extra | extras |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    skipped = []
    for r in sorted(data["results"], key=lambda r: (order.get(r["op"], 99), _size_order(data, r))):
        if r["status"] != "ok":
            skipped.append(r)
            continue
        impl = r["impl"] + (f" ({r['backend']})" if r.get("backend") else "")
        for mode, m in r["modes"].items():
            extras = {k: v for k, v in m.items() if k not in (
                "time_s", "time_min_s", "time_max_s", "reps", "warmup_s", "peak_extra_bytes", "memory_method",
                "bytes_moved", "copy_gbps", "floor_s", "floor_fraction", "achieved_gbps")}
            ex = ", ".join(f"{k}={_short(v)}" for k, v in extras.items())
            out.append(f"| {r['op']} | {r.get('label', '')} | {mode} | {impl} | {fmt_time(m['time_s'])} | "
                       f"{fmt_time(m.get('time_min_s'))} | {m.get('reps', '-')} | {fmt_time(m.get('warmup_s'))} | "
                       f"{fmt_mem(m.get('peak_extra_bytes'))} | {ex} |")
    if skipped:
        out += ["", "## Skipped or failed", "", "| op | size | impl | status | reason |", "|---|---|---|---|---|"]
        for r in skipped:
            why = (r.get("reason") or r.get("error") or "").replace("|", "/").replace("\n", " ")
            out.append(f"| {r['op']} | {r.get('label', '')} | {r['impl']} | {r['status']} | {why} |")
    out += ["", "## Implementations", ""]
    for op, meta in data.get("ops", {}).items():
        out.append(f"**{op}** - {meta.get('title', '')}")
        out.append("")
        for impl, desc in meta.get("descriptions", {}).items():
            out.append(f"- `{impl}`: {desc}")
        out.append("")
    return "\n".join(out) + "\n"


def fmt_fraction(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def roofline_markdown(data: dict) -> list[str]:
    """The bandwidth-floor table: every timed row whose op declares the bytes it must move."""
    rows = data.get("roofline") or []
    if not rows:
        return []
    order = {op: i for i, op in enumerate(OPS)}
    rows = sorted(rows, key=lambda r: (order.get(r["op"], 99), _size_order(data, r), r["mode"], not r["primary"],
                                       r["impl"]))
    gpu = any(r.get("tensor_core_fraction") is not None for r in rows)
    bw = sorted({r["copy_gbps"] for r in rows if r.get("copy_gbps")})
    out = ["## Roofline: fraction of the memory-bandwidth floor", "",
           "Floor = the bytes the op must move (each op's `bytes_moved`: every input read and every output "
           "written the fewest times its contract allows) / the bandwidth of a large copy measured in the same "
           f"process (read + write; {', '.join(f'{b:.1f}' for b in bw)} GB/s). Fraction = floor / time: 100% is "
           "copy speed; above 100% the data sat in cache."
           + (" Tensor cores: the op's matrix FLOPs / time / the dense bf16 datasheet peak." if gpu else ""), "",
           "| op | size | mode | impl | time | bytes moved | floor | fraction of floor | achieved GB/s"
           + (" | tensor-core fraction |" if gpu else " |"),
           "|---|---|---|---|---:|---:|---:|---:|---:" + ("|---:|" if gpu else "|")]
    for r in rows:
        impl = f"**{r['impl']}**" if r["primary"] else r["impl"]
        line = (f"| {r['op']} | {r['label']} | {r['mode']} | {impl} | {fmt_time(r['time_s'])} | "
                f"{fmt_mem(r['bytes_moved'])} | {fmt_time(r['floor_s'])} | **{fmt_fraction(r['floor_fraction'])}** | "
                f"{r['achieved_gbps']:.1f} |")
        if gpu:
            line += f" {fmt_fraction(r.get('tensor_core_fraction'))} |"
        out.append(line)
    return out + [""]


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _size_order(data: dict, r: dict) -> int:
    sizes = data.get("ops", {}).get(r["op"], {}).get("sizes", [])
    key = size_key(r["size"])
    for i, s in enumerate(sizes):
        if size_key(s) == key:
            return i
    return len(sizes)


# --------------------------------------------------------------------------- plots

def write_plots(out_dir: Path, data: dict) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return []
    written = []
    for op in data.get("ops", {}):
        rows = [r for r in data["results"] if r["op"] == op and r["status"] == "ok" and r["modes"]]
        if not rows:
            continue
        sizes = data["ops"][op].get("sizes") or []
        keys = [size_key(s) for s in sizes]
        for r in rows:
            k = size_key(r["size"])
            if k not in keys:
                keys.append(k)
                sizes.append(r["size"])
        present = {size_key(r["size"]) for r in rows}
        idx = [i for i, k in enumerate(keys) if k in present]
        labels = [rows_label(rows, keys[i]) for i in idx]
        modes = [m for m in ("fwd", "fwd+bwd", "step") if any(m in r["modes"] for r in rows)]
        impls = []
        for r in rows:
            if r["impl"] not in impls:
                impls.append(r["impl"])
        fig, axes = plt.subplots(len(modes), 2, figsize=(12, 3.6 * len(modes) + 0.6), squeeze=False)
        for mi, mode in enumerate(modes):
            for col, (metric, ylabel, scale) in enumerate((("time_s", "time (ms)", 1e3),
                                                           ("peak_extra_bytes", "peak extra memory (MiB)", 1 / MB))):
                ax = axes[mi][col]
                for ii, impl in enumerate(impls):
                    xs, ys = [], []
                    for j, i in enumerate(idx):
                        rr = [r for r in rows if r["impl"] == impl and size_key(r["size"]) == keys[i]]
                        if rr and mode in rr[0]["modes"] and rr[0]["modes"][mode].get(metric) is not None:
                            xs.append(j)
                            ys.append(max(rr[0]["modes"][mode][metric] * scale, 1e-3))
                    if not xs:
                        continue
                    style = dict(linewidth=2.6, color="black", zorder=5) if impl == "rlfuse" else dict(linewidth=1.4)
                    if len(idx) == 1:
                        ax.bar(ii, ys[0], label=impl, color=style.get("color"))
                    else:
                        ax.plot(xs, ys, marker="o", label=impl, **style)
                ax.set_yscale("log")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{op} {mode}: {ylabel.split(' (')[0]}", fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                if len(idx) == 1:
                    ax.set_xticks(range(len(impls)))
                    ax.set_xticklabels(impls, rotation=20, ha="right", fontsize=8)
                else:
                    ax.set_xticks(range(len(idx)))
                    ax.set_xticklabels(labels, rotation=15, ha="right", fontsize=8)
                if mi == 0 and col == 0:
                    ax.legend(fontsize=8)
        backend = data["config"].get("backend_resolved")
        fig.suptitle(f"{data['ops'][op].get('title', op)} - {data['slug']} (rlfuse backend: {backend})", fontsize=11)
        fig.tight_layout()
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def rows_label(rows, key) -> str:
    for r in rows:
        if size_key(r["size"]) == key:
            return r.get("label", "")
    return ""


# --------------------------------------------------------------------------- terminal

def summary_lines(data: dict) -> list[str]:
    """The run in a few lines: rlfuse's ratio against each baseline, the targets' verdicts, each
    rlfuse row's share of the bandwidth floor and what failed (``rlfuse bench`` and pytest's summary)."""
    ran = set(data.get("ran_ops", data.get("ops", ())))
    out = ["time ratio = baseline / rlfuse (>1: rlfuse faster); memory ratio = rlfuse / baseline peak extra"]
    for r in data.get("ratios", []):
        if r["op"] in ran:
            out.append(f"{fmt_speed(r['speedup']):>8}  mem {fmt_memratio(r['memory_ratio']):>6}  {r['op']:<16} "
                       f"{r['label']:<28} {r['mode']:<8} vs {r['baseline']} ({fmt_time(r['rlfuse_time_s'])} vs "
                       f"{fmt_time(r['baseline_time_s'])})")
    out += [f"[{t['status']}] {t['text']}: {t.get('detail', '')}" for t in data.get("targets", [])
            if t["status"] != "not measured" and t["op"] in ran]
    out += [f"roofline: {r['op']} {r['label']} {r['mode']} {r['impl']}: {fmt_fraction(r['floor_fraction'])} of the "
            f"bandwidth floor ({fmt_time(r['time_s'])} vs {fmt_time(r['floor_s'])})"
            for r in data.get("roofline", []) if r["primary"] and r["op"] in ran]
    out += [f"{r['status']}: {r['op']} {r.get('label', '')} {r['impl']}: {r.get('reason') or r.get('error')}"
            for r in data.get("results", []) if r["status"] != "ok" and r["op"] in ran]
    return out


def print_table(data: dict) -> None:
    print("\n".join(summary_lines(data)), flush=True)


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def combine(a: dict, b: dict) -> dict:
    """Two op reports as one (for the terminal table)."""
    out = dict(a)
    for key in ("results", "ratios", "roofline", "targets", "ran_ops"):
        out[key] = list(a.get(key, [])) + list(b.get(key, []))
    out["ops"] = {**a.get("ops", {}), **b.get("ops", {})}
    return out


# --------------------------------------------------------------------------- run scenarios

def brief(metrics: dict) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in metrics.items() if isinstance(v, (int, float)))[:200]


def write_run(out_dir: Path, bench, res: dict, plots: bool = True) -> list[Path]:
    """Write ``res`` as ``<stem>.json`` and rebuild results.md (and the PNG) from every JSON here."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{bench.stem(res)}.json"
    path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    rows = []
    for p in sorted(out_dir.glob("*.json")):
        with _suppress():  # a file this scenario's columns cannot read (an older format) is left out
            row = json.loads(p.read_text())
            bench.columns(row)
            rows.append(row)
    rows.sort(key=lambda r: str(r.get("measured_at", "")))
    md = out_dir / "results.md"
    md.write_text(run_markdown(bench, rows))
    written = [path, md]
    if plots:
        written += write_run_plot(out_dir / f"{bench.op}.png", bench, rows)
    return written


def run_markdown(bench, rows: list[dict]) -> str:
    """The scenario's table: one row per result (its ``columns``), machine, load and date last."""
    doc = inspect.cleandoc(bench.__doc__ or bench.title)
    out = [f"# {bench.title}", "", doc, ""]
    if not rows:
        return "\n".join(out) + "\n"
    cols = [h for h, _ in bench.columns(rows[-1])] + ["repeats", "load", "measured"]
    out += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = dict(bench.columns(r))
        load = r.get("load_1min")
        out.append("| " + " | ".join([*(str(cells.get(h, "-")) for h in cols[:-3]), str(r.get("repeats", "-")),
                                      "-" if load is None else f"{load:.1f}", str(r.get("measured_at", "-"))]) + " |")
    return "\n".join(out) + "\n"


def write_run_plot(path: Path, bench, rows: list[dict]) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return []
    latest = {}
    for r in rows:  # the latest result of each size, named by its file's stem
        latest[bench.stem(r).removeprefix(bench.op + "-")] = r
    values = {k: bench.plot_values(r) for k, r in latest.items()}
    values = {k: v for k, v in values.items() if v}
    if not values:
        return []
    engines = sorted({e for v in values.values() for e in v})
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(values) * max(1, len(engines))), 4.5))
    width = 0.8 / max(1, len(engines))
    for i, e in enumerate(engines):
        ax.bar([j + i * width for j in range(len(values))], [v.get(e, 0) for v in values.values()], width, label=e)
    ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(values))])
    ax.set_xticklabels(list(values), rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(bench.plot_label)
    ax.set_title(bench.title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


__all__ = ["fmt_mem", "fmt_time", "markdown", "now_iso", "print_table", "run_markdown", "write_all", "write_plots",
           "write_run"]
