"""What a run's rows say: rlfuse's ratio against every implementation measured at the same
(op, size, mode, device), and each :class:`~.spec.Target`'s verdict (PASS / MISS / not
measured) from those ratios and from the rows' roofline fields."""

from __future__ import annotations

import math

from .spec import Target, size_key

MEMORY_FLOOR = 64 << 10  # bytes: smaller peak-extra readings are at the measurement's noise floor


def ratio_rows(results: list[dict]) -> list[dict]:
    """rlfuse (each op's primary impl) vs every other impl measured at the same
    (op, size, mode, device)."""
    index = {}
    for r in results:
        if r.get("status") != "ok":
            continue
        for mode, m in r["modes"].items():
            key = (r["op"], size_key(r["size"]), mode, r["device"])
            index.setdefault(key, {})[r["impl"]] = (r, m)
    rows = []
    primaries = {}
    for r in results:
        if r.get("primary"):
            primaries[r["op"]] = r["impl"]
    for (op, _sk, mode, dev), impls in index.items():
        primary = primaries.get(op, "rlfuse")
        if primary not in impls:
            continue
        pr, pm = impls[primary]
        for impl, (r, m) in impls.items():
            if impl == primary:
                continue
            speed = m["time_s"] / pm["time_s"] if pm["time_s"] > 0 else math.inf
            pb, bb = pm.get("peak_extra_bytes"), m.get("peak_extra_bytes")
            # below ~64 KiB the RSS measurement is at its floor (pages, allocator slack): no ratio
            mem_ratio = pb / bb if pb is not None and bb is not None and bb >= MEMORY_FLOOR else None
            rows.append({
                "op": op, "size": pr["size"], "label": pr.get("label", ""), "mode": mode,
                "device": dev, "baseline": impl, "kind": r.get("kind", "baseline"),
                "speedup": speed, "memory_ratio": mem_ratio,
                "rlfuse_time_s": pm["time_s"], "baseline_time_s": m["time_s"],
                "rlfuse_peak_extra_bytes": pm["peak_extra_bytes"],
                "baseline_peak_extra_bytes": m["peak_extra_bytes"],
                "backend": pr.get("backend"),
            })
    return rows


MACHINE_KINDS = ("floor_fraction", "max_time", "max_extra_memory")


def primary_row(results: list[dict], op: str, size: dict, mode: str, device: str) -> dict | None:
    """rlfuse's measured mode dict (plus ``backend``) of (op, size, mode, device), or None."""
    for r in results:
        if (r.get("status") == "ok" and r.get("primary") and r["op"] == op and r["device"] == device
                and size_key(r["size"]) == size_key(size) and mode in r["modes"]):
            return dict(r["modes"][mode], backend=r.get("backend"))
    return None


def roofline_rows(results: list[dict]) -> list[dict]:
    """One row per measured (op, size, mode, impl) that has a bandwidth floor."""
    rows = []
    for r in results:
        if r.get("status") != "ok":
            continue
        for mode, m in r["modes"].items():
            if m.get("floor_fraction") is None:
                continue
            rows.append({"op": r["op"], "size": r["size"], "label": r.get("label", ""), "mode": mode,
                         "impl": r["impl"], "primary": bool(r.get("primary")), "device": r["device"],
                         **{k: m.get(k) for k in ("time_s", "bytes_moved", "copy_gbps", "floor_s",
                                                  "floor_fraction", "achieved_gbps", "achieved_tflops",
                                                  "tensor_core_fraction")}})
    return rows


def evaluate_targets(targets: list[Target], ratios: list[dict], results: list[dict] = ()) -> list[dict]:
    """Each target's verdict: ratio kinds from ``ratios``, machine kinds from rlfuse's row in ``results``."""
    out = []
    for t in targets:
        entry = {"op": t.op, "text": t.text, "size": t.size, "mode": t.mode, "baseline": t.baseline,
                 "kind": t.kind, "target": t.value, "device": t.device}
        if t.kind in MACHINE_KINDS:
            m = primary_row(list(results), t.op, t.size, t.mode, t.device)
            if m is None or (t.kind == "floor_fraction" and m.get("floor_fraction") is None) \
                    or (t.kind == "max_extra_memory" and m.get("peak_extra_bytes") is None):
                entry.update(status="not measured")
            else:
                entry["backend"] = m.get("backend")
                entry.update(_machine_verdict(t, m))
            out.append(entry)
            continue
        match = [r for r in ratios if r["op"] == t.op and r["mode"] == t.mode and r["baseline"] == t.baseline
                 and size_key(r["size"]) == size_key(t.size) and r["device"] == t.device]
        if not match:
            entry.update(status="not measured")
            out.append(entry)
            continue
        r = match[0]
        entry["backend"] = r.get("backend")
        if t.kind == "speedup":
            got = r["speedup"]
            ok = got >= t.value
            entry.update(measured=got, status="PASS" if ok else "MISS",
                         detail=f"{got:.2f}x faster (target >= {t.value:g}x)"
                         + ("" if ok else f"; short by {t.value / got:.2f}x"))
        elif t.kind == "time_within":
            got = 1.0 / r["speedup"] if r["speedup"] else math.inf
            ok = got <= t.value
            entry.update(measured=got, status="PASS" if ok else "MISS",
                         detail=f"rlfuse time = {got:.2f}x baseline (target <= {t.value:g}x)"
                         + ("" if ok else f"; over by {got / t.value:.2f}x"))
        elif t.kind in ("memory_fraction", "memory_lower"):
            got = r["memory_ratio"]
            limit = t.value if t.kind == "memory_fraction" else 1.0
            ok = got is not None and (got <= limit if t.kind == "memory_fraction" else got < 1.0)
            shown = "n/a" if got is None else f"{got:.3f}"
            entry.update(measured=got, status="PASS" if ok else "MISS",
                         detail=f"peak extra memory = {shown}x baseline "
                         f"(target {'<=' if t.kind == 'memory_fraction' else '<'} {limit:g}x)"
                         + ("" if ok or got is None else f"; over by {got / limit:.2f}x"))
        out.append(entry)
    return out



def _machine_verdict(t: Target, m: dict) -> dict:
    if t.kind == "floor_fraction":
        got = m["floor_fraction"]
        ok = got >= t.value
        return dict(measured=got, status="PASS" if ok else "MISS",
                    detail=f"{got:.0%} of the bandwidth floor ({m['time_s'] * 1e3:.2f} ms vs floor "
                    f"{m['floor_s'] * 1e3:.2f} ms at {m['copy_gbps']:.1f} GB/s; target >= {t.value:.0%})")
    if t.kind == "max_time":
        got = m["time_s"]
        ok = got <= t.value
        return dict(measured=got, status="PASS" if ok else "MISS",
                    detail=f"{got * 1e3:.1f} ms (target <= {t.value * 1e3:g} ms)"
                    + ("" if ok else f"; over by {got / t.value:.2f}x"))
    if t.kind == "max_extra_memory":
        got = m["peak_extra_bytes"] - t.allowance_bytes
        ok = got <= t.value
        return dict(measured=got, status="PASS" if ok else "MISS",
                    detail=f"{got / 2**30:.2f} GiB beyond {t.allowance_bytes / 2**30:.2f} GiB held anyway "
                    f"(target <= {t.value / 2**30:.2f} GiB)")
    raise ValueError(f"unknown target kind {t.kind!r} ({t.op} {t.text})")
