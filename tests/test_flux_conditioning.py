"""FLUX.1 Fill and Control (issue 17): the conditioning tensors equal diffusers' own functions
(FluxFillPipeline.prepare_mask_latents, FluxControlPipeline's control-image encoding), the kind is read
from the transformer's channels, and the directories round-trip with diffusers' pipeline classes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import invoke
from ldm_rt import families
from ldm_rt.families.flux import conditioning
from ldm_rt.image_input import preprocess
from ldm_rt.model_dir import random_components, save_model_dir
from ldm_rt.pipeline import Pipeline
from test_flux_family import SCHNELL_LIKE, DEV_LIKE, diffusers_pipeline

diffusers = pytest.importorskip("diffusers")
FLUX = families.get("flux")
LATENT = 4 * DEV_LIKE.vae.latent_channels  # 64


def with_channels(config, extra):
    return dataclasses.replace(config, transformer=dataclasses.replace(
        config.transformer, in_channels=LATENT + extra, out_channels=LATENT))


FILL_LIKE = with_channels(DEV_LIKE, LATENT + 4 * DEV_LIKE.vae.scale_factor**2)  # 384
CONTROL_LIKE = with_channels(SCHNELL_LIKE, LATENT)  # 128


def as_pipeline(cls, flux_pipeline):
    """diffusers' `cls` holding a FluxPipeline's components (the ones `cls` takes)."""
    import inspect

    names = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in flux_pipeline.components.items() if k in names})


def picture(seed, height, width):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def mask_picture(seed, height, width):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")


def test_kind_from_the_transformer_channels():
    presets = FLUX.presets()
    assert conditioning.condition_kind(presets["flux-tiny"].transformer) is None
    assert conditioning.condition_kind(presets["flux-fill-tiny"].transformer) == "fill"
    assert conditioning.condition_kind(presets["flux-control-tiny"].transformer) == "control"
    assert presets["flux-fill-tiny"].transformer.in_channels == 384  # FLUX.1-Fill-dev's
    assert presets["flux-control-tiny"].transformer.in_channels == 128  # FLUX.1-Canny-dev's
    assert conditioning.condition_channels(FILL_LIKE.transformer) == 320
    assert FLUX.latent_shape(FILL_LIKE, 2, 48, 80) == (2, 16, 6, 10)  # the noise is the VAE's 16 channels


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fill")
    components = random_components(FILL_LIKE, seed=31)
    theirs = as_pipeline(diffusers.FluxFillPipeline, diffusers_pipeline(components, tmp))
    return theirs, Pipeline(components, device="cpu", dtype="fp32")


@pytest.mark.parametrize("batch", [1, 3])
def test_fill_condition_equals_prepare_mask_latents(fill, batch):
    """The masked image `image * (1 - mask)` encoded with the generator's sample, packed; the binarised
    pixel mask folded into f x f channels per latent pixel and packed; concatenated: diffusers' tensors."""
    theirs, ours = fill
    h, w, seed = 48, 80, 5
    image, mask = picture(1, h, w), mask_picture(2, h, w)
    init = theirs.image_processor.preprocess(image, height=h, width=w).float()
    m = theirs.mask_processor.preprocess(mask, height=h, width=w)
    with torch.no_grad():
        mask_t, masked = theirs.prepare_mask_latents(m, init * (1 - m), 1, 16, batch, h, w, torch.float32, "cpu",
                                                     torch.Generator("cpu").manual_seed(seed))
    expected = torch.cat([masked, mask_t], dim=-1)  # (batch, N, 320), as FluxFillPipeline.__call__
    pixels, our_mask = preprocess(image, h, w), preprocess(mask, h, w, mask=True)
    assert torch.equal(our_mask, m) and torch.allclose(pixels, init, atol=1e-6)
    got = conditioning.fill_condition(ours, pixels, our_mask, torch.Generator("cpu").manual_seed(seed), batch)
    assert got.shape == (batch, h // 16, w // 16, 320)
    assert 0 < mask_t.mean() < 1  # a real mask: both regions present
    torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=0, atol=1e-5)
    assert torch.equal(got[..., 64:].reshape(mask_t.shape), mask_t)  # the mask part bit for bit


def test_pack_fill_mask_is_a_permutation_of_the_pixels():
    """Every pixel of the mask lands in exactly one token channel (odd grid, f = 8)."""
    mask = torch.randint(0, 2, (2, 1, 48, 80), generator=torch.Generator().manual_seed(3)).float()
    packed = conditioning.pack_fill_mask(mask, 8)
    assert packed.shape == (2, 3, 5, 256)
    values = torch.arange(48 * 80, dtype=torch.float32).reshape(1, 1, 48, 80)
    assert torch.equal(conditioning.pack_fill_mask(values, 8).flatten().sort().values, values.flatten())


@pytest.mark.parametrize("prompts,num_images", [(1, 1), (2, 2)])
def test_control_condition_equals_flux_control_encoding(tmp_path, prompts, num_images):
    """prepare_image (repeated to the batch first), one VAE sample per row from the generator, shift and
    scale, _pack_latents: FluxControlPipeline.__call__'s control-image steps."""
    components = random_components(CONTROL_LIKE, seed=32)
    theirs = as_pipeline(diffusers.FluxControlPipeline, diffusers_pipeline(components, tmp_path))
    ours = Pipeline(components, device="cpu", dtype="fp32")
    h, w, seed, batch = 32, 48, 7, prompts * num_images
    image = picture(4, 40, 50)  # resized by both
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        x = theirs.prepare_image(image, w, h, batch, num_images, "cpu", torch.float32)
        z = theirs.vae.encode(x).latent_dist.sample(generator=generator)
        z = (z - theirs.vae.config.shift_factor) * theirs.vae.config.scaling_factor
        expected = theirs._pack_latents(z, batch, 16, *z.shape[2:])
    got = conditioning.control_condition(ours, preprocess(image, h, w), torch.Generator("cpu").manual_seed(seed),
                                         batch)
    assert got.shape == (batch, h // 16, w // 16, 64)
    torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=0, atol=1e-5)
    if batch > 1:
        assert not torch.equal(got[0], got[1])  # one sample per row, as diffusers


@pytest.mark.parametrize("preset,cls", [("flux-fill-tiny", "FluxFillPipeline"),
                                        ("flux-control-tiny", "FluxControlPipeline")])
def test_init_model_writes_the_pipeline_class_diffusers_loads(preset, cls, tmp_path):
    root = tmp_path / preset
    result = invoke("init-model", root, "--preset", preset)
    assert result.exit_code == 0, result.output
    assert json.loads((root / "model_index.json").read_text())["_class_name"] == cls
    theirs = diffusers.DiffusionPipeline.from_pretrained(root)
    assert type(theirs).__name__ == cls
    ours = Pipeline.from_pretrained(root, device="cpu")
    assert ours.family.name == "flux"
    assert (ours.defaults["steps"], ours.defaults["guidance"]) == {"flux-fill-tiny": (50, 30.0),
                                                                   "flux-control-tiny": (28, 3.5)}[preset]


def test_index_class_that_does_not_fit_the_transformer_is_one_error_line(tmp_path):
    root = save_model_dir(random_components(FILL_LIKE, seed=33), tmp_path / "fill")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps(dict(index, _class_name="FluxPipeline")))
    result = invoke("run", "--model-dir", root, "--prompt", "a fox", "--steps", 1, "--height", 16, "--width", 16,
                    "--out", tmp_path / "x.png")
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "FluxFillPipeline" in lines[0], lines[0]


def test_family_encode_condition_takes_the_tiled_batch(fill, tmp_path):
    """The generic hook hands the roles tiled to the batch (`image_input.tile`); the family encodes the
    images as given, as diffusers: Fill's masked image once, then repeated; Control's images repeated per
    prompt (two images for two prompts x two images: rows img0, img0, img1, img1) before encoding."""
    from ldm_rt.image_input import tile

    theirs, ours = fill
    h, w = 32, 48
    image, mask = preprocess(picture(5, h, w), h, w), preprocess(mask_picture(6, h, w), h, w, mask=True)
    tiled = {"image": tile(image, 4, "image"), "mask_image": tile(mask, 4, "mask_image")}
    got = FLUX.encode_condition(ours, tiled, torch.Generator("cpu").manual_seed(9))
    want = conditioning.fill_condition(ours, image, mask, torch.Generator("cpu").manual_seed(9), 4)
    assert torch.equal(got, want) and torch.equal(got[0], got[3])
    assert FLUX.condition_inputs(ours.config) == ("image", "mask_image")
    assert FLUX.condition_channels(ours.config) == 320

    components = random_components(CONTROL_LIKE, seed=34)
    theirs = as_pipeline(diffusers.FluxControlPipeline, diffusers_pipeline(components, tmp_path))
    ours = Pipeline(components, device="cpu", dtype="fp32")
    two = torch.cat([preprocess(picture(7, h, w), h, w), preprocess(picture(8, h, w), h, w)])
    got = FLUX.encode_condition(ours, {"control_image": tile(two, 4, "control_image")},
                                torch.Generator("cpu").manual_seed(9))
    with torch.no_grad():
        x = theirs.prepare_image(two, w, h, 4, 2, "cpu", torch.float32)
        z = theirs.vae.encode(x).latent_dist.sample(generator=torch.Generator("cpu").manual_seed(9))
        z = (z - theirs.vae.config.shift_factor) * theirs.vae.config.scaling_factor
        expected = theirs._pack_latents(z, 4, 16, *z.shape[2:])
    torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=0, atol=1e-5)
    assert FLUX.condition_inputs(ours.config) == ("control_image",)
    assert conditioning.untile(tile(two, 4, "x")).shape[0] == 2
