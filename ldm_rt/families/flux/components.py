"""The FLUX.1 components' configs and FluxPipeline's defaults, in one place for the Flux family.

Values are those of black-forest-labs/FLUX.1-schnell and FLUX.1-dev (their config.json files,
and diffusers' FluxPipeline defaults); the transformer presets live in `transformer.py`.
"""

from __future__ import annotations

import torch

from ldm_rt.configs import CLIP_L, VAEConfig
from ldm_rt.models.t5 import T5_PRESETS

# vae/config.json: SD-VAE-shaped, 16 latent channels, no 1x1 convs around the latent.
FLUX_VAE = VAEConfig(
    latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)
FLUX_CLIP = CLIP_L  # text_encoder: CLIP-L, only its pooled output is used
FLUX_T5 = T5_PRESETS["t5-v1_1-xxl"]  # text_encoder_2

# FluxPipeline defaults per model (steps, embedded guidance, T5 max_sequence_length, size).
DEFAULTS = {
    "flux-schnell": dict(steps=4, guidance=None, max_sequence_length=256, height=1024, width=1024),
    "flux-dev": dict(steps=28, guidance=3.5, max_sequence_length=512, height=1024, width=1024),
}


def decode_latents(vae, tokens: torch.Tensor, latent_height: int, latent_width: int, config: VAEConfig) -> torch.Tensor:
    """FluxPipeline's decode: unpack (B, N, 64) tokens, undo scaling/shift, VAE decode -> (B, 3, H, W).

    `vae` is ldm-rt's AutoencoderKL (anything with `decode(z) -> image`).
    """
    from ldm_rt.families.flux.sampling import unpack_latents

    z = unpack_latents(tokens, latent_height, latent_width)  # (B, 16, h, w)
    z = z / config.scaling_factor + (config.shift_factor or 0.0)
    return vae.decode(z)
