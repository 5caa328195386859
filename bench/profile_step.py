"""Where the time of one CFG denoising step goes: a torch.profiler kernel table per backend.

    python bench/profile_step.py --preset dit-xl-2 --resolution 512 --dtype fp16 --out bench/results/profile-512

For each backend (default: torch, compile, triton), the same step `ldm-rt bench` times as
`denoise_step` (the DiT on [latents; latents], guidance, scheduler update; the triton backend
replays it from its CUDA graph) is called `--warmup` times, then recorded `--iters` times under
torch.profiler. Per backend it writes `<backend>.txt` (the kernel table, by device time) and
adds to `profile.json`: device milliseconds per step by kernel class (GEMM, attention,
adaLN/norm, RoPE, elementwise/other) and the top kernels. That is the table issue 5 asks for
when a speed target is missed. On the CPU (a smoke test with `--preset tiny --device cpu`)
the times are CPU operator times, and the triton backend is skipped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

CLASSES = (  # (class, pattern on the lower-cased kernel name); the first match wins
    ("attention", r"attn|attention|flash|fmha|sdpa|softmax"),
    ("adaln/norm", r"layer_?norm|modulate|adaln|rms_?norm|native_layer_norm|group_norm"),
    ("rope", r"rope|rotary"),
    ("gemm", r"gemm|matmul|(?<![a-z])b?mm(?![a-z])|addmm|cutlass|xmma|nvjet|cublas"),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for label, pattern in CLASSES:
        if re.search(pattern, low):
            return label
    return "elementwise/other"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for profile.json and <backend>.txt")
    p.add_argument("--preset", default="dit-xl-2", help="model preset (seeded random weights)")
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--backends", default="torch,compile,triton")
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=25, help="rows of the kernel table")
    return p.parse_args(argv)


def _device_us(event) -> float:
    """Self device time of a profiler row in microseconds (the attribute name moved across torch versions)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attr, None)
        if value:
            return float(value)
    return 0.0


def profile_backend(backend: str, components, device: torch.device, args) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from ldm_rt.bench import BenchSettings, make_pipeline, stage_calls

    settings = BenchSettings(backends=(backend,), resolutions=(args.resolution,), dtypes=(args.dtype,), steps=50)
    start = time.perf_counter()
    pipe = make_pipeline(backend, components, device, args.dtype)
    step = stage_calls(pipe, args.resolution, settings)["denoise_step"]
    with torch.no_grad():
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        setup_s = time.perf_counter() - start
        cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.iters):
                step()
            if cuda:
                torch.cuda.synchronize(device)
    events = prof.key_averages()
    if cuda:  # the kernels themselves (CUDA rows), by their own device time
        rows = [(e.key, _device_us(e), e.count) for e in events
                if getattr(e, "device_type", None) == DeviceType.CUDA and _device_us(e) > 0]
        sort_by = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    else:
        rows = [(e.key, float(e.self_cpu_time_total), e.count) for e in events if e.self_cpu_time_total > 0]
        sort_by = "self_cpu_time_total"
    rows.sort(key=lambda r: -r[1])
    total_us = sum(r[1] for r in rows)
    by_class: dict[str, float] = {}
    for name, us, _ in rows:
        by_class[kernel_class(name)] = by_class.get(kernel_class(name), 0.0) + us / args.iters / 1e3
    table = events.table(sort_by=sort_by, row_limit=args.top, max_name_column_width=90)
    (args.out / f"{backend}.txt").write_text(table + "\n")
    del pipe
    return {
        "time": "device (CUDA kernels)" if cuda else "CPU operators (self time)",
        "ms_per_step": total_us / args.iters / 1e3,
        "ms_per_step_by_class": dict(sorted(by_class.items(), key=lambda kv: -kv[1])),
        "top": [{"name": name, "ms_per_step": us / args.iters / 1e3, "calls_per_step": count / args.iters,
                 "class": kernel_class(name)} for name, us, count in rows[:args.top]],
        "setup_s": setup_s,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    from ldm_rt.bench import _reason, load_components, versions
    from ldm_rt.pipeline import resolve_device

    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    components, description = load_components(None, args.preset)
    report = {
        "command": " ".join(["python", "bench/profile_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions(), "model": description, "resolution": args.resolution, "dtype": args.dtype,
        "iters": args.iters, "backends": {},
    }
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        try:
            result = profile_backend(backend, components, device, args)
        except Exception as exc:  # noqa: BLE001 - recorded; the other backends still run
            result = {"skipped": _reason(exc)}
        report["backends"][backend] = result
        (args.out / "profile.json").write_text(json.dumps(report, indent=1) + "\n")
        if "skipped" in result:
            print(f"{backend}: skipped: {result['skipped']}")
            continue
        classes = ", ".join(f"{k} {v:.3f}" for k, v in result["ms_per_step_by_class"].items())
        print(f"{backend}: {result['ms_per_step']:.3f} ms/step ({result['time']}): {classes}")
    print(f"wrote {args.out / 'profile.json'}")
    return report


if __name__ == "__main__":
    main()
