"""Markdown tables for bench/RESULTS.md from the files the benchmarks write, so figures are
copied by a program, not by hand.

    python bench/report.py bench/results/dit-xl-2-256/results.json ...    # `ldm-rt bench` output
    python bench/report.py bench/results/dit-diffusers/dit_diffusers.json  # bench/dit_diffusers.py
    python bench/report.py bench/results/profile-512/profile.json          # bench/profile_step.py

Per `ldm-rt bench` file: the device line (GPU or CPU, driver, versions, the exact command), then
one table per resolution and dtype with each stage's median (p90) ms per backend, the ratio of
the chosen backend against torch eager and against the best torch.compile mode, and below it
the one-time costs (load, first call of each stage) and peak GPU memory. bench/kernel_bench.py
writes its own kernels.md. Skipped backends are listed with their reasons.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STAGE_ORDER = ["text_encoder", "denoise_step", "denoise_loop", "vae_encode", "vae_decode", "end_to_end", "img2img"]


def _ms(stats: dict | None) -> str:
    if not stats:
        return ""
    if "skipped" in stats:
        return "skipped"
    return f"{stats['median_ms']:.3f} ({stats['p90_ms']:.3f})" if stats["median_ms"] < 100 else \
        f"{stats['median_ms']:.1f} ({stats['p90_ms']:.1f})"


def device_line(results: dict) -> str:
    d, v = results["device"], results["versions"]
    kind = "CPU" if d["type"] == "cpu" else "GPU"
    name = d.get("name") or d.get("processor") or d["type"]
    parts = [f"**{kind}: {name}**" + (f" ({d['cpu_count']} cores, {d['torch_threads']} torch threads)"
                                      if kind == "CPU" else "")]
    if d.get("driver"):
        parts.append(f"driver {d['driver']}")
    parts += [f"{k} {val}" for k, val in v.items() if val]
    return ", ".join(parts)


def bench_tables(results: dict, focus: str) -> list[str]:
    """One table per (resolution, dtype) of an `ldm-rt bench` results.json."""
    s = results["settings"]
    lines = [device_line(results) + ".",
             f"Model: {results['model']['source']}; batch {s['batch']} image(s), DiT batch {s['dit_batch']} with CFG, "
             f"{s['steps']} steps; {'wall clock' if results['device']['type'] == 'cpu' else 'CUDA events'}; "
             f"median (p90) ms over {s['iters']} calls ({s['loop_iters']} for the loop and end to end).",
             f"Command: `{results['command']}`", ""]
    runs = results["runs"]
    skipped = [r for r in runs if r["status"] != "ok"]
    keys = sorted({(r["resolution"], r["dtype"]) for r in runs})
    for px, dtype in keys:
        ok = [r for r in runs if (r["resolution"], r["dtype"]) == (px, dtype) and r["status"] == "ok"]
        if not ok:
            continue
        names = [r["backend"] for r in ok]
        mine = next((r for r in ok if r["backend"] == focus), None)
        header = ["stage"] + [f"{n} ms" for n in names]
        if mine:
            header += [f"{focus} vs torch", f"{focus} vs best compile"]
        lines += [f"{px} px, {dtype}:", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for stage in STAGE_ORDER:
            if not any(stage in r["stages"] for r in ok):
                continue
            row = [stage] + [_ms(r["stages"].get(stage)) for r in ok]
            if mine:
                for vs in ("vs_torch_eager", "vs_best_compile"):
                    ratio = mine["speedup"].get(vs, {}).get(stage)
                    noisy = stage in mine.get("noisy", {}).get(vs, [])
                    row.append("" if ratio is None else f"{ratio:.2f}x" + (" (noisy)" if noisy else ""))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        for r in ok:
            first = r["one_time"].get("first_call_ms", {})
            cost = f"load {r['one_time'].get('load_s', 0):.1f} s"
            if first:
                cost += ", first calls " + ", ".join(f"{k} {v / 1000:.2f} s" for k, v in first.items())
            if r.get("peak_memory_mib") is not None:
                cost += f", peak GPU memory {r['peak_memory_mib']:.0f} MiB"
            lines.append(f"- {r['backend']}: {cost}")
        lines.append("")
    for r in skipped:
        lines.append(f"- skipped: {r['backend']} {r['dtype']} {r['resolution']} px: {r['reason']}")
    return lines + ([""] if skipped else [])


def dit_diffusers_tables(data: dict) -> list[str]:
    """bench/dit_diffusers.py's JSON: per size and dtype, each implementation's median (p90) ms,
    ldm-rt's speed-up over diffusers compiled (else eager), and the image PSNRs."""
    v = data["versions"]
    lines = [f"**{data['device']}**, " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + f"; {data['config']}.",
             f"Command: `python bench/dit_diffusers.py {' '.join(data['argv'])}`", "",
             "| px | dtype | implementation | median (p90) ms | speed-up | first call s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in data["latency"]:
        ups = [f"{s['speedup']:.2f}x vs {s['vs']}" for s in data["speedup"]
               if (s["px"], s["dtype"], s["impl"]) == (row["px"], row["dtype"], row["impl"])]
        first = f"{row['first_call_ms'] / 1000:.2f}" if "first_call_ms" in row else ""
        lines.append(f"| {row['px']} | {row['dtype']} | {row['impl']} | {_ms(row)} | {ups[0] if ups else ''} | {first} |")
    if data["images"]:
        keys = [k for k in data["images"][0] if k.startswith("psnr_")]
        lines += ["", "| px | dtype | steps | " + " | ".join(k[5:] + " dB" for k in keys) + " |",
                  "| --- | --- | --- |" + " --- |" * len(keys)]
        for row in data["images"]:
            lines.append(f"| {row['px']} | {row['dtype']} | {row['steps']} | "
                         + " | ".join(f"{row[k]:.1f}" if k in row else "" for k in keys) + " |")
    for err in data["errors"]:
        lines.append(f"- error: {err['px']} px {err['dtype']} {err['impl']}: {err['error']}")
    return lines + [""]


def profile_tables(data: dict, top: int = 5) -> list[str]:
    """bench/profile_step.py's JSON: per backend, milliseconds per step by kernel class, then the top kernels."""
    ok = {name: b for name, b in data["backends"].items() if "skipped" not in b}
    classes = list(dict.fromkeys(c for b in ok.values() for c in b["ms_per_step_by_class"]))
    v = data["versions"]
    lines = [f"**{data['device']}**, torch {v.get('torch')}, triton {v.get('triton')}; {data['model']}, "
             f"{data['resolution']} px, {data['dtype']}, {data['iters']} steps recorded.",
             f"Command: `{data['command']}`", "",
             "| backend | ms per step | " + " | ".join(classes) + " |", "| --- | --- |" + " --- |" * len(classes)]
    for name, b in ok.items():
        lines.append(f"| {name} | {b['ms_per_step']:.3f} | "
                     + " | ".join(f"{b['ms_per_step_by_class'].get(c, 0.0):.3f}" for c in classes) + " |")
    for name, b in data["backends"].items():
        if "skipped" in b:
            lines.append(f"- skipped: {name}: {b['skipped']}")
            continue
        lines.append(f"- {name}, top kernels: " + "; ".join(
            f"`{k['name'][:60]}` {k['ms_per_step']:.3f} ms ({k['class']})" for k in b["top"][:top]))
    return lines + [""]


def report(paths: list[Path], focus: str = "triton") -> str:
    out = []
    for path in paths:
        data = json.loads(path.read_text())
        out += [f"### {path}", ""]
        if "runs" in data and "settings" in data:
            out += bench_tables(data, focus)
        elif "backends" in data and "resolution" in data:
            out += profile_tables(data)
        else:
            out += dit_diffusers_tables(data)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", type=Path, nargs="+", help="results.json / dit_diffusers.json / profile.json files")
    p.add_argument("--focus", default="triton", help="the backend whose ratios get columns (default: triton)")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(report(args.files, args.focus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
