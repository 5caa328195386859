"""Load benchmark of `ldm-rt serve`: throughput and latency at several concurrency levels, with
and without dynamic batching. Localhost only, a bounded number of requests per level.

    nice -n 10 python bench/serve_load.py [--model-dir DIR] [--concurrency 1,4,16] [--requests 2]
        [--max-batch 8] [--max-wait-ms 50] [--steps N] [--out bench/results/serve-cpu]

For each mode (`batched`: --max-batch N; `unbatched`: --max-batch 1) it starts a server on a
free 127.0.0.1 port, warms it up, then at each concurrency c sends c * --requests requests from c
client threads (each sends its next request when the previous one is answered) and records each
request's latency. Prints a markdown table and writes results.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 600.0) -> tuple[int, float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/images/generations", json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - start
    finally:
        conn.close()


def wait_ready(proc, port: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready in {timeout} s")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run_level(port: int, concurrency: int, per_client: int, steps: int | None) -> dict:
    body = {"prompt": "a red circle on a blue background", **({"steps": steps} if steps else {})}

    def client(k: int) -> list[tuple[int, float]]:
        return [post(port, {**body, "seed": 1000 * k + i}) for i in range(per_client)]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(client, range(concurrency)) for r in rs]
    wall = time.perf_counter() - start
    latencies = [s for code, s in results if code == 200]
    failed = len(results) - len(latencies)
    return {"concurrency": concurrency, "requests": len(results), "failed": failed, "wall_s": wall,
            "images_per_s": len(latencies) / wall, "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99), "mean_s": statistics.fmean(latencies)}


def metric_sum(port: int, name: str) -> tuple[float, float]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    values = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix + " "):
                values[suffix] = float(line.split()[1])
    return values.get("_sum", 0.0), values.get("_count", 0.0)


def bench_mode(mode: str, args) -> list[dict]:
    port = free_port()
    max_batch = args.max_batch if mode == "batched" else 1
    cmd = [sys.executable, "-m", "ldm_rt.cli", "serve", "--host", HOST, "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "256"]
    if args.model_dir:
        cmd += ["--model-dir", str(args.model_dir)]
    env = dict(os.environ, PYTHONSAFEPATH="1")  # the repo root's kernels/, export/ shadow packages
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_ready(proc, port)
        post(port, {"prompt": "a red circle", **({"steps": args.steps} if args.steps else {})})  # untimed
        rows = []
        for c in args.concurrency:
            before = metric_sum(port, "ldm_rt_batch_size")
            row = run_level(port, c, args.requests, args.steps)
            after = metric_sum(port, "ldm_rt_batch_size")
            batches = after[1] - before[1]
            row.update(mode=mode, max_batch=max_batch, mean_batch=(after[0] - before[0]) / batches if batches else 0)
            rows.append(row)
            print(f"{mode:9} c={c:<3} {row['images_per_s']:.3f} img/s  p50 {row['p50_s']:.2f} s  "
                  f"p99 {row['p99_s']:.2f} s  mean batch {row['mean_batch']:.2f}", flush=True)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def table(rows: list[dict]) -> list[str]:
    lines = ["| mode | concurrency | requests | images/s | p50 s | p99 s | mean batch | vs unbatched |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["concurrency"]: r["images_per_s"] for r in rows if r["mode"] == "unbatched"}
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["mode"] != "unbatched")):
        ratio = r["images_per_s"] / base[r["concurrency"]] if r["concurrency"] in base else float("nan")
        lines.append(f"| {r['mode']} (max batch {r['max_batch']}) | {r['concurrency']} | {r['requests']} | "
                     f"{r['images_per_s']:.3f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['mean_batch']:.2f} | "
                     f"{ratio:.2f}x |" + (f" {r['failed']} failed |" if r["failed"] else ""))
    return lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="Default: the built-in demo model.")
    p.add_argument("--concurrency", default="1,4,16", help="Comma-separated client counts.")
    p.add_argument("--requests", type=int, default=2, help="Requests per client at each level.")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=50.0)
    p.add_argument("--steps", type=int, default=None, help="Denoising steps (default: the model's).")
    p.add_argument("--modes", default="unbatched,batched")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve-cpu")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    import torch

    rows = [r for mode in args.modes.split(",") for r in bench_mode(mode, args)]
    lines = table(rows)
    print("\n".join(lines))
    result = {"command": shlex.join(["python", "bench/serve_load.py", *(argv if argv is not None else sys.argv[1:])]),
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "rows": rows, "table": lines}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
