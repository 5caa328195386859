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
@click.option("--prompt", required=True, multiple=True, help="Text prompt (repeat for a batch of prompts).")
@click.option("--negative-prompt", default=None, help="What to steer away from (default: empty prompt).")
@click.option("--model-dir", type=click.Path(path_type=Path), default=None,
              help="Model directory (diffusers layout). Default: the built-in demo model.")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default="torch", show_default=True)
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model's, else 30).")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale; <= 1 disables CFG (default: the model's, else 4.0).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--height", type=int, default=None, help="Image height in pixels (default: the model's).")
@click.option("--width", type=int, default=None, help="Image width in pixels (default: the model's).")
@click.option("--num-images", type=int, default=1, show_default=True, help="Images per prompt.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="PNG path (default ldm-rt-<seed>.png); several images are written as <stem>-<i>.png.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Default: fp16 on CUDA, fp32 on CPU.")
def run(prompt, negative_prompt, model_dir, backend, steps, guidance, seed, height, width, num_images, out,
        device, dtype):
    """Generate images from a text prompt."""
    import time

    from ldm_rt.model_dir import default_model_dir
    from ldm_rt.pipeline import Pipeline

    start = time.perf_counter()
    prompts = list(prompt)
    paths = output_paths(out, seed, len(prompts) * num_images)
    for path in paths:
        _check_writable(path)
    pipe = Pipeline.from_pretrained(model_dir or default_model_dir(), backend=backend, device=device, dtype=dtype)
    click.echo(f"model: {model_dir or 'built-in demo'} | backend {backend} | {pipe.device} {pipe.precision.value}",
               err=True)
    load_s = time.perf_counter() - start
    result = pipe.generate(prompts if len(prompts) > 1 else prompts[0], negative_prompt=negative_prompt,
                           steps=steps, guidance=guidance, seed=seed, height=height, width=width,
                           num_images=num_images, progress=True)
    for image, path in zip(result.images, paths):
        try:
            image.save(path)
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}.") from None
        click.echo(f"wrote {path} ({image.width}x{image.height})")
    t = result.timings
    click.echo(
        f"time: load {load_s:.2f} s | text encoding {t['text_encoding']:.2f} s | "
        f"denoising {t['denoising']:.2f} s | decoding {t['decoding']:.2f} s | "
        f"total {time.perf_counter() - start:.2f} s"
    )


@main.command("init-model")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--preset", default="tiny", show_default=True, help="Preset name, e.g. tiny, dit-s-2, dit-xl-2.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="dtype of the stored weights.")
@click.option("--overwrite", is_flag=True, help="Replace DIRECTORY if it already holds a model directory.")
def init_model_cmd(directory, preset, seed, dtype, overwrite):
    """Write a complete model directory with seeded, non-zero random weights.

    For tests and for benchmarking at real sizes before real weights exist: the images are noise.
    """
    from ldm_rt.configs import ModelConfig
    from ldm_rt.model_dir import init_model
    from ldm_rt.precision import Precision

    ModelConfig.from_name(preset)  # fail fast on a bad name
    path = init_model(directory, preset, seed=seed, dtype=Precision(dtype).dtype, overwrite=overwrite)
    click.echo(f"wrote {preset} model (seed {seed}, {dtype}) to {path}")


EXPORT_MODELS = {"dit": ("transformer",), "text-encoder": ("text_encoder",), "vae": ("vae_decoder",),
                 "all": ("text_encoder", "transformer", "vae_decoder")}


@main.command("export")
@click.option("--model", "which", type=click.Choice(list(EXPORT_MODELS)), required=True,
              help="Component to export (dit, text-encoder, vae) or all.")
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
    components = load_model_dir(model_dir or default_model_dir())
    shape = None
    if static:
        size = components.config.transformer.sample_size * components.config.vae.scale_factor
        shape = StaticShape(1 if batch is None else batch, size if height is None else height,
                            size if width is None else width)
    export_model(components, out, EXPORT_MODELS[which], dtype=dtype, opset=opset, static=shape)
    click.echo(f"{out}: {', '.join(EXPORT_MODELS[which])} and manifest.json")


@main.command()
def env():
    """Print what is available: torch and CUDA, GPU, triton, onnxruntime, tensorrt, polygraphy."""
    from ldm_rt.env import environment_report

    for key, value in environment_report().items():
        click.echo(f"{key:<22} {value}")


@main.command("train-demo")
@click.option("--stage", type=click.Choice(["vae", "dit", "export"]), required=True)
@click.option("--run-dir", type=click.Path(path_type=Path), required=True)
@click.option("--steps", type=int, default=0, help="Total step target; re-running resumes from the last checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch", type=int, default=None, help="Default: the demo config's.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: the demo config's).")
@click.option("--log-every", type=int, default=50, show_default=True)
@click.option("--ckpt-every", type=int, default=500, show_default=True)
@click.option("--config", default="demo", show_default=True, help="demo (the shipped model) or tiny (tests).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Export directory (default: the package's ldm_rt/demo/model).")
def train_demo(stage, run_dir, steps, seed, batch, lr, log_every, ckpt_every, config, out):
    """Train the built-in demo model (stages vae, dit, export); same as `python -m ldm_rt.demo.train`."""
    from ldm_rt.demo.train import run_cli

    run_cli(stage, run_dir, steps, seed, batch, lr, log_every, ckpt_every, config, out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
