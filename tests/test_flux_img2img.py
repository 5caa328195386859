"""FLUX.1 image-to-image and inpainting (issue 17) against diffusers' own pipelines: a directory
that diffusers' FluxPipeline saved loads in ours, and `pipe(prompt, image=, strength=)` draws
`FluxImg2ImgPipeline`'s image, with `mask_image=` `FluxInpaintPipeline`'s, same seed, steps,
strength and size, schnell-like and dev-like."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_rt.model_dir import random_components
from ldm_rt.pipeline import Pipeline
from test_flux_family import CASES, PROMPT, diffusers_pipeline, psnr

diffusers = pytest.importorskip("diffusers")


def picture(seed: int, height: int, width: int) -> Image.Image:
    """A smooth random picture (blurred noise): the VAE sees structure, the resize has work to do."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 6), max(2, width // 6), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def mask(height: int, width: int) -> Image.Image:
    """White (repaint) on the right ~40% and a top band, grey edges on both sides of 0.5."""
    arr = np.zeros((height, width), dtype=np.uint8)
    arr[:, int(width * 0.6):] = 255
    arr[: height // 4] = 200
    arr[:, int(width * 0.55)] = 100  # binarised to keep
    return Image.fromarray(arr, "L")


@pytest.fixture(scope="module", params=list(CASES))
def pipes(request, tmp_path_factory):
    """(case, run settings, diffusers' FluxPipeline, ours loaded from its save_pretrained)."""
    case = request.param
    config, run = CASES[case]
    tmp = tmp_path_factory.mktemp(f"flux-{case}")
    theirs = diffusers_pipeline(random_components(config, seed=21), tmp)
    theirs.save_pretrained(tmp / "flux")
    return case, run, theirs, Pipeline.from_pretrained(tmp / "flux", device="cpu", dtype="fp32")


def _theirs(cls, theirs, run, **kwargs):
    pipe = cls(**theirs.components)
    with torch.no_grad():
        return pipe(PROMPT, guidance_scale=run["guidance"], max_sequence_length=run["max_sequence_length"],
                    output_type="pil", **kwargs).images


@pytest.mark.parametrize("strength", [0.65, 1.0])
def test_img2img_equals_flux_img2img_pipeline(pipes, strength):
    """The image (50x83, resized to 48x80 by both) encoded with the generator's VAE sample, the noise drawn
    after it, the schedule's tail that `strength` keeps (diffusers' get_timesteps on FluxPipeline's sigmas)."""
    case, run, theirs, ours = pipes
    image, steps, seed, h, w = picture(1, 50, 83), 6, 13, 48, 80
    expected = _theirs(diffusers.FluxImg2ImgPipeline, theirs, run, image=image, strength=strength,
                       num_inference_steps=steps, height=h, width=w,
                       generator=torch.Generator("cpu").manual_seed(seed))
    got = ours(PROMPT, image=image, strength=strength, steps=steps, guidance=run["guidance"], seed=seed, height=h,
               width=w)
    assert got[0].size == expected[0].size == (w, h)
    assert np.asarray(expected[0]).std() > 5
    value = psnr(got[0], expected[0])
    print(f"flux {case} img2img strength {strength}: PSNR {value:.1f} dB vs FluxImg2ImgPipeline")
    assert value >= 50


def test_img2img_two_prompts_two_images_each(pipes):
    """Batching: two prompts x num_images 2, the image tiled to all four rows, as diffusers repeats it."""
    case, run, theirs, ours = pipes
    image, prompts = picture(2, 32, 48), [PROMPT, "a blue cube"]
    pipe = diffusers.FluxImg2ImgPipeline(**theirs.components)
    with torch.no_grad():
        expected = pipe(prompts, image=image, strength=0.8, num_inference_steps=4, guidance_scale=run["guidance"],
                        max_sequence_length=run["max_sequence_length"], num_images_per_prompt=2, height=32, width=48,
                        generator=torch.Generator("cpu").manual_seed(3)).images
    got = ours(prompts, image=image, strength=0.8, steps=4, guidance=run["guidance"], seed=3, num_images=2)
    assert len(got) == len(expected) == 4
    values = [psnr(a, b) for a, b in zip(got, expected)]
    print(f"flux {case} img2img batch: PSNR {min(values):.1f} dB (min of 4) vs FluxImg2ImgPipeline")
    assert min(values) >= 50


@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpaint_equals_flux_inpaint_pipeline(pipes, strength):
    """The mask binarised, interpolated to the latent size and packed like the latents; the known region
    noised to the next step's level and put back after every step, the clean latents after the last."""
    case, run, theirs, ours = pipes
    image, steps, seed, h, w = picture(3, 48, 64), 5, 17, 48, 64
    m = mask(h, w)
    expected = _theirs(diffusers.FluxInpaintPipeline, theirs, run, image=image, mask_image=m, strength=strength,
                       num_inference_steps=steps, height=h, width=w,
                       generator=torch.Generator("cpu").manual_seed(seed))
    got = ours(PROMPT, image=image, mask_image=m, strength=strength, steps=steps, guidance=run["guidance"], seed=seed,
               height=h, width=w)
    value = psnr(got[0], expected[0])
    print(f"flux {case} inpaint strength {strength}: PSNR {value:.1f} dB vs FluxInpaintPipeline")
    assert value >= 50
    plain = ours(PROMPT, image=image, strength=strength, steps=steps, guidance=run["guidance"], seed=seed, height=h,
                 width=w)
    assert psnr(plain[0], got[0]) < 40  # the mask really changes the result
