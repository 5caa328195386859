"""FLUX.1 Fill and FLUX.1 Canny/Depth (Control) end to end (issue 17): directories diffusers'
FluxFillPipeline / FluxControlPipeline save load in ours and draw their images, same prompt, seed,
steps, size (and strength for Fill); the CLI's --image --mask / --control-image; bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import invoke
from ldm_rt.model_dir import random_components
from ldm_rt.pipeline import Pipeline
from test_flux_conditioning import CONTROL_LIKE, FILL_LIKE, as_pipeline, mask_picture
from test_flux_family import PROMPT, diffusers_pipeline, psnr

diffusers = pytest.importorskip("diffusers")


def picture(seed: int, height: int, width: int) -> Image.Image:
    """A smooth random picture (blurred noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 6), max(2, width // 6), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def saved(cls, config, seed, tmp):
    """diffusers' `cls` on random tiny components, saved with save_pretrained; ours loaded from there."""
    theirs = as_pipeline(cls, diffusers_pipeline(random_components(config, seed=seed), tmp))
    theirs.save_pretrained(tmp / "model")
    return theirs, Pipeline.from_pretrained(tmp / "model", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    return saved(diffusers.FluxFillPipeline, FILL_LIKE, 41, tmp_path_factory.mktemp("fill"))


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    return saved(diffusers.FluxControlPipeline, CONTROL_LIKE, 42, tmp_path_factory.mktemp("control"))


def _run(pipe, **kwargs):
    with torch.no_grad():
        return pipe(PROMPT, output_type="pil", **kwargs).images


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_fill_equals_flux_fill_pipeline(fill, strength):
    """The image encoded (the generator's first sample), the noise, the masked image's sample, the
    conditioning concatenated every step; strength < 1 starts from the image as diffusers' Fill does."""
    theirs, ours = fill
    h, w, seed, steps = 48, 80, 5, 4
    image, mask = picture(1, h, w), mask_picture(2, h, w)
    kwargs = dict(height=h, width=w, max_sequence_length=512)
    expected = _run(theirs, image=image, mask_image=mask, strength=strength, num_inference_steps=steps,
                    guidance_scale=30.0, generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    result = ours.generate(PROMPT, image=image, mask_image=mask, strength=strength, steps=steps, guidance=30.0,
                           seed=seed, height=h, width=w)
    got = result.images
    assert np.asarray(expected[0]).std() > 5
    value = psnr(got[0], expected[0])
    print(f"flux fill strength {strength}: PSNR {value:.1f} dB vs FluxFillPipeline")
    assert value >= 50
    other = ours(PROMPT, image=image, mask_image=mask_picture(3, h, w), strength=strength, steps=steps,
                 guidance=30.0, seed=seed, height=h, width=w)
    assert psnr(other[0], got[0]) < 40  # the mask is really an input


def test_fill_defaults_and_batch(fill):
    """Defaults from the directory (FluxFillPipeline's 50 steps, guidance 30; strength 1; size the image's);
    two prompts x two images, the conditioning repeated as diffusers repeats it."""
    theirs, ours = fill
    h, w = 32, 48
    image, mask = picture(4, h, w), mask_picture(5, h, w)
    prompts = [PROMPT, "a blue cube"]
    with torch.no_grad():
        expected = theirs(prompts, image=image, mask_image=mask, num_inference_steps=3, height=h, width=w,
                          num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(6)).images
    result = ours.generate(prompts, image=image, mask_image=mask, steps=3, seed=6, num_images=2)
    assert result.guidance == 30.0 and result.strength == 1.0 and result.images[0].size == (w, h)
    values = [psnr(a, b) for a, b in zip(result.images, expected)]
    print(f"flux fill batch: PSNR {min(values):.1f} dB (min of 4) vs FluxFillPipeline")
    assert len(values) == 4 and min(values) >= 50


@pytest.mark.parametrize("prompts,num_images", [(1, 1), (2, 2)])
def test_control_equals_flux_control_pipeline(control, prompts, num_images):
    """The control image encoded first (one sample per row), then the noise, its latents concatenated
    every step; two control images for two prompts are each repeated for their prompt's images."""
    theirs, ours = control
    h, w, seed, steps = 48, 64, 8, 4
    texts = [PROMPT, "a blue cube"][:prompts]
    images = [picture(10 + i, h, w) for i in range(prompts)]
    arg = images[0] if prompts == 1 else images
    with torch.no_grad():
        expected = theirs(texts, control_image=arg, num_inference_steps=steps, guidance_scale=0.0, height=h,
                          width=w, num_images_per_prompt=num_images, max_sequence_length=512,
                          generator=torch.Generator("cpu").manual_seed(seed)).images
    if prompts > 1:  # ours takes the batch as a tensor in [0, 1]
        arg = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])
    got = ours(texts, control_image=arg, steps=steps, guidance=0.0, seed=seed, height=h, width=w,
               num_images=num_images)
    values = [psnr(a, b) for a, b in zip(got, expected)]
    print(f"flux control {prompts}x{num_images}: PSNR {min(values):.1f} dB vs FluxControlPipeline")
    assert len(values) == prompts * num_images and min(values) >= 50
    if prompts == 1:
        other = ours(texts, control_image=picture(20, h, w), steps=steps, guidance=0.0, seed=seed, height=h, width=w)
        assert psnr(other[0], got[0]) < 40  # the control image is really an input


def test_cli_fill_and_control(fill, control, tmp_path):
    """`run --image --mask` on a Fill directory, `run --control-image` on a Control one: PNGs equal to the API."""
    h, w = 32, 48
    picture(30, h, w).save(tmp_path / "in.png")
    mask_picture(31, h, w).save(tmp_path / "mask.png")
    _, ours = fill
    out = tmp_path / "fill.png"
    result = invoke("run", "--model-dir", ours._path, "--prompt", PROMPT, "--image", tmp_path / "in.png", "--mask",
                    tmp_path / "mask.png", "--steps", 2, "--seed", 3, "--out", out)
    assert result.exit_code == 0, result.output
    api = ours(PROMPT, image=tmp_path / "in.png", mask_image=tmp_path / "mask.png", steps=2, seed=3)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api))
    _, ours = control
    out = tmp_path / "control.png"
    result = invoke("run", "--model-dir", ours._path, "--prompt", PROMPT, "--control-image", tmp_path / "in.png",
                    "--steps", 2, "--seed", 3, "--out", out)
    assert result.exit_code == 0, result.output
    api = ours(PROMPT, control_image=tmp_path / "in.png", steps=2, seed=3)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api))


@pytest.mark.parametrize("which,args,words", [
    ("fill", ("--image", "in.png"), "mask_image"),  # the mask is required
    ("fill", ("--mask", "mask.png"), "image"),
    ("fill", ("--image", "in.png", "--mask", "small.png"), "of the image's size"),
    ("control", (), "control_image"),
    ("control", ("--control-image", "in.png", "--strength", "0.5"), "strength"),
    ("control", ("--control-image", "in.png", "--mask", "mask.png"), "--mask goes with --image"),
    ("control", ("--control-image", "in.png", "--image", "in.png"), "image does not apply"),
])
def test_bad_conditioning_is_one_error_line(fill, control, tmp_path, which, args, words):
    picture(32, 32, 48).save(tmp_path / "in.png")
    mask_picture(33, 32, 48).save(tmp_path / "mask.png")
    mask_picture(34, 16, 16).save(tmp_path / "small.png")
    root = (fill if which == "fill" else control)[1]._path
    flat = [str(tmp_path / a) if a.endswith(".png") else a for a in args]
    result = invoke("run", "--model-dir", root, "--prompt", "a fox", "--steps", 1, "--out", tmp_path / "x.png", *flat)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert words in lines[0], lines[0]


@pytest.mark.parametrize("preset", ["flux-fill-tiny", "flux-control-tiny"])
def test_bench_runs_a_conditioned_preset(preset, tmp_path):
    """`ldm-rt bench` gives the step a conditioning tensor from seeded random images of the model's roles."""
    import json

    out = tmp_path / "bench"
    result = invoke("bench", "--preset", preset, "--backends", "torch", "--resolutions", 32, "--steps", 1, "--warmup",
                    0, "--iters", 1, "--out", out)
    assert result.exit_code == 0, result.output
    stages = json.loads((out / "results.json").read_text())["runs"][0]["stages"]
    assert all(stages[s].get("median_ms", 0) > 0 for s in ("denoise_step", "denoise_loop", "end_to_end")), stages
