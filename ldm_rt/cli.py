"""`ldm-rt` command line. Parses and prints; the work lives in importable functions.

Every `LdmRtError` ends as one line `error: ...` on stderr and exit code 1; warnings print
as one `warning: ...` line each.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click

from ldm_rt import __version__
from ldm_rt.errors import InputError, LdmRtError

DTYPES = ["fp32", "fp16", "bf16"]
BACKEND_NAMES = ["torch", "triton", "onnxruntime", "tensorrt"]


class _Group(click.Group):
    """Turns user-facing errors into one line and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LdmRtError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ldm-rt")
def main():
    """ldm-rt: fast, parity-checked inference for latent diffusion transformers."""
    warnings.showwarning = _show_warning


def _check_writable(path: Path) -> None:
    parent = path.expanduser().resolve().parent
    if path.is_dir():
        raise InputError(f"output path {path} is a directory; give a file name such as {path / 'image.png'}.")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: directory {parent} does not exist.")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write {path}: directory {parent} is not writable.")


def output_paths(out: Path | None, seed: int, count: int) -> list[Path]:
    """--out FILE.png (default ldm-rt-<seed>.png); with several images <stem>-<i>.png."""
    out = Path(out) if out is not None else Path(f"ldm-rt-{seed}.png")
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out} must end in .png.")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


@main.command()
@click.option("--prompt", multiple=True,
              help="Text prompt (repeat for a batch of prompts); for a class-conditional DiT an ImageNet class "
                   "name or index, e.g. \"golden retriever\" or 207. Required, except for a model with condition "
                   "channels (the super-resolution demo), where it defaults to the empty prompt.")
@click.option("--negative-prompt", default=None, help="What to steer away from (default: empty prompt).")
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="Model directory (diffusers layout). Default: the built-in demo model.")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default="torch", show_default=True)
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model's, else 30).")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale, <= 1 disables CFG; FLUX.1-dev: the embedded guidance "
                   "(default: the model's, else 4.0).")
@click.option("--seed", type=int, default=None,
              help="0..2**64-1 (default: a fresh random seed, printed, so each run draws a new image).")
@click.option("--height", type=int, default=None, help="Image height in pixels (default: the model's).")
@click.option("--width", type=int, default=None, help="Image width in pixels (default: the model's).")
@click.option("--num-images", type=int, default=1, show_default=True, help="Images per prompt.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="PNG path (default ldm-rt-<seed>.png); several images are written as <stem>-<i>.png. "
                   "An existing file is replaced, and the line that reports it says so.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Default: fp16 on CUDA, fp32 on CPU.")
@click.option("--guidance-channels", type=int, default=None,
              help="Class-conditional DiT: latent channels CFG steers (default all, as diffusers' DiTPipeline; "
                   "3 as facebookresearch/DiT sample.py).")
@click.option("--true-cfg-scale", type=float, default=None,
              help="FLUX.1: true classifier-free guidance with --negative-prompt when > 1 (diffusers' true_cfg_scale; "
                   "two transformer rows per image).")
@click.option("--text-encoder-device", type=click.Choice(["same", "cpu", "cuda"]), default=None,
              help="FLUX.1: where the text encoders (CLIP, T5) run; cpu keeps T5-XXL off the GPU (default: same "
                   "as --device).")
@click.option("--release-text-encoders", is_flag=True, default=False,
              help="FLUX.1: move the text encoders (CLIP, T5) to the CPU after encoding, freeing their GPU memory "
                   "for the transformer (each call moves them back: one copy per call).")
@click.option("--max-sequence-length", type=int, default=None,
              help="FLUX.1: T5 tokens the prompt is padded or truncated to, 1..512 (diffusers' max_sequence_length; "
                   "default: the model's, 256 schnell / 512 dev).")
@click.option("--image", "image_path", type=click.Path(path_type=Path), default=None,
              help="Image-to-image: start from this image (PNG/JPEG); the size defaults to its own, rounded down "
                   "to the model's multiple.")
@click.option("--strength", type=float, default=None,
              help="With --image: 0 < S <= 1, how much to redraw (1: everything; default 0.6, as diffusers).")
@click.option("--mask", "mask_path", type=click.Path(path_type=Path), default=None,
              help="With --image: inpaint; white pixels are redrawn, black ones kept (same size as --image). "
                   "For a model with condition channels (FLUX.1 Fill), the mask it is conditioned on.")
@click.option("--control-image", "control_path", type=click.Path(path_type=Path), default=None,
              help="A model with condition channels that takes a control image (FLUX.1 Canny/Depth): the image "
                   "it is conditioned on.")
def run(prompt, negative_prompt, model_dir, backend, steps, guidance, seed, height, width, num_images, out,
        device, dtype, guidance_channels, true_cfg_scale, text_encoder_device, release_text_encoders,
        max_sequence_length, image_path, strength, mask_path, control_path):
    """Generate images from a text prompt (or ImageNet classes, for a class-conditional DiT)."""
    import math
    import time

    from ldm_rt.model_dir import default_model_dir
    from ldm_rt.pipeline import Pipeline
    from ldm_rt.png_info import png_info
    from ldm_rt.seeds import resolve_seed

    start = time.perf_counter()
    if guidance is not None and not math.isfinite(guidance):
        raise InputError(f"--guidance {guidance} is not a finite number; give a scale >= 0 (<= 1 disables CFG).")
    if image_path is None and control_path is None and (strength is not None or mask_path is not None):
        raise InputError(f"{'--strength' if strength is not None else '--mask'} applies to image-to-image; "
                         "give --image IN.png too.")
    if image_path is None and mask_path is not None:  # else --control-image would drop it silently
        raise InputError("--mask goes with --image (inpainting, or FLUX.1 Fill's image and mask); give --image IN.png "
                         "too.")
    image = mask = control = None
    if control_path is not None:
        from ldm_rt.image_input import open_image

        control = open_image(control_path, "--control-image")
    if image_path is None and strength is not None:
        from ldm_rt.schedulers import check_strength

        check_strength(strength)
    if image_path is not None:  # read (and reject a non-image) before the model loads
        from ldm_rt.image_input import image_size, open_image
        from ldm_rt.schedulers import check_strength

        if strength is not None:
            check_strength(strength)
        image = open_image(image_path, "--image")
        mask = None if mask_path is None else open_image(mask_path, "--mask", mask=True)
        if mask is not None and image_size(mask) != image_size(image):
            (mh, mw), (h, w) = image_size(mask), image_size(image)
            raise InputError(f"--mask {mask_path} is {mw}x{mh} but --image {image_path} is {w}x{h}; give a mask of "
                             "the image's size (white = repaint).")
    fresh = seed is None
    seed = resolve_seed(seed)
    prompts = list(prompt) or [""]
    paths = output_paths(out, seed, len(prompts) * num_images)
    for path in paths:
        _check_writable(path)
    pipe = Pipeline.from_pretrained(model_dir or default_model_dir(), backend=backend, device=device, dtype=dtype,
                                    text_encoder_device=text_encoder_device,
                                    release_text_encoders=release_text_encoders)
    if not prompt and pipe.family.condition_channels(pipe.config) == 0:  # click's own usage error, as before
        raise click.UsageError("Missing option '--prompt' (only a model with condition channels, such as the "
                               "super-resolution demo, runs without one).")
    click.echo(f"model: {model_dir or 'built-in demo'} | backend {backend} | {pipe.device} {pipe.precision.value}",
               err=True)
    if fresh:
        click.echo(f"seed: {seed} (random; pass --seed {seed} to draw the same image again)", err=True)
    load_s = time.perf_counter() - start
    result = pipe.generate(prompts if len(prompts) > 1 else prompts[0], negative_prompt=negative_prompt,
                           steps=steps, guidance=guidance, seed=seed, height=height, width=width,
                           num_images=num_images, progress=True, guidance_channels=guidance_channels,
                           true_cfg_scale=true_cfg_scale, max_sequence_length=max_sequence_length, image=image,
                           strength=strength, mask_image=mask, control_image=control)
    file_prompts = [p for p in prompts for _ in range(num_images)]
    for i, (image, path, text) in enumerate(zip(result.images, paths, file_prompts)):
        existed = path.exists()
        info = png_info(prompt=text, negative_prompt=negative_prompt or "", seed=seed, steps=result.steps,
                        guidance=result.guidance, height=image.height, width=image.width,
                        model=str(model_dir or "built-in demo"), backend=backend,
                        batch=(i, len(paths)) if len(paths) > 1 else None, strength=result.strength,
                        image=None if image_path is None else image_path.name,
                        mask=None if mask_path is None else mask_path.name)
        try:
            image.save(path, pnginfo=info)
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}.") from None
        replaced = ", replaced the existing file" if existed else ""
        click.echo(f"wrote {path} ({image.width}x{image.height}{replaced}): {text!r}")
    t = result.timings
    encoding = f"image encoding {t['image_encoding']:.2f} s | " if "image_encoding" in t else ""
    if "condition_encoding" in t:
        encoding += f"condition encoding {t['condition_encoding']:.2f} s | "
    click.echo(
        f"time: load {load_s:.2f} s | text encoding {t['text_encoding']:.2f} s | {encoding}"
        f"denoising {t['denoising']:.2f} s | decoding {t['decoding']:.2f} s | "
        f"total {time.perf_counter() - start:.2f} s"
    )


def _preset_help() -> str:
    from ldm_rt.configs import PRESETS

    return "Preset name: " + ", ".join(PRESETS) + "; FLUX.1: flux-tiny, flux-schnell, flux-dev."


@main.command("init-model")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--preset", default="tiny", show_default=True, help=_preset_help())
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights, 0..2**64-1.")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="dtype of the stored weights.")
@click.option("--overwrite", is_flag=True, help="Replace DIRECTORY if it already holds a model directory.")
def init_model_cmd(directory, preset, seed, dtype, overwrite):
    """Write a complete model directory with seeded, non-zero random weights.

    For tests and for benchmarking at real sizes before real weights exist: the images are noise.
    """
    from ldm_rt import families
    from ldm_rt.model_dir import init_model
    from ldm_rt.precision import Precision

    families.preset(preset)  # fail fast on a bad name (every family's presets)
    path = init_model(directory, preset, seed=seed, dtype=Precision(dtype).dtype, overwrite=overwrite)
    click.echo(f"wrote {preset} model (seed {seed}, {dtype}) to {path}")


# --model aliases -> graph names; "all" (None): every graph the model's family declares. Any graph
# name the family declares (e.g. text_encoder_2 of FLUX.1) is taken as itself.
EXPORT_MODELS = {"dit": ("transformer",), "text-encoder": ("text_encoder",), "vae": ("vae_decoder",), "all": None}


@main.command("export")
@click.option("--model", "which", default="all", show_default=True,
              help="Graph to export: dit, text-encoder, vae, a graph name of the model's family (text_encoder_2), "
                   "or all (every graph the model has).")
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="Model directory (diffusers layout). Default: the built-in demo model.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Directory for the .onnx files and manifest.json.")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True)
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--static", is_flag=True, help="Fixed batch and size instead of dynamic axes.")
@click.option("--height", type=int, default=None, help="With --static: image height in pixels.")
@click.option("--width", type=int, default=None, help="With --static: image width in pixels.")
@click.option("--batch", type=int, default=None, help="With --static: batch size (default 1).")
def export_cmd(which, model_dir, out, dtype, opset, static, height, width, batch):
    """Export components to ONNX (one file each) plus manifest.json; unchanged ones are reused."""
    from ldm_rt.export.onnx_export import StaticShape, export_model
    from ldm_rt.model_dir import default_model_dir, load_model_dir

    if not static and (height, width, batch) != (None, None, None):
        raise InputError("--height, --width and --batch only apply with --static.")
    from ldm_rt import families

    components = load_model_dir(model_dir or default_model_dir())
    shape = None
    if static:
        size = families.for_config(components.config).default_size(components.config)
        shape = StaticShape(1 if batch is None else batch, size if height is None else height,
                            size if width is None else width)
    names = EXPORT_MODELS.get(which, (which,))
    manifest = export_model(components, out, names, dtype=dtype, opset=opset, static=shape)
    click.echo(f"{out}: {', '.join(names or manifest['components'])} and manifest.json")


@main.command("build-engine")
@click.option("--onnx-dir", type=click.Path(path_type=Path), required=True,
              help="Directory written by `ldm-rt export` (the .onnx files and manifest.json).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Directory for the engines (default: --onnx-dir).")
@click.option("--fp16", is_flag=True,
              help="Check that the export is fp16 (engines take the graph's precision: `ldm-rt export --dtype fp16`).")
@click.option("--bf16", is_flag=True,
              help="Check that the export is bf16 (engines take the graph's precision: `ldm-rt export --dtype bf16`).")
@click.option("--strongly-typed", is_flag=True,
              help="Accepted for older scripts: every network is strongly typed (TensorRT 11 builds no other kind).")
@click.option("--min", "min_", default=None, help="Smallest shape, e.g. batch=1,height=256,width=256 (pixels).")
@click.option("--opt", default=None, help="Shape TensorRT tunes for, e.g. batch=1,size=512.")
@click.option("--max", "max_", default=None, help="Largest shape, e.g. batch=4,size=1024.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="Timing cache file: read if present, written after the build.")
@click.option("--workspace", type=float, default=None, help="Workspace memory pool limit in GiB.")
def build_engine_cmd(onnx_dir, out, fp16, bf16, strongly_typed, min_, opt, max_, timing_cache, workspace):
    """Build one TensorRT engine per exported component; fresh engines are reused, stale ones rebuilt.

    Networks are strongly typed: each engine computes in its ONNX graph's types, so the engines'
    precision is the export's (`ldm-rt export --dtype fp32|fp16|bf16`); fp32 engines clear TF32.
    Shapes: key=value pairs, keys batch (images), height, width (pixels) and size (both sides).
    The text encoder's and DiT's batch is doubled for classifier-free guidance.
    """
    from ldm_rt.export.tensorrt import build_engines

    modes = [m for m, on in (("fp16", fp16), ("bf16", bf16)) if on]
    if len(modes) > 1:
        raise InputError(f"--{' and --'.join(modes)} exclude each other; pick one.")
    engines = build_engines(onnx_dir, out, precision=modes[0] if modes else None, min=min_, opt=opt, max=max_,
                            timing_cache=timing_cache, workspace_gb=workspace)
    for name, path in engines.items():
        click.echo(f"{name}: {path}")


@main.command("parity")
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="Model directory (diffusers layout). Default: the built-in demo model.")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), required=True, help="Backend to hold to the reference.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Default: fp16 on CUDA, fp32 on CPU.")
@click.option("--device", default=None, help="cpu or cuda, for the backend (default: cuda when available).")
@click.option("--onnx-dir", type=click.Path(path_type=Path), default=None,
              help="Run this `ldm-rt export` directory's graphs instead of exporting into the cache.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs and the image.")
@click.option("--steps", type=int, default=2, show_default=True, help="Denoising steps of the end-to-end image.")
@click.option("--height", type=int, default=None, help="Image height in pixels (default: the model's).")
@click.option("--width", type=int, default=None, help="Image width in pixels (default: the height, or the model's).")
@click.pass_context
def parity_cmd(ctx, model_dir, backend, dtype, device, onnx_dir, seed, steps, height, width):
    """Compare a backend with the fp32 torch reference: per component, then the image (exit 1 on a failure)."""
    from ldm_rt.parity_run import format_report, run_parity

    report = run_parity(model_dir, backend, dtype=dtype, device=device, onnx_dir=onnx_dir, seed=seed, steps=steps,
                        height=height, width=width)
    for line in format_report(report):
        click.echo(line)
    if not report.passed:
        ctx.exit(1)


CONVERT_SOURCES = ["dit-original", "dit-diffusers"]


@main.command("convert")
@click.option("--from", "source", type=click.Choice(CONVERT_SOURCES), required=True,
              help="dit-original: a facebookresearch/DiT .pt state dict; dit-diffusers: a DiTPipeline directory.")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--vae", type=click.Path(path_type=Path), default=None,
              help="dit-original: a diffusers AutoencoderKL folder (config.json + safetensors), e.g. sd-vae-ft-ema.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="ldm-rt model directory to write.")
@click.option("--num-heads", type=int, default=None,
              help="dit-original: attention heads (default: the DiT paper's for the checkpoint's width).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already holds a model directory.")
def convert_cmd(source, src, vae, out, num_heads, overwrite):
    """Write a standard ldm-rt model directory from a published DiT checkpoint."""
    from ldm_rt.families.dit_class.convert import convert_diffusers, convert_original

    if source == "dit-original":
        if vae is None:
            raise InputError("--from dit-original needs --vae DIR: the checkpoint holds only the DiT.")
        path = convert_original(src, vae, out, num_heads=num_heads, overwrite=overwrite)
    else:
        if vae is not None or num_heads is not None:
            raise InputError("--vae and --num-heads apply to --from dit-original only.")
        path = convert_diffusers(src, out, overwrite=overwrite)
    click.echo(f"wrote {path} (from {source} {src})")


class _RawArgsCommand(click.Command):
    """Keeps the arguments as typed, so `bench` can record its exact command line."""

    def parse_args(self, ctx, args):
        ctx.meta["raw_args"] = list(args)
        return super().parse_args(ctx, args)


@main.command("bench", cls=_RawArgsCommand)
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="Model directory (diffusers layout). Default: the built-in demo model.")
@click.option("--preset", default=None, help="Benchmark a preset (e.g. dit-xl-2) with seeded random weights instead.")
@click.option("--backends", default=None,
              help="Comma-separated from torch, compile, triton, onnxruntime, tensorrt, diffusers (default: all).")
@click.option("--resolutions", default=None, help="Image sides in pixels, e.g. 256,512 (default: the model's).")
@click.option("--batch", type=int, default=1, show_default=True, help="Images per call (CFG doubles the DiT batch).")
@click.option("--dtype", default=None, help="Comma-separated fp32, fp16, bf16 (default: fp16,bf16 on CUDA, fp32 on CPU).")
@click.option("--steps", type=int, default=None, help="Denoising steps of the loop stages (default: the model's, else 30).")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed calls after the first (one-time) call.")
@click.option("--iters", type=int, default=20, show_default=True, help="Timed calls per stage.")
@click.option("--loop-iters", type=int, default=None,
              help="Timed calls of the denoising loop and end-to-end stages (default: min(iters, 5)).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for results.json and the chart.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--max-autotune", is_flag=True, help="Also time torch.compile(mode='max-autotune') (compile-max-autotune).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the preset's weights and the inputs.")
@click.pass_context
def bench_cmd(ctx, model_dir, preset, backends, resolutions, batch, dtype, steps, warmup, iters, loop_iters, out,
              device, max_autotune, seed):
    """Per-stage and end-to-end latency of each backend against torch eager, torch.compile and diffusers.

    Writes results.json and latency.png into --out and prints a table. Unavailable backends are
    listed as skipped with the reason.
    """
    import shlex

    from ldm_rt.bench import bench, format_table

    command = shlex.join(["ldm-rt", "bench", *ctx.meta.get("raw_args", [])])
    results = bench(model_dir, preset, out, backends=backends, resolutions=resolutions, batch=batch, dtype=dtype,
                    steps=steps, warmup=warmup, iters=iters, loop_iters=loop_iters, device=device,
                    max_autotune=max_autotune, seed=seed, command=command)
    for line in format_table(results):
        click.echo(line)
    click.echo(f"wrote {Path(results['out']) / 'results.json'}")
    if results["chart"].startswith("no chart: "):
        click.echo(f"warning: {results['chart'][len('no chart: '):]}", err=True)
    else:
        click.echo(f"wrote {results['chart']}")


@main.command("serve")
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="Model directory (diffusers layout). Default: the built-in demo model.")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default="torch", show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Default: fp16 on CUDA, fp32 on CPU.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-batch", type=int, default=4, show_default=True,
              help="Most images in one batched denoising loop (1: no batching).")
@click.option("--max-wait-ms", type=float, default=20.0, show_default=True,
              help="Longest a request waits for others to batch with.")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests waiting for the model beyond which the server answers 429.")
@click.option("--drain-timeout", type=float, default=120.0, show_default=True,
              help="Seconds SIGTERM waits for accepted requests before exiting anyway.")
@click.option("--no-warm-up", is_flag=True, help="Ready as soon as the model is loaded (skip the warm-up image).")
@click.option("--ray", "use_ray", is_flag=True, help="Run as a Ray Serve deployment (extra `ray`).")
@click.option("--ray-address", default=None,
              help="With --ray: the cluster to join (default: RAY_ADDRESS, else a local Ray instance).")
@click.option("--replicas", type=int, default=1, show_default=True, help="With --ray: model replicas.")
@click.option("--gpus-per-replica", type=float, default=None,
              help="With --ray: GPUs per replica (default: 1 when the cluster has GPUs, else 0).")
@click.option("--cpus-per-replica", type=float, default=1.0, show_default=True, help="With --ray: CPUs per replica.")
@click.option("--min-replicas", type=int, default=None, help="With --ray: autoscale from this many replicas...")
@click.option("--max-replicas", type=int, default=None, help="...up to this many.")
@click.option("--target-ongoing-requests", type=float, default=None,
              help="With --ray autoscaling: requests per replica the autoscaler aims at (default: --max-batch).")
def serve_cmd(model_dir, backend, device, dtype, host, port, max_batch, max_wait_ms, max_queue, drain_timeout,
              no_warm_up, use_ray, ray_address, replicas, gpus_per_replica, cpus_per_replica, min_replicas,
              max_replicas, target_ongoing_requests):
    """Serve images over HTTP (OpenAI images API shape) with dynamic batching; --ray scales out on Ray Serve."""
    from ldm_rt.errors import require

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve", "ldm-rt serve")
    from ldm_rt.serve.app import Settings, serve_forever

    settings = Settings(model_dir=model_dir, backend=backend, device=device, dtype=dtype, max_batch=max_batch,
                        max_wait_ms=max_wait_ms, max_queue=max_queue, warm_up=not no_warm_up)
    settings.check()
    ray_only = dict(ray_address=ray_address, gpus_per_replica=gpus_per_replica, min_replicas=min_replicas,
                    max_replicas=max_replicas, target_ongoing_requests=target_ongoing_requests)
    if not use_ray:
        given = [f"--{k.replace('_', '-')}" for k, v in ray_only.items() if v is not None]
        given += ["--replicas"] * (replicas != 1) + ["--cpus-per-replica"] * (cpus_per_replica != 1.0)
        if given:
            raise InputError(f"{', '.join(given)} only apply with --ray.")
        serve_forever(settings, host=host, port=port, drain_timeout_s=drain_timeout)
        return
    require("ray.serve", "ray", "ldm-rt serve --ray")
    from ldm_rt.serve.ray_serve import RayOptions, run_ray

    run_ray(settings, RayOptions(replicas=replicas, gpus_per_replica=gpus_per_replica,
                                 cpus_per_replica=cpus_per_replica, min_replicas=min_replicas,
                                 max_replicas=max_replicas, target_ongoing_requests=target_ongoing_requests,
                                 address=ray_address, drain_timeout_s=drain_timeout),
            host=host, port=port)


@main.command()
def env():
    """Print what is available: torch and CUDA, GPU, and each optional package (extras) with its version."""
    from ldm_rt.env import environment_report

    for key, value in environment_report().items():
        click.echo(f"{key:<22} {value}")


@main.command("upscale")
@click.argument("image_path", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="PNG path (default: <IN stem>-x2.png in the current directory).")
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="A model with condition channels (default: the built-in 2x super-resolution demo).")
@click.option("--prompt", default="", help="Optional caption of the image (the demo's grammar); default none.")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default="torch", show_default=True)
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Default: fp16 on CUDA, fp32 on CPU.")
def upscale(image_path, out, model_dir, prompt, backend, steps, seed, device, dtype):
    """Upscale IN.png 2x with the super-resolution demo (`run --model-dir <sr model> --image IN.png`)."""
    import time

    from ldm_rt.image_input import image_size, open_image
    from ldm_rt.model_dir import default_sr_model_dir
    from ldm_rt.pipeline import Pipeline
    from ldm_rt.seeds import check_seed

    start = time.perf_counter()
    check_seed(seed)
    image = open_image(image_path, "IN.png")  # a non-image is one error line, before the model loads
    out = Path(f"{Path(image_path).stem}-x2.png") if out is None else out
    _check_writable(out)
    pipe = Pipeline.from_pretrained(model_dir or default_sr_model_dir(), backend=backend, device=device, dtype=dtype)
    if pipe.family.condition_channels(pipe.config) == 0:
        raise InputError(f"--model-dir {model_dir} has no condition channels: it is not a super-resolution model.")
    result = pipe.generate(prompt, steps=steps, seed=seed, image=image)
    picture = result.images[0]
    picture.save(out)
    h, w = image_size(image)
    click.echo(f"wrote {out} ({picture.width}x{picture.height} from {w}x{h}) in {time.perf_counter() - start:.2f} s")


@main.command("train-demo")
@click.option("--stage", type=click.Choice(["vae", "dit", "export"]), required=True)
@click.option("--run-dir", type=click.Path(path_type=Path), required=True)
@click.option("--steps", type=int, default=0, help="Total step target; re-running resumes from the last checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch", type=int, default=None, help="Default: the demo config's.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: the demo config's).")
@click.option("--log-every", type=int, default=50, show_default=True)
@click.option("--ckpt-every", type=int, default=500, show_default=True)
@click.option("--config", default="demo", show_default=True,
              help="demo (the shipped model), sr (the 2x super-resolution demo) or tiny (tests).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Export directory (default: RUN_DIR/model; pass ldm_rt/demo/model's path to replace the built-in model).")
@click.option("--init-from", type=click.Path(path_type=Path), default=None,
              help="dit: warm-start a run dir that has no dit.pt from an exported model (e.g. ldm_rt/demo/model).")
def train_demo(stage, run_dir, steps, seed, batch, lr, log_every, ckpt_every, config, out, init_from):
    """Train the built-in demo model (stages vae, dit, export); same as `python -m ldm_rt.demo.train`."""
    from ldm_rt.demo.train import run_cli
    from ldm_rt.model_dir import writable_dir
    from ldm_rt.seeds import check_seed

    check_seed(seed)
    writable_dir(run_dir)  # before any training: an unwritable run dir is one error line, not a traceback
    run_cli(stage, run_dir, steps, seed, batch, lr, log_every, ckpt_every, config, out, init_from)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
