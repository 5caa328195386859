"""Image-to-image and inpainting (issue 17) on the text DiT: against a reference assembled from
diffusers' pieces (diffusers has no pipeline for this DiT, so the loop is StableDiffusion3Img2Img /
Inpaint's, op for op, with diffusers' scheduler, AutoencoderKL and VaeImageProcessor and our
transformer), strength 1 against text-to-image, the inpainting invariant, bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import invoke
from ldm_rt.errors import InputError
from ldm_rt.image_input import preprocess
from ldm_rt.parity import psnr
from ldm_rt.pipeline import Pipeline

import diffusers
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import retrieve_latents

PROMPTS = ["a red circle on the left", "a blue square"]
STEPS = 7


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a Flux/SD3-style VAE config (scaling and shift factors both in use)."""
    root = tmp_path_factory.mktemp("img2img") / "tiny"
    shutil.copytree(tiny_model_dir, root)
    config = json.loads((root / "vae" / "config.json").read_text())
    config.update(scaling_factor=0.7312, shift_factor=0.1159)
    (root / "vae" / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def pipe(model_dir):
    return Pipeline.from_pretrained(model_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def hf_vae(pipe):
    vae = pipe.components.vae
    theirs = diffusers.AutoencoderKL(**{k: v for k, v in vae.config.to_dict().items() if not k.startswith("_")})
    theirs.load_state_dict(vae.state_dict(), strict=True)
    return theirs.eval()


def _picture(seed: int, height: int, width: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def _mask(height: int, width: int) -> Image.Image:
    """White (repaint) on the right 40% and a top band, black (keep) elsewhere, with grey edges."""
    arr = np.zeros((height, width), dtype=np.uint8)
    arr[:, int(width * 0.6):] = 255
    arr[: height // 4] = 200
    arr[:, int(width * 0.55)] = 100  # below 0.5: binarised to keep
    return Image.fromarray(arr, "L")


@torch.no_grad()
def _reference(pipe, hf_vae, image, strength, seed, height=None, width=None, guidance=4.0, mask=None):
    """StableDiffusion3Img2ImgPipeline / StableDiffusion3InpaintPipeline.__call__ (16-channel branch)
    with our DiT: image processor, encode with the generator, get_timesteps, scale_noise, CFG,
    FlowMatchEulerDiscreteScheduler.step, the inpaint blend, decode, postprocess."""
    f = pipe.vae_scale_factor
    multiple = f * pipe.config.transformer.patch_size
    processor = VaeImageProcessor(vae_scale_factor=multiple)
    height, width = processor.get_default_height_width(image, height, width)
    init = processor.preprocess(image, height=height, width=width).float()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    timesteps, n = diffusers.StableDiffusion3Img2ImgPipeline.get_timesteps(
        type("H", (), {"scheduler": scheduler})(), STEPS, strength, "cpu")
    generator = torch.Generator("cpu").manual_seed(seed)
    vae_cfg = hf_vae.config
    image_latents = retrieve_latents(hf_vae.encode(init), generator=generator)
    image_latents = (image_latents - vae_cfg.shift_factor) * vae_cfg.scaling_factor
    batch = len(PROMPTS)
    image_latents = image_latents.repeat(batch // image_latents.shape[0], 1, 1, 1)
    shape = (batch, pipe.config.transformer.in_channels, height // f, width // f)
    noise = torch.randn(shape, generator=generator)
    latents = scheduler.scale_noise(image_latents, timesteps[:1].repeat(batch), noise)
    if mask is not None:
        mask_processor = VaeImageProcessor(vae_scale_factor=multiple, do_normalize=False, do_binarize=True,
                                           do_convert_grayscale=True)
        m = mask_processor.preprocess(mask, height=height, width=width)
        m = torch.nn.functional.interpolate(m, size=(height // f, width // f)).float()
    states, text_mask, pooled = pipe.encode_prompt([""] * batch + PROMPTS)
    dit = pipe.components.transformer
    for i, t in enumerate(timesteps):
        out = dit(torch.cat([latents] * 2), t.expand(2 * batch), states, text_mask, pooled)
        uncond, cond = out.chunk(2)
        out = uncond + guidance * (cond - uncond)
        latents = scheduler.step(out, t, latents, return_dict=False)[0]
        if mask is not None:
            proper = image_latents
            if i < len(timesteps) - 1:
                proper = scheduler.scale_noise(proper, torch.tensor([timesteps[i + 1]]), noise)
            latents = (1 - m) * proper + m * latents
    decoded = hf_vae.decode(latents / vae_cfg.scaling_factor + vae_cfg.shift_factor).sample
    return processor.postprocess(decoded, output_type="pt"), latents, image_latents


def test_encode_equals_diffusers_autoencoder(pipe, hf_vae):
    image = torch.rand((3, 3, 20, 28), generator=torch.Generator().manual_seed(1)) * 2 - 1
    for mode in ("sample", "argmax"):
        got = pipe.encode(image, torch.Generator().manual_seed(5), sample_mode=mode)
        dist = hf_vae.encode(image)
        want = retrieve_latents(dist, generator=torch.Generator().manual_seed(5), sample_mode=mode)
        want = (want - hf_vae.config.shift_factor) * hf_vae.config.scaling_factor
        assert want.std() > 0.05
        assert (got - want).abs().max().item() <= 1e-5
    with pytest.raises(InputError, match="sample_mode"):
        pipe.encode(image, sample_mode="mean")


@pytest.mark.parametrize("strength,size,out_size", [
    (0.6, (23, 30), None),  # default size: rounded down to the multiple of 4 (20 x 28)
    (0.33, (16, 16), (20, 12)),  # resized to an explicit height x width
    (1.0, (19, 17), None),
])
def test_img2img_equals_diffusers_reference(pipe, hf_vae, strength, size, out_size):
    image = _picture(7, *size)
    kwargs = {} if out_size is None else dict(height=out_size[0], width=out_size[1])
    want, _, _ = _reference(pipe, hf_vae, image, strength, seed=11, **kwargs)
    got = pipe.generate(PROMPTS, image=image, strength=strength, steps=STEPS, seed=11, output_type="pt", **kwargs)
    assert got.strength == strength and got.images.shape == want.shape
    if out_size is None:
        assert got.images.shape[-2:] == (size[0] // 4 * 4, size[1] // 4 * 4)
    assert want.std() > 0.05
    assert (got.images - want).abs().max().item() <= 1e-5
    assert psnr(got.images * 255, want * 255) >= 50.0


def test_inpaint_equals_diffusers_reference_and_keeps_the_known_region(pipe, hf_vae):
    image, mask = _picture(3, 24, 32), _mask(24, 32)
    want, want_latents, image_latents = _reference(pipe, hf_vae, image, 0.8, seed=4, mask=mask)
    got = pipe.generate(PROMPTS, image=image, mask_image=mask, strength=0.8, steps=STEPS, seed=4, output_type="pt")
    assert (got.images - want).abs().max().item() <= 1e-5
    latents = pipe.generate(PROMPTS, image=image, mask_image=mask, strength=0.8, steps=STEPS, seed=4,
                            output_type="latent").images
    assert (latents - want_latents).abs().max().item() <= 1e-5
    # the known region (latent cells the binarised mask keeps) ends as the clean image latents, exactly
    m = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(mask) >= 128).float()[None, None], size=(12, 16))
    keep = (m == 0).expand_as(latents)
    assert keep.float().mean() > 0.3 and (~keep).float().mean() > 0.2
    ours_x0 = pipe.encode(preprocess(image, 24, 32), torch.Generator().manual_seed(4)).repeat(2, 1, 1, 1)
    assert (ours_x0 - image_latents).abs().max().item() <= 1e-5
    assert torch.equal(latents[keep], ours_x0[keep])
    assert (latents[~keep] - ours_x0[~keep]).abs().mean() > 0.1  # the rest was redrawn
    # (decoded pixels: the tiny VAE's mid-block attention mixes every latent into every pixel, so
    # the kept region's pixels are checked on the demo model, tests/test_img2img_demo.py)


def test_strength_one_is_text_to_image_from_the_noise_after_the_vae_sample(pipe):
    """Flow matching at strength 1 starts at sigma = 1: pure noise, the image has no weight. As in
    diffusers, the generator draws the VAE's sample first, so the noise is the second draw."""
    image = _picture(2, 16, 16)
    got = pipe.generate(PROMPTS, image=image, strength=1.0, steps=STEPS, seed=9, output_type="pt").images
    generator = torch.Generator().manual_seed(9)
    torch.randn((1, 4, 8, 8), generator=generator)  # the VAE sample of the one image
    noise = torch.randn((2, 4, 8, 8), generator=generator)
    t2i = pipe.generate(PROMPTS, steps=STEPS, latents=noise, output_type="pt").images
    assert torch.equal(got, t2i)
    other = pipe.generate(PROMPTS, image=_picture(3, 16, 16), strength=1.0, steps=STEPS, seed=9,
                          output_type="pt").images
    assert torch.equal(other, got)  # at sigma 1 the image has no weight: another image, same output ...
    lower = pipe.generate(PROMPTS, image=image, strength=0.5, steps=STEPS, seed=9, output_type="pt").images
    assert (lower - got).abs().max() > 1e-3  # ... and below 1 the image counts


def test_callback_counts_the_steps_that_run(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, float(t)))
        return kwargs

    pipe.generate("a red circle", image=_picture(1, 16, 16), strength=0.5, steps=10, seed=0,
                  callback_on_step_end=callback)
    scheduler = pipe.make_scheduler(torch.zeros(1, 4, 8, 8), 10)
    assert [i for i, _ in seen] == list(range(5))
    assert [t for _, t in seen] == scheduler.timesteps[5:].tolist()


def test_image_as_tensor_and_path(pipe, tmp_path):
    image = _picture(5, 16, 20)
    path = tmp_path / "in.png"
    image.save(path)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    runs = [pipe.generate("a red circle", image=x, strength=0.7, steps=4, seed=1, output_type="pt").images
            for x in (image, str(path), tensor, tensor[None])]
    for other in runs[1:]:
        assert torch.equal(other, runs[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(strength=0.5), "give an image"),
    (dict(mask_image=Image.new("L", (16, 16))), "give an image"),
    (dict(image="IMAGE", strength=0.0), "strength"),
    (dict(image="IMAGE", strength=1.5), "strength"),
    (dict(image="IMAGE", mask_image=Image.new("L", (16, 12))), "mask_image is 16x12"),
    (dict(image="IMAGE", latents=torch.randn(1, 4, 8, 8)), "not both"),
    (dict(image=Image.new("RGB", (3, 40))), "smaller than this model's size multiple 4"),
    (dict(image=torch.rand(3, 16, 16) * 2 - 1), r"in \[0, 1\]"),
    (dict(image=torch.rand(2, 16, 16)), "shape"),
    (dict(image=np.zeros((16, 16, 3))), "PIL image, a path"),
    (dict(image="IMAGE", height=18), "multiple of 4"),
    (dict(image="IMAGE", strength=0.05, steps=5), None),  # flow rounding keeps 1 step: fine
])
def test_bad_image_arguments_are_input_errors(pipe, kwargs, match):
    kwargs = {k: (_picture(0, 16, 16) if isinstance(v, str) and v == "IMAGE" else v) for k, v in kwargs.items()}
    kwargs.setdefault("steps", 2)
    if match is None:
        pipe.generate("a red circle", **kwargs)
        return
    with pytest.raises(InputError, match=match):
        pipe.generate("a red circle", **kwargs)


def _error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith("error: ")]


def test_cli_img2img_and_inpaint_write_the_recipe(model_dir, tmp_path):
    _picture(1, 17, 22).save(tmp_path / "in.png")
    _mask(17, 22).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    result = invoke("run", "--model-dir", model_dir, "--prompt", "a red circle", "--image", tmp_path / "in.png",
                    "--strength", "0.4", "--mask", tmp_path / "mask.png", "--steps", "5", "--seed", "3",
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert "image encoding" in result.output
    png = Image.open(out)
    assert png.size == (20, 16)  # 22 x 17 rounded down to the model's multiple, 4
    assert png.text["strength"] == "0.4" and png.text["init_image"] == "in.png"
    assert png.text["mask_image"] == "mask.png" and "Denoising strength: 0.4" in png.text["parameters"]
    same = Pipeline.from_pretrained(model_dir, device="cpu").generate(
        "a red circle", image=tmp_path / "in.png", mask_image=tmp_path / "mask.png", strength=0.4, steps=5,
        seed=3).images[0]
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(same))


@pytest.mark.parametrize("case", ["not_an_image", "missing", "mask_size", "strength_zero", "strength_big",
                                  "strength_alone", "mask_alone", "too_small", "bad_height"])
def test_cli_bad_image_inputs_are_one_error_line(tiny_model_dir, tmp_path, case):
    good = tmp_path / "in.png"
    _picture(0, 16, 16).save(good)
    (tmp_path / "text.png").write_text("not a png")
    _mask(16, 12).save(tmp_path / "mask12.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "tiny.png")
    args = {
        "not_an_image": ["--image", tmp_path / "text.png"],
        "missing": ["--image", tmp_path / "nope.png"],
        "mask_size": ["--image", good, "--mask", tmp_path / "mask12.png"],
        "strength_zero": ["--image", good, "--strength", "0"],
        "strength_big": ["--image", good, "--strength", "1.01"],
        "strength_alone": ["--strength", "0.5"],
        "mask_alone": ["--mask", good],
        "too_small": ["--image", tmp_path / "tiny.png"],
        "bad_height": ["--image", good, "--height", "18"],
    }[case]
    result = invoke("run", "--model-dir", tiny_model_dir, "--prompt", "a red circle", "--steps", "2",
                    "--out", tmp_path / "out.png", *args)
    assert result.exit_code == 1, result.output
    assert len(_error_lines(result)) == 1, result.output
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("masked", [False, True])
@torch.no_grad()
def test_class_dit_ddim_img2img_equals_diffusers_reference(tmp_path_factory, masked):
    """The DDIM family (class DiT): StableDiffusionImg2Img/InpaintPipeline's loop (int(n * strength)
    steps, DDIMScheduler.add_noise, the inpaint blend with add_noise at the next timestep), our DiT
    without CFG, diffusers' AutoencoderKL."""
    from ldm_rt.model_dir import init_model

    root = init_model(tmp_path_factory.mktemp("class") / "tiny-class", "tiny-class", seed=2)
    pipe = Pipeline.from_pretrained(root, device="cpu", dtype="fp32")
    vae = pipe.components.vae
    hf_vae = diffusers.AutoencoderKL(**{k: v for k, v in vae.config.to_dict().items() if not k.startswith("_")})
    hf_vae.load_state_dict(vae.state_dict(), strict=True)
    image, mask = _picture(8, 20, 24), _mask(20, 24)
    steps, strength, labels = 9, 0.7, [207, 3]
    got = pipe.generate(labels, image=image, strength=strength, steps=steps, guidance=1.0, seed=6,
                        mask_image=mask if masked else None, output_type="pt").images

    processor = VaeImageProcessor(vae_scale_factor=4)
    init = processor.preprocess(image, height=20, width=24).float()
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler)
    scheduler.set_timesteps(steps)
    timesteps, n = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(
        type("H", (), {"scheduler": scheduler})(), steps, strength, "cpu")
    assert n == int(steps * strength)
    generator = torch.Generator().manual_seed(6)
    x0 = retrieve_latents(hf_vae.encode(init), generator=generator) * hf_vae.config.scaling_factor
    x0 = x0.repeat(2, 1, 1, 1)
    noise = torch.randn((2, 4, 10, 12), generator=generator)
    latents = scheduler.add_noise(x0, noise, timesteps[:1].repeat(2))
    if masked:
        m = VaeImageProcessor(vae_scale_factor=4, do_normalize=False, do_binarize=True,
                              do_convert_grayscale=True).preprocess(mask, height=20, width=24)
        m = torch.nn.functional.interpolate(m, size=(10, 12)).float()
    dit = pipe.components.transformer
    for i, t in enumerate(timesteps):
        eps = dit(latents, t.expand(2).float(), class_labels=torch.tensor(labels))[:, :4]
        latents = scheduler.step(eps, t, latents).prev_sample
        if masked:
            proper = x0 if i == len(timesteps) - 1 else scheduler.add_noise(x0, noise, timesteps[i + 1:i + 2])
            latents = (1 - m) * proper + m * latents
    want = processor.postprocess(hf_vae.decode(latents / hf_vae.config.scaling_factor).sample, output_type="pt")
    assert want.std() > 0.05
    assert (got - want).abs().max().item() <= 1e-5
