"""`ldm-rt parity`: one backend against the fp32 torch reference, per component and end to end.

Per component (every graph the model's family declares: text encoder, DiT, VAE decoder; FLUX.1
adds T5): fresh seeded random inputs from the export specs' sample-input factories (`export/specs.py`), rounded to the backend's dtype, go through
the backend's callables and through the reference module in fp32 on the CPU; each output is one
row judged by `parity.TOLERANCES`. End to end: the 8-bit image from a few denoising steps
against the torch backend's fp32 CPU image with the same seed, judged by `parity.IMAGE_PSNR_DB`.
NaN or Inf anywhere fails its row.

The reference always runs on the CPU in fp32, so it is the same numbers whatever the backend's
device (on CUDA, cuDNN would use TF32 convolutions by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm_rt import parity
from ldm_rt.errors import NonFiniteError
from ldm_rt.precision import Precision



@dataclass(frozen=True)
class Row:
    component: str  # the spec's name: text_encoder, transformer, vae_decoder (FLUX.1: text_encoder_2)
    output: str  # the spec's output name
    dtype: str  # what the backend computed it in
    result: parity.Comparison
    polygraphy: bool | None = None  # polygraphy's max-abs verdict, where it was asked for

    @property
    def passed(self) -> bool:
        return self.result.passed and self.polygraphy is not False


@dataclass(frozen=True)
class ImageRow:
    dtype: str
    height: int
    width: int
    steps: int
    psnr_db: float  # -inf when the backend's image had NaN/Inf
    min_db: float

    @property
    def passed(self) -> bool:
        return not math.isnan(self.psnr_db) and self.psnr_db >= self.min_db


@dataclass
class ParityReport:
    backend: str
    device: str
    dtype: str
    seed: int
    shape: tuple[int, int, int]  # (batch, latent height, latent width) of the component inputs
    rows: list[Row] = field(default_factory=list)
    image: ImageRow | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(not r.passed for r in self.rows) + (self.image is not None and not self.image.passed)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and self.failures == 0


def _static_shape(onnx_dir) -> dict | None:
    from ldm_rt.export.onnx_export import read_manifest

    return None if onnx_dir is None else (read_manifest(onnx_dir) or {}).get("static")


def _backend_call(pipe, spec, dtype: Precision):
    """What the backend runs for one export spec: the transformer through the backend's transformer
    (by input name: a family's transformer takes its own conditioning inputs; the triton backend
    swaps its kernels in there), every other graph as the backend holds it (`pipe.graphs`, on the
    backends that run exported graphs), else the spec's reference module as the backend placed it
    (torch, triton)."""
    if spec.name == "transformer":
        return pipe.transformer
    if spec.name in pipe.graphs:
        return pipe.graphs[spec.name]
    module = spec.module(pipe.components)
    weight = next(module.parameters())
    if weight.device != pipe.device or weight.dtype != dtype.dtype:
        module.to(device=pipe.device, dtype=dtype.dtype)
    return module


def run_parity(
    model_dir: str | Path | None = None,
    backend: str = "onnxruntime",
    dtype: str | None = None,
    device: str | None = None,
    onnx_dir: str | Path | None = None,
    seed: int = 0,
    steps: int = 2,
    polygraphy: bool | None = None,
    height: int | None = None,
    width: int | None = None,
) -> ParityReport:
    """Run every component and one image through `backend` and the fp32 torch reference.

    Without `model_dir`, the built-in demo model (its error says what to do when it is absent).
    `onnx_dir`: run that export's graphs (onnxruntime) instead of exporting into the cache.
    `height`/`width`: the image size in pixels (default: the model's), whose latent size (one side a
    size step narrower) the components' inputs take too.
    `polygraphy`: also judge each output with polygraphy's comparator (`export/tensorrt.py`
    `compare_with_polygraphy`); None: for the tensorrt backend only.
    """
    from ldm_rt.export.specs import _FP32_ALWAYS, component_specs
    from ldm_rt.model_dir import default_model_dir, load_model_dir
    from ldm_rt.pipeline import Pipeline, resolve_device

    from ldm_rt.seeds import check_seed

    seed = check_seed(seed)
    path = Path(model_dir) if model_dir is not None else default_model_dir()
    reference = load_model_dir(path)  # stays fp32 on the CPU
    dev = resolve_device(device)
    precision = Precision.parse(dtype) or Precision.default_for(dev)
    # A second copy for the backend: backends may cast or move their modules in place.
    pipe = Pipeline(load_model_dir(path), backend=backend, device=dev, dtype=precision, onnx_dir=onnx_dir)

    config = reference.config
    family = pipe.family
    f = config.vae.scale_factor
    ref_pipe = Pipeline(reference, backend="torch", device="cpu", dtype="fp32")
    width = width or height
    if height is not None:
        family.latent_shape(config, 1, height, width)  # InputError on a size the model cannot take
    static = _static_shape(onnx_dir)
    if static is not None:
        shape = (static["batch"], static["height"] // f, static["width"] // f)
    else:  # batch 2 (one CFG pair), the latent size (the model's default), one side a size step narrower
        m = family.size_multiple(config) // f  # latent multiple (the DiT's patch size; 2 for Flux's packing)
        h, w = (height // f, width // f) if height is not None else (ref_pipe.default_size // f,) * 2
        shape = (2, h, w - m if w > m else w)
    height = height or ref_pipe.defaults.get("height", ref_pipe.default_size)  # the image's size
    width = width or ref_pipe.defaults.get("width", height)
    report = ParityReport(backend, str(dev), precision.value, seed, shape)

    vae_dtype = Precision.parse(pipe.vae_dtype)
    specs = component_specs(config, precision.value)
    for i, (name, spec) in enumerate(specs.items()):
        run_dtype = vae_dtype if name == "vae_decoder" else precision
        call = _backend_call(pipe, spec, run_dtype)
        # In the backend's dtype (timestep stays fp32, as in the specs); the reference gets the
        # same rounded values in fp32, so a row measures the computation, not the input rounding.
        inputs = [x.to(run_dtype.dtype) if x.is_floating_point() and t.name not in _FP32_ALWAYS else x
                  for t, x in zip(spec.inputs, spec.sample_inputs(*shape, seed=(seed + i) % 2**64))]
        args = [x.to(dev) for x in inputs]
        with torch.no_grad():
            # The DiT by input name (the spec's names are the backends' parameter names): a text- and
            # a class-conditional DiT take different conditioning inputs.
            outs = call(**dict(zip(spec.input_names, args))) if name == "transformer" else call(*args)
            refs = spec.module(reference)(*[x.float() if x.is_floating_point() else x for x in inputs])
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        refs = refs if isinstance(refs, (tuple, list)) else (refs,)
        outs = [o.float().cpu() for o in outs]
        verdicts = {}
        if polygraphy if polygraphy is not None else backend == "tensorrt":
            from ldm_rt.export.tensorrt import compare_with_polygraphy

            verdicts = {r.output: r.polygraphy_passed for r in compare_with_polygraphy(
                dict(zip(spec.output_names, outs)), dict(zip(spec.output_names, refs)), spec.parity_key,
                run_dtype.value, runner=backend)}
        for output, got, ref in zip(spec.output_names, outs, refs):
            result = parity.compare(got, ref, spec.parity_key, run_dtype.value)
            report.rows.append(Row(name, output, run_dtype.value, result, verdicts.get(output)))

    if static is not None:
        report.notes.append(f"end-to-end image skipped: the export is static (batch {static['batch']}), "
                            "and the pipeline needs the CFG batch and the image batch")
        return report
    kwargs = dict(steps=steps, seed=seed, height=height, width=width, **condition_images(ref_pipe, height, width, seed))
    if kwargs.keys() - {"steps", "seed", "height", "width"}:
        report.notes.append("end-to-end image conditioned on seeded random images (" +
                            ", ".join(sorted(kwargs.keys() - {"steps", "seed", "height", "width"})) + ")")
    prompt = ref_pipe.family.sample_prompts(config, 1)[0]  # text, or a class index
    expected = np.array(ref_pipe.generate(prompt, **kwargs).images[0])
    try:
        got = np.array(pipe.generate(prompt, **kwargs).images[0])
        db = parity.psnr(torch.from_numpy(got), torch.from_numpy(expected))
    except NonFiniteError:
        db = -math.inf
    report.image = ImageRow(precision.value, height, width, steps, db, parity.IMAGE_PSNR_DB[precision.value])
    return report


def condition_images(pipe, height: int, width: int, seed: int) -> dict:
    """For a model with condition channels (issue 17): a seeded random PIL image per role it
    requires, at the output size over the model's `upscale` default (a mask binary, white =
    repaint); {} for every other model."""
    from PIL import Image

    family, config = pipe.family, pipe.config
    if family.condition_channels(config) == 0:
        return {}
    up = pipe.defaults.get("upscale", 1)
    rng = np.random.default_rng(seed)
    images = {}
    for role in family.condition_inputs(config):
        if role == "mask_image":
            images[role] = Image.fromarray((rng.random((height // up, width // up)) < 0.5).astype(np.uint8) * 255)
        else:
            images[role] = Image.fromarray(rng.integers(0, 256, (height // up, width // up, 3), dtype=np.uint8))
    return images


def format_report(report: ParityReport) -> list[str]:
    """The table `ldm-rt parity` prints: one row per component output, then the image."""
    b, h, w = report.shape
    lines = [
        f"parity: backend {report.backend} ({report.device}, {report.dtype}) against the torch reference "
        f"(cpu, fp32); seed {report.seed}, batch {b}, latent {h}x{w}",
        f"{'component':<14} {'output':<18} {'dtype':<5} {'rel-L2':>9} {'max-abs':>9}  "
        f"{'tolerance (rel-L2 / max-abs)':<28} result",
    ]
    for row in report.rows:
        r = row.result
        verdict = "pass" if r.passed else ("FAIL NaN/Inf" if not r.finite else "FAIL")
        if row.polygraphy is not None:
            verdict += f", polygraphy {'pass' if row.polygraphy else 'FAIL'}"
        tolerance = f"{r.tolerance.rel_l2:.0e} / {r.tolerance.max_abs:.0e}"
        lines.append(f"{row.component:<14} {row.output:<18} {row.dtype:<5} {r.rel_l2:>9.2e} {r.max_abs:>9.2e}  "
                     f"{tolerance:<28} {verdict}")
    if report.image is not None:
        im = report.image
        value = "NaN/Inf" if im.psnr_db == -math.inf else f"{im.psnr_db:.1f} dB"
        lines.append(f"image: 8-bit {im.height}x{im.width}, {im.steps} steps, seed {report.seed}, "
                     f"{im.dtype} against the torch fp32 image: PSNR {value} (>= {im.min_db:.0f} dB) "
                     f"{'pass' if im.passed else 'FAIL'}")
    lines += [f"note: {n}" for n in report.notes]
    checks = len(report.rows) + (report.image is not None)
    lines.append(f"parity: {'pass' if report.passed else 'FAIL'} "
                 f"({checks - report.failures} of {checks} checks pass)")
    return lines
