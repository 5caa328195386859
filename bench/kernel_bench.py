"""Kernel micro-benchmarks for issue 5: our Triton kernels against PyTorch baselines, same run.

    python bench/kernel_bench.py attention --out bench/results/kernels-h100   # TFLOP/s
    python bench/kernel_bench.py adaln --out ...                              # GB/s
    python bench/kernel_bench.py rope --out ...                               # GB/s
    python bench/kernel_bench.py all --out ...

- attention, B=2, fp16/bf16, H x D = 16x72, 8x128, 24x64, N = 256/1024/4096: ours (split head
  dim; with fused RoPE; with the head dim padded to a power of two, where it differs), SDPA
  with the flash backend (torch.nn.attention.sdpa_kernel; with RoPE applied eagerly first),
  and eager math (`ldm_rt.ops.attention`). TFLOP/s = 4 B H N^2 D / time (RoPE not counted).
- adaln, B=2, N=4096, D=1152: `layernorm_modulate` and `gated_residual_layernorm_modulate`,
  ours, torch.compile of the reference expression, eager reference, and `torch.clone` of x
  (the copy-bandwidth yardstick). GB/s = bytes every implementation must move / time.
- rope, x (2, 16, 4096, 72): ours, torch.compile and eager `ops.apply_rope`, clone.

Timing: each implementation is captured in a CUDA graph that calls it on `copies` different
input buffers (so memory-bound ops read DRAM, not a warm L2), replayed `--iters` times behind a
short GPU spin (so host launch latency is not timed); CUDA events give per-call milliseconds,
reported as median and p90. Our outputs are compared with the reference by the tolerance table
(`op` rows) in the same run. Writes kernels.json and kernels.md into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Triton kernel micro-benchmarks (CUDA only).")
    p.add_argument("op", choices=["attention", "adaln", "rope", "all"])
    p.add_argument("--out", type=Path, required=True, help="directory for kernels.json and kernels.md")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, nargs="+", default=[256, 1024, 4096], help="attention sequence lengths")
    p.add_argument("--heads", nargs="+", default=["16x72", "8x128", "24x64"], help="attention H x D")
    p.add_argument("--tokens", type=int, default=4096, help="adaln/rope N")
    p.add_argument("--hidden", type=int, default=1152, help="adaln D")
    p.add_argument("--warmup", type=int, default=5, help="graph replays before timing")
    p.add_argument("--iters", type=int, default=30, help="timed graph replays")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled baselines")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    args = p.parse_args(argv)
    try:
        args.heads = [tuple(int(v) for v in hd.lower().split("x")) for hd in args.heads]
        assert all(len(hd) == 2 for hd in args.heads)
    except (ValueError, AssertionError):
        p.error(f"--heads takes HxD pairs such as 16x72, got {args.heads}")
    if min(args.seq + [args.batch, args.tokens, args.hidden, args.iters]) < 1 or args.warmup < 0:
        p.error("sizes, --iters must be >= 1 and --warmup >= 0")
    return args


# ----------------------------------------------------------------------------------- timing


def measure(calls: list[Callable[[], object]], warmup: int, iters: int) -> dict[str, float]:
    """Per-call GPU milliseconds (median, p90) of one graph that runs every callable in order."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up: JIT, autotune, compile, allocator
        for call in calls[:2]:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(warmup):
        graph.replay()
    events = []
    for _ in range(iters):
        torch.cuda._sleep(100_000)  # keep the GPU busy while the host queues the timed replay
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    from ldm_rt.bench import summarize  # the same median / p90 as `ldm-rt bench`

    return summarize([s.elapsed_time(e) / len(calls) for s, e in events])


def copies_for(bytes_per_call: int, min_calls: int = 8) -> int:
    """How many input sets make the graph's working set 3x the L2 cache (at least `min_calls`)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(min_calls, math.ceil(3 * l2 / max(bytes_per_call, 1)))


def cycle(make: Callable[[int], Callable[[], object]], n_inputs: int, n_calls: int) -> list[Callable[[], object]]:
    fns = [make(i) for i in range(n_inputs)]
    return [fns[i % n_inputs] for i in range(n_calls)]


def run_case(name: str, calls: list[Callable[[], object]], args, work: float, unit: str) -> dict:
    try:
        t = measure(calls, args.warmup, args.iters)
    except Exception as exc:  # a baseline that cannot run here (e.g. no flash kernel for a head dim)
        torch.cuda.synchronize()
        return {"impl": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    rate = work / (t["median_ms"] * 1e-3) / 1e12 if unit == "TFLOP/s" else work / (t["median_ms"] * 1e-3) / 1e9
    return {"impl": name, **t, unit: rate}


def parity(out: torch.Tensor, ref: torch.Tensor, dtype: str) -> str:
    from ldm_rt.parity import compare

    return str(compare(out.float(), ref.float(), "op", dtype))


# ----------------------------------------------------------------------------------- cases


def bench_attention(args, emit: Callable[[dict], None]) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ldm_rt import kernels, ops
    from ldm_rt.kernels import flash_attention

    rows = []
    for dname in args.dtype:
        dtype = DTYPES[dname]
        for heads, d in args.heads:
            for n in args.seq:
                b = args.batch
                g = torch.Generator(device="cuda").manual_seed(0)
                shape = (b, heads, n, d)
                per_call = 4 * b * heads * n * d * dtype.itemsize  # q, k, v, out
                n_inputs = min(copies_for(per_call, 1), 4)  # compute-bound: a few copies suffice
                qkv = [[torch.randn(shape, generator=g, device="cuda", dtype=dtype) for _ in range(3)]
                       for _ in range(n_inputs)]
                cos, sin = (t.cuda() for t in ops.rope_freqs(1, n, (d // 2, d // 2)))
                flops = 4 * b * heads * n * n * d
                n_calls = max(n_inputs, 8 if n >= 4096 else 32)

                def sdpa(q, k, v):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

                impls = {
                    "ours": lambda i: lambda: kernels.attention(*qkv[i]),
                    "ours+rope": lambda i: lambda: kernels.attention(*qkv[i], cos=cos, sin=sin),
                    "sdpa_flash": lambda i: lambda: sdpa(*qkv[i]),
                    "sdpa_flash+eager_rope": lambda i: lambda: sdpa(ops.apply_rope(qkv[i][0], cos, sin),
                                                                   ops.apply_rope(qkv[i][1], cos, sin), qkv[i][2]),
                    "eager_math": lambda i: lambda: ops.attention(*qkv[i]),
                }
                if flash_attention.head_dim_blocks(d) != flash_attention.head_dim_blocks(d, pad=True):
                    impls["ours_padded_head_dim"] = lambda i: lambda: flash_attention.attention(*qkv[i], pad_head_dim=True)
                q, k, v = qkv[0]
                checks = {
                    "ours": parity(kernels.attention(q, k, v), ops.attention(q.float(), k.float(), v.float()), dname),
                    "ours+rope": parity(kernels.attention(q, k, v, cos=cos, sin=sin),
                                        ops.attention(q.float(), k.float(), v.float(), cos=cos, sin=sin), dname),
                }
                for name, make in impls.items():
                    calls = cycle(make, 1 if name == "eager_math" else n_inputs, 2 if name == "eager_math" else n_calls)
                    row = {"op": "attention", "dtype": dname, "B": b, "H": heads, "D": d, "N": n,
                           **run_case(name, calls, args, flops, "TFLOP/s")}
                    if name in checks:
                        row["parity"] = checks[name]
                    rows.append(row)
                    emit(row)
                del qkv
                torch.cuda.empty_cache()
    return rows


def bench_adaln(args, emit: Callable[[dict], None]) -> list[dict]:
    from ldm_rt import kernels, ops

    rows = []
    b, n, d = args.batch, args.tokens, args.hidden
    for dname in args.dtype:
        dtype = DTYPES[dname]
        elt = dtype.itemsize
        g = torch.Generator(device="cuda").manual_seed(0)
        size = b * n * d * elt
        n_inputs = copies_for(2 * size)
        xs = [torch.randn(b, n, d, generator=g, device="cuda", dtype=dtype) for _ in range(n_inputs)]
        ys = [torch.randn(b, n, d, generator=g, device="cuda", dtype=dtype) for _ in range(n_inputs)]
        gate, shift, scale = (torch.randn(b, d, generator=g, device="cuda", dtype=dtype) for _ in range(3))
        ln_ref, gated_ref = ops.layernorm_modulate, ops.gated_residual_layernorm_modulate
        impls = {
            ("copy", "torch.clone"): (lambda i: lambda: xs[i].clone(), 2 * size),
            ("layernorm_modulate", "ours"): (lambda i: lambda: kernels.layernorm_modulate(xs[i], shift, scale), 2 * size),
            ("layernorm_modulate", "eager"): (lambda i: lambda: ln_ref(xs[i], shift, scale), 2 * size),
            ("gated_residual_layernorm_modulate", "ours"): (
                lambda i: lambda: kernels.gated_residual_layernorm_modulate(xs[i], ys[i], gate, shift, scale), 4 * size),
            ("gated_residual_layernorm_modulate", "eager"): (
                lambda i: lambda: gated_ref(xs[i], ys[i], gate, shift, scale), 4 * size),
        }
        if not args.no_compile:
            ln_c = torch.compile(ln_ref, mode=args.compile_mode, dynamic=False)
            gated_c = torch.compile(gated_ref, mode=args.compile_mode, dynamic=False)
            impls[("layernorm_modulate", "torch.compile")] = (lambda i: lambda: ln_c(xs[i], shift, scale), 2 * size)
            impls[("gated_residual_layernorm_modulate", "torch.compile")] = (
                lambda i: lambda: gated_c(xs[i], ys[i], gate, shift, scale), 4 * size)
        x, y = xs[0], ys[0]
        ref_h, ref_out = gated_ref(*(t.float() for t in (x, y, gate, shift, scale)))
        h, out = kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale)
        checks = {
            ("layernorm_modulate", "ours"): parity(kernels.layernorm_modulate(x, shift, scale),
                                                   ln_ref(x.float(), shift.float(), scale.float()), dname),
            ("gated_residual_layernorm_modulate", "ours"): parity(h, ref_h, dname) + " | " + parity(out, ref_out, dname),
        }
        for (op, name), (make, nbytes) in impls.items():
            row = {"op": op, "dtype": dname, "B": b, "N": n, "D": d,
                   **run_case(name, cycle(make, n_inputs, n_inputs), args, nbytes, "GB/s")}
            if (op, name) in checks:
                row["parity"] = checks[(op, name)]
            rows.append(row)
            emit(row)
    return _with_copy_fraction(rows)


def bench_rope(args, emit: Callable[[dict], None]) -> list[dict]:
    from ldm_rt import kernels, ops

    rows = []
    b, h, n, d = args.batch, 16, args.tokens, 72
    for dname in args.dtype:
        dtype = DTYPES[dname]
        g = torch.Generator(device="cuda").manual_seed(0)
        size = b * h * n * d * dtype.itemsize
        n_inputs = copies_for(2 * size)
        xs = [torch.randn(b, h, n, d, generator=g, device="cuda", dtype=dtype) for _ in range(n_inputs)]
        cos, sin = (t.cuda() for t in ops.rope_freqs(1, n, (d // 2, d // 2)))
        impls = {
            "torch.clone": lambda i: lambda: xs[i].clone(),
            "ours": lambda i: lambda: kernels.apply_rope(xs[i], cos, sin),
            "eager": lambda i: lambda: ops.apply_rope(xs[i], cos, sin),
        }
        if not args.no_compile:
            rope_c = torch.compile(ops.apply_rope, mode=args.compile_mode, dynamic=False)
            impls["torch.compile"] = lambda i: lambda: rope_c(xs[i], cos, sin)
        check = parity(kernels.apply_rope(xs[0], cos, sin), ops.apply_rope(xs[0].float(), cos, sin), dname)
        for name, make in impls.items():
            row = {"op": "apply_rope", "dtype": dname, "B": b, "H": h, "N": n, "D": d,
                   **run_case(name, cycle(make, n_inputs, n_inputs), args, 2 * size, "GB/s")}
            if name == "ours":
                row["parity"] = check
            rows.append(row)
            emit(row)
    return _with_copy_fraction(rows)


def _with_copy_fraction(rows: list[dict]) -> list[dict]:
    """Each GB/s as a fraction of the same dtype's torch.clone bandwidth, measured in this run."""
    copy = {r["dtype"]: r.get("GB/s") for r in rows if r["impl"] == "torch.clone"}
    for r in rows:
        if r.get("GB/s") and copy.get(r["dtype"]):
            r["of_copy_bw"] = r["GB/s"] / copy[r["dtype"]]
    return rows


# ----------------------------------------------------------------------------------- output


def _line(row: dict) -> str:
    shape = " ".join(f"{k}={row[k]}" for k in ("B", "H", "N", "D") if k in row)
    if "error" in row:
        return f"{row['op']:<34} {row['dtype']} {shape:<28} {row['impl']:<24} error: {row['error']}"
    unit = "TFLOP/s" if "TFLOP/s" in row else "GB/s"
    return (f"{row['op']:<34} {row['dtype']} {shape:<28} {row['impl']:<24} {row['median_ms'] * 1e3:9.1f} us "
            f"(p90 {row['p90_ms'] * 1e3:.1f})  {row[unit]:8.1f} {unit}")


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"GPU: {env['gpu']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; {env['date']}",
             f"Command: `{env['command']}`", "",
             "| op | dtype | shape | impl | median us | p90 us | rate | of copy bw | parity |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        shape = " ".join(f"{k}={r[k]}" for k in ("B", "H", "N", "D") if k in r)
        if "error" in r:
            lines.append(f"| {r['op']} | {r['dtype']} | {shape} | {r['impl']} | - | - | {r['error']} | | |")
            continue
        unit = "TFLOP/s" if "TFLOP/s" in r else "GB/s"
        frac = f"{r['of_copy_bw']:.0%}" if "of_copy_bw" in r else ""
        lines.append(f"| {r['op']} | {r['dtype']} | {shape} | {r['impl']} | {r['median_ms'] * 1e3:.1f} | "
                     f"{r['p90_ms'] * 1e3:.1f} | {r[unit]:.1f} {unit} | {frac} | {r.get('parity', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/kernel_bench.py times CUDA kernels and this machine has no CUDA GPU; run it on a GPU machine.")
    from ldm_rt.errors import MissingDependencyError, require

    try:
        triton = require("triton", "triton", "bench/kernel_bench.py")
    except MissingDependencyError as exc:
        raise SystemExit(f"error: {exc}") from None
    env = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(["python", "bench/kernel_bench.py", *(argv or sys.argv[1:])]),
    }
    print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']}", flush=True)
    ops_to_run = ["attention", "adaln", "rope"] if args.op == "all" else [args.op]
    benches = {"attention": bench_attention, "adaln": bench_adaln, "rope": bench_rope}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def save() -> None:  # after every row: a run cut short by a time limit keeps what it measured
        (args.out / "kernels.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        (args.out / "kernels.md").write_text(markdown(rows, env))

    def emit(row: dict) -> None:
        print(_line(row), flush=True)
        rows.append(row)
        save()

    for op in ops_to_run:
        benches[op](args, emit)  # fills in each row's fraction of copy bandwidth once its op is done
        save()
    print(f"wrote {args.out / 'kernels.json'} and {args.out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
