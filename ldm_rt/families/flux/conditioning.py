"""FLUX.1 Fill and FLUX.1 Canny/Depth: image conditioning concatenated to the packed latents.

Both are FluxTransformer2DModels whose `in_channels` exceed their `out_channels` (64: 16 VAE
channels x 2 x 2): the extra input channels are conditioning tokens, concatenated after the
noisy latents' 64 on the channel axis of every step, as diffusers' pipelines do:

| kind | model_index `_class_name` | in_channels | the conditioning tokens (B, h/2 * w/2, C) |
| --- | --- | --- | --- |
| `fill` | FluxFillPipeline | 384 | masked-image latents (64) + the pixel mask packed (4 x 8 x 8 = 256) |
| `control` | FluxControlPipeline | 128 | control-image latents (64): a Canny edge map or a depth map |

The kind is read from the transformer's channels (`condition_kind`), so a config alone says it;
loading checks that model_index.json names the matching pipeline class.

Pixels arrive preprocessed as diffusers' `VaeImageProcessor` does (`ldm_rt.image_input.preprocess`):
images in [-1, 1], masks binarised to {0, 1} (1 = repaint), at the output size. Encoding is
`Pipeline.encode` (diffusers' `retrieve_latents` sample from the call's generator, then
`(z - shift_factor) * scaling_factor`); the result is in the family's step layout, the token
grid (B, h/2, w/2, C).
"""

from __future__ import annotations

import torch

from ldm_rt.errors import ConfigError
from ldm_rt.families.flux.sampling import pack_latents

# model_index.json `_class_name` of each kind (None: text-to-image FLUX.1, schnell or dev).
PIPELINE_CLASSES = {None: "FluxPipeline", "fill": "FluxFillPipeline", "control": "FluxControlPipeline"}
# the image roles each kind requires (`Family.condition_inputs`)
INPUTS = {None: (), "fill": ("image", "mask_image"), "control": ("control_image",)}


def condition_kind(transformer) -> str | None:
    """A FluxConfig's conditioning: None (in = out channels), "control" (in = 2 x out: the control
    image's latents), "fill" (in > 2 x out: the masked image's latents, then the packed mask)."""
    out, extra = transformer.output_channels, transformer.in_channels - transformer.output_channels
    if extra == 0:
        return None
    if extra == out:
        return "control"
    if extra > out:
        return "fill"
    raise ConfigError(f"FLUX.1 transformer in_channels {transformer.in_channels} vs out_channels {out}: neither "
                      f"text-to-image (in = out), Control (in = 2 x out) nor Fill (in = 2 x out + the packed mask).")


def condition_channels(transformer) -> int:
    """Channels the transformer takes beyond the latents' (0, 64 for Control, 320 for Fill)."""
    return transformer.in_channels - transformer.output_channels


def fill_mask_channels(vae_scale_factor: int) -> int:
    """Fill's packed-mask channels: each latent pixel's f x f pixel mask, 2 x 2 latent pixels a token."""
    return 4 * vae_scale_factor**2


def _grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2 * w/2, C) -> the step's token grid (B, h/2, w/2, C)."""
    return tokens.reshape(tokens.shape[0], height // 2, width // 2, tokens.shape[-1])


def pack_fill_mask(mask: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """mask (B, 1, H, W) in {0, 1} -> (B, h/2, w/2, 4 f^2): FluxFillPipeline.prepare_mask_latents' steps 5-6,
    each latent pixel's f x f pixel patch as f^2 channels, then packed like the latents."""
    f = vae_scale_factor
    b, _, height, width = mask.shape
    h, w = height // f, width // f
    m = mask[:, 0].reshape(b, h, f, w, f).permute(0, 2, 4, 1, 3)  # (B, f, f, h, w)
    m = m.reshape(b, f * f, h, w)  # (B, f^2, h, w)
    return _grid(pack_latents(m), h, w)


def _tile(x: torch.Tensor, batch: int) -> torch.Tensor:
    from ldm_rt.image_input import tile

    return tile(x, batch, "image")


def fill_condition(pipe, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator,
                   batch: int) -> torch.Tensor:
    """FluxFillPipeline's conditioning: image (b, 3, H, W) in [-1, 1], mask (b, 1, H, W) in {0, 1} ->
    (batch, h/2, w/2, 4C + 4 f^2) fp32 on pipe.device: the masked image `image * (1 - mask)` encoded
    (one VAE sample from `generator`, at the given batch b, then repeated to `batch`) and packed, then
    the packed mask (`pack_fill_mask`), concatenated as diffusers does."""
    f = pipe.config.vae.scale_factor
    device = pipe.device
    masked = image.to(device) * (1 - mask.to(device))
    latents = _tile(pipe.encode(masked, generator), batch)  # (batch, C, h, w)
    b, _, h, w = latents.shape
    masked_latents = _grid(pack_latents(latents), h, w)  # (batch, h/2, w/2, 4C)
    packed_mask = pack_fill_mask(_tile(mask.to(device, torch.float32), batch), f)  # (batch, h/2, w/2, 4 f^2)
    return torch.cat([masked_latents, packed_mask], dim=-1)


def control_condition(pipe, control_image: torch.Tensor, generator: torch.Generator, batch: int) -> torch.Tensor:
    """FluxControlPipeline's conditioning: control_image (b, 3, H, W) in [-1, 1] -> (batch, h/2, w/2, 4C) fp32
    on pipe.device: repeated to `batch` first (`prepare_image`: one image for every row, else each image
    for its prompt's images), then encoded (one VAE sample per row, from `generator`) and packed."""
    from ldm_rt.errors import InputError

    n = control_image.shape[0]
    if batch % n:
        raise InputError(f"{n} control images for a batch of {batch} images; give 1, or one per prompt.")
    x = control_image.repeat_interleave(batch // n, dim=0)
    latents = pipe.encode(x, generator)  # (batch, C, h, w)
    _, _, h, w = latents.shape
    return _grid(pack_latents(latents), h, w)


def untile(x: torch.Tensor) -> torch.Tensor:
    """The images a batch was tiled from (`image_input.tile`: the whole batch repeated): the shortest
    leading rows that repeat to `x`. diffusers encodes Fill's masked image at the caller's batch and
    repeats the latents, and repeats Control's images per prompt (`repeat_interleave`) before encoding;
    both need the images as given. (Identical images given on purpose are taken as one.)"""
    b = x.shape[0]
    for n in range(1, b):
        if b % n == 0 and torch.equal(x, x[:n].repeat(b // n, *([1] * (x.ndim - 1)))):
            return x[:n]
    return x


def encode_condition(pipe, images: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """`Family.encode_condition` for FLUX.1: the roles' pixels at the output size, tiled to the batch
    (image, mask_image for Fill; control_image for Control) -> the step's conditioning (B, h/2, w/2, C)."""
    kind = condition_kind(pipe.config.transformer)
    if kind == "fill":
        image, mask = images["image"], images["mask_image"]
        batch = image.shape[0]
        n = max(untile(image).shape[0], untile(mask).shape[0])  # the rows that differ
        return fill_condition(pipe, image[:n], mask[:n], generator, batch)
    if kind == "control":
        x = images["control_image"]
        return control_condition(pipe, untile(x), generator, x.shape[0])
    raise ConfigError("this FLUX.1 model takes no image conditioning (in_channels = out_channels).")
