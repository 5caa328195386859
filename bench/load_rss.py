"""Peak host RSS while loading a sharded bf16 Flux transformer, against its weights' size (CPU).

Writes a random Flux transformer (a few hundred MB in bf16) as a diffusers-style sharded
directory, then loads it in a fresh process for each method and reads the process's peak RSS
(VmHWM) above the RSS it had before loading (VmRSS after imports):

- `streaming`: `ldm_rt.weights.empty_module` (meta device -> bf16, no fp32 copy) +
  `load_streaming` (one tensor at a time, read straight into the parameter). Target <= 1.3x.
- `naive`: the model built in fp32 as usual, then each shard read with safetensors' `load_file`
  and `load_state_dict` (what a loader does without care), for contrast.

    nice -n 10 python bench/load_rss.py --out bench/results/load-rss-cpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# ~207M parameters (414 MB in bf16): 8 heads of 128 (rope 16/56/56), 3 double + 6 single blocks.
BENCH_CONFIG = dict(
    num_layers=3, num_single_layers=6, attention_head_dim=128, num_attention_heads=8,
    joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True,
)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write(model_dir: Path, shard_mb: int) -> int:
    from ldm_rt.families.flux.transformer import FluxConfig, FluxTransformer2DModel
    from ldm_rt.weights import empty_module, write_sharded

    config = FluxConfig(**BENCH_CONFIG)
    model = empty_module(lambda: FluxTransformer2DModel(config), torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    (model_dir / "config.json").write_text(json.dumps(config.to_dict()))
    write_sharded(model_dir, model.state_dict(), max_shard_bytes=shard_mb * 2**20, dtype=None)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def load(model_dir: Path, method: str) -> dict:
    from ldm_rt.families.flux.transformer import FluxConfig, FluxTransformer2DModel
    from ldm_rt.weights import empty_module, load_streaming

    config = FluxConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    before = _status("VmRSS")
    if method == "streaming":
        model = empty_module(lambda: FluxTransformer2DModel(config), torch.bfloat16)
        load_streaming(model, model_dir, "transformer")
    else:
        from safetensors.torch import load_file

        model = FluxTransformer2DModel(config)
        for shard in sorted(model_dir.glob("*.safetensors")):
            model.load_state_dict(load_file(str(shard)), strict=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return {"rss_before": before, "peak_rss": _status("VmHWM")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/load-rss-cpu"))
    ap.add_argument("--shard-mb", type=int, default=100)
    ap.add_argument("--_load", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._load:
        print(json.dumps(load(Path(args._load[0]), args._load[1])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        weight_bytes = write(model_dir, args.shard_mb)
        shards = sorted(model_dir.glob("*.safetensors"))
        rows = {}
        for method in ("streaming", "naive"):
            out = subprocess.run(
                [sys.executable, __file__, "--_load", str(model_dir), method], check=True, capture_output=True, text=True
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["ratio"] = (r["peak_rss"] - r["rss_before"]) / weight_bytes
            rows[method] = r
    result = {
        "what": "peak host RSS above the pre-load RSS while loading a sharded bf16 Flux transformer, / weights bytes",
        "config": BENCH_CONFIG, "weight_bytes": weight_bytes, "shards": len(shards), "shard_mb": args.shard_mb,
        "torch": torch.__version__, "methods": rows, "command": " ".join(["python"] + sys.argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"weights {weight_bytes / 2**20:.0f} MiB in {len(shards)} shards of <= {args.shard_mb} MiB")
    for method, r in rows.items():
        print(f"{method:10s} peak RSS +{(r['peak_rss'] - r['rss_before']) / 2**20:.0f} MiB = {r['ratio']:.2f}x the weights "
              f"(absolute peak {r['peak_rss'] / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
