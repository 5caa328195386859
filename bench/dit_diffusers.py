"""Class-conditional DiT-XL/2: diffusers' DiTTransformer2DModel against ldm-rt, in one run (issue 8).

Per image size (256/512 px) and dtype (fp16/bf16), at batch 2 (one image with CFG):

- latency, CUDA events, median and p90 over --iters calls after --warmup, of
  diffusers' DiT call, eager and under torch.compile(mode="reduce-overhead") (CUDA graphs),
  against ldm-rt's *whole* CFG denoising step (the DiT call, the guidance combination and the
  DDIM update, as the pipeline runs it) on the torch backend (eager) and the triton backend
  (kernels, the whole step replayed from one CUDA graph; skipped with the reason when it cannot
  load). ldm-rt's rows do strictly more work than diffusers' rows, so the ratio is conservative;
- images: diffusers' DiTPipeline and ldm-rt's Pipeline, 50 DDIM steps, the same weights, class
  and seed; PSNR of each dtype's image against the other implementation and against diffusers fp32.

Weights are seeded, non-zero random values at the exact DiT-XL/2 shapes (28 blocks, hidden 1152,
16 heads of 72, learned sigma), per-block embedders tied as in the published checkpoints, so no
download is needed; the SD-VAE-shaped decoder is random too (the images are noise, which is fine
for parity). Writes <out>/dit_diffusers.json and prints a table.

GPU:  python bench/dit_diffusers.py --out bench/results
CPU smoke test (tiny config, seconds): python bench/dit_diffusers.py --tiny --device cpu --dtypes fp32 \\
      --sizes 16 --iters 3 --warmup 1 --steps 2 --no-compile --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

TINY_DIT = dict(num_attention_heads=4, attention_head_dim=18, num_layers=2)
XL_DIT = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for dit_diffusers.json")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke test)")
    p.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp32, fp16, bf16")
    p.add_argument("--sizes", default="256,512", help="image sides in pixels, comma-separated")
    p.add_argument("--batch", type=int, default=2, help="DiT batch, even (2 = one image with CFG)")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the image comparison (0: skip it)")
    p.add_argument("--class-label", type=int, default=207)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default="torch,triton", help="ldm-rt backends to time")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--tiny", action="store_true", help="a 2-block DiT and the tiny VAE (smoke test)")
    return p.parse_args(argv)


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@torch.no_grad()
def build(px: int, tiny: bool, seed: int):
    """(diffusers DiT, diffusers VAE, ldm-rt Components), fp32 on the CPU, the same random weights."""
    import diffusers

    from ldm_rt.configs import DIT_DDIM_SCHEDULER, PRESETS, SD_VAE
    from ldm_rt.dit_checkpoints import config_from_diffusers, from_diffusers
    from ldm_rt.model_dir import Components, randomize_
    from ldm_rt.models.dit import DiT
    from ldm_rt.models.vae import AutoencoderKL

    vae_config = PRESETS["tiny"].vae if tiny else SD_VAE
    if px % (vae_config.scale_factor * 2):
        raise SystemExit(f"--sizes {px}: must be a multiple of {vae_config.scale_factor * 2}")
    hf = diffusers.DiTTransformer2DModel(
        **(TINY_DIT if tiny else XL_DIT), in_channels=4, out_channels=8, patch_size=2,
        sample_size=px // vae_config.scale_factor, num_embeds_ada_norm=1000,
    ).eval()
    g = torch.Generator().manual_seed(seed)
    randomize_(hf, g)
    first = hf.transformer_blocks[0].norm1.emb.state_dict()
    for block in hf.transformer_blocks[1:]:  # tied, as diffusers' convert script writes them
        block.norm1.emb.load_state_dict(first)
    config = config_from_diffusers(dict(hf.config))
    ours = DiT(config).eval()
    ours.load_state_dict(from_diffusers(hf.state_dict(), config), strict=True)
    ours_vae = AutoencoderKL(vae_config).eval()
    randomize_(ours_vae, g)
    hf_vae = diffusers.AutoencoderKL(**{k: v for k, v in vae_config.to_dict().items() if not k.startswith("_")})
    hf_vae.load_state_dict(ours_vae.state_dict(), strict=True)
    components = Components(None, None, ours, ours_vae, dict(DIT_DDIM_SCHEDULER), {})
    return hf, hf_vae.eval(), components


def time_calls(fn, device: torch.device, iters: int, warmup: int) -> dict:
    """Per-call milliseconds (median, p90, min) of `iters` calls after `warmup`, CUDA events on
    CUDA, perf_counter on the CPU, and `first_call_ms`: the first call, timed on its own before
    those (torch.compile's compile, Triton JIT, CUDA-graph capture). The helper `ldm-rt bench`
    uses too (ldm_rt/bench.py)."""
    from ldm_rt.bench import measure_stage

    first, stats = measure_stage(fn, device, warmup, iters)
    return {**stats, "first_call_ms": first}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def bench_size(args, px: int, device: torch.device, results: list, images: list, errors: list) -> None:
    """Per dtype: one GPU copy of diffusers' DiT and one ldm-rt Pipeline per backend, timed, then
    (with --steps) the same copies draw the images, so each DiT-XL/2 copy is made once."""
    import copy

    import diffusers

    from ldm_rt.pipeline import Pipeline
    from ldm_rt.schedulers import scheduler_from_config

    hf, hf_vae, components = build(px, args.tiny, args.seed)
    latent = hf.config.sample_size
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 4, latent, latent, generator=g)
    t = torch.full((args.batch,), 500.0)
    labels = torch.tensor([args.class_label] * (args.batch // 2) + [1000] * (args.batch // 2))  # [cond; null]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    def record(impl, dtype_name, stats):
        row = {"px": px, "dtype": dtype_name, "impl": impl, "batch": args.batch, **stats}
        results.append(row)
        print(f"{px:>5} {dtype_name:>5} {impl:<32} median {stats['median_ms']:8.3f} ms  p90 {stats['p90_ms']:8.3f} ms"
              f"  first call {stats['first_call_ms']:9.1f} ms", flush=True)

    # Images: 50 DDIM steps, diffusers DiTPipeline vs ldm-rt Pipeline, same weights, class, seed.
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                                        clip_sample=False)

    def diffusers_image(model, dtype_name):
        pipe = diffusers.DiTPipeline(transformer=model, vae=copy.deepcopy(hf_vae), scheduler=scheduler)
        pipe.to(device, _dtype(dtype_name))
        out = pipe(class_labels=[args.class_label], guidance_scale=4.0, num_inference_steps=args.steps,
                   generator=torch.Generator("cpu").manual_seed(args.seed), output_type="np").images[0]
        return (out * 255).round().astype(np.uint8)

    reference = None
    if args.steps > 0:
        reference = diffusers_image(copy.deepcopy(hf), "fp32")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for dtype_name in args.dtypes.split(","):
        dtype = _dtype(dtype_name)
        xd, td, yd = x.to(device, dtype), t.to(device), labels.to(device)
        images_in = x[: args.batch // 2].to(device)  # fp32 latents of the batch // 2 images (CFG doubles them)
        pipes = {}
        with torch.no_grad():
            model = copy.deepcopy(hf).to(device, dtype)
            record("diffusers eager", dtype_name,
                   time_calls(lambda: model(xd, timestep=td, class_labels=yd), device, args.iters, args.warmup))
            if not args.no_compile:
                try:
                    compiled = torch.compile(model, mode="reduce-overhead")
                    record("diffusers compile reduce-overhead", dtype_name,
                           time_calls(lambda: compiled(xd, timestep=td, class_labels=yd), device, args.iters,
                                      args.warmup))
                except Exception as exc:  # recorded, not fatal: the other rows still count
                    errors.append({"px": px, "dtype": dtype_name, "impl": "diffusers compile", "error": repr(exc)})
                compiled = None
            for backend in backends:
                try:
                    pipe = Pipeline(copy.deepcopy(components), backend=backend, device=device, dtype=dtype_name)
                except Exception as exc:
                    errors.append({"px": px, "dtype": dtype_name, "impl": f"ldm-rt {backend}", "error": str(exc)})
                    print(f"{px:>5} {dtype_name:>5} ldm-rt {backend:<25} skipped: {exc}", flush=True)
                    continue
                pipes[backend] = pipe
                schedule = scheduler_from_config(pipe.scheduler, max(args.steps, 1))
                step = pipe.class_step(schedule, 4.0, pipe.config.transformer.in_channels)
                record(f"ldm-rt {backend} whole CFG step", dtype_name,
                       time_calls(lambda: step(images_in, 0, yd), device, args.iters, args.warmup))
                del step

        if args.steps > 0:
            theirs = reference if dtype_name == "fp32" else diffusers_image(model, dtype_name)
            row = {"px": px, "dtype": dtype_name, "steps": args.steps,
                   "psnr_diffusers_vs_diffusers_fp32": _psnr(theirs, reference)}
            for backend, pipe in pipes.items():
                try:
                    ours = np.asarray(pipe.generate(args.class_label, guidance=4.0, steps=args.steps,
                                                    seed=args.seed).images[0])
                except Exception as exc:
                    errors.append({"px": px, "dtype": dtype_name, "impl": f"ldm-rt {backend} image",
                                   "error": str(exc)})
                    continue
                row[f"psnr_{backend}_vs_diffusers"] = _psnr(ours, theirs)
                row[f"psnr_{backend}_vs_diffusers_fp32"] = _psnr(ours, reference)
            images.append(row)
            print(f"{px:>5} {dtype_name:>5} PSNR " + ", ".join(f"{k[5:]} {v:.1f} dB" for k, v in row.items()
                                                              if k.startswith("psnr_")), flush=True)
        del model, pipes
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> dict:
    args = parse_args(argv)
    from ldm_rt.pipeline import resolve_device

    device = resolve_device(args.device)
    if device.type == "cpu" and "fp16" in args.dtypes.split(","):
        raise SystemExit("fp16 does not run on the CPU; pass --dtypes fp32 (or bf16) with --device cpu.")
    if args.batch < 2 or args.batch % 2:
        raise SystemExit(f"--batch {args.batch}: the DiT batch with CFG is twice the images; give an even number >= 2.")
    args.out.mkdir(parents=True, exist_ok=True)
    results, images, errors = [], [], []
    for px in (int(s) for s in args.sizes.split(",")):
        bench_size(args, px, device, results, images, errors)
        report = write_report(args, argv, device, results, images, errors)  # after each size: a timeout keeps it
    for s in report["speedup"]:
        print(f"{s['px']:>5} {s['dtype']:>5} {s['impl']:<20} {s['speedup']:.2f}x vs {s['vs']}")
    print(f"wrote {args.out / 'dit_diffusers.json'}")
    return report


def write_report(args, argv, device, results, images, errors) -> dict:
    import diffusers

    speedups = []
    for row in results:  # ours vs diffusers compiled (else eager), same size and dtype
        if not row["impl"].startswith("ldm-rt"):
            continue
        for base in ("diffusers compile reduce-overhead", "diffusers eager"):
            ref = next((r for r in results if r["impl"] == base and r["px"] == row["px"]
                        and r["dtype"] == row["dtype"]), None)
            if ref:
                speedups.append({"px": row["px"], "dtype": row["dtype"], "impl": row["impl"], "vs": base,
                                 "speedup": ref["median_ms"] / row["median_ms"]})
    report = {
        "benchmark": "bench/dit_diffusers.py", "argv": sys.argv[1:] if argv is None else list(argv),
        "config": "tiny (2 blocks, 4 heads of 18)" if args.tiny else "DiT-XL/2 (28 blocks, 16 heads of 72)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda,
                     "triton": _triton_version(), "python": platform.python_version()},
        "latency": results, "speedup": speedups, "images": images, "errors": errors,
    }
    (args.out / "dit_diffusers.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
