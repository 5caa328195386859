"""FLUX.1 component configs and the decode path against diffusers."""

import pytest
import torch

from ldm_rt.configs import VAEConfig
from ldm_rt.families.flux import sampling
from ldm_rt.families.flux.components import FLUX_VAE, decode_latents
from ldm_rt.models.vae import AutoencoderKL
from random_weights import randomize_

diffusers = pytest.importorskip("diffusers")


def test_flux_vae_layout_matches_diffusers():
    """The full FLUX.1 VAE config, built on the meta device: diffusers' keys and shapes."""
    kwargs = {k: v for k, v in FLUX_VAE.to_dict().items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**kwargs)
        ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config)))
    assert VAEConfig.from_dict(dict(ref.config)) == FLUX_VAE
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_decode_matches_flux_pipeline():
    """FluxPipeline: unpack, / scaling_factor + shift_factor, vae.decode; on a tiny Flux-like VAE."""
    cfg = VAEConfig(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                    latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                    use_quant_conv=False, use_post_quant_conv=False)
    ref = diffusers.AutoencoderKL(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}).eval()
    randomize_(ref, 31)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    h, w = 6, 10  # latent size; pixels = 2x here (two blocks)
    tokens = torch.randn(2, h * w // 4, 64, generator=torch.Generator().manual_seed(32))
    with torch.no_grad():
        z = diffusers.FluxPipeline._unpack_latents(tokens, h * cfg.scale_factor, w * cfg.scale_factor, cfg.scale_factor)
        expected = ref.decode(z / ref.config.scaling_factor + ref.config.shift_factor, return_dict=False)[0]
        got = decode_latents(ours, tokens, h, w, cfg)
    assert got.shape == expected.shape == (2, 3, h * 2, w * 2)
    assert (got - expected).abs().max() <= 1e-5
    assert torch.equal(sampling.unpack_latents(tokens, h, w), z)
