"""The reference Flux transformer against diffusers' FluxTransformer2DModel (fp32, same weights)."""

import dataclasses

import pytest
import torch

from ldm_rt.errors import ConfigError
from ldm_rt.families.flux.transformer import FLUX_PRESETS, FluxConfig, FluxTransformer2DModel
from random_weights import randomize_

diffusers = pytest.importorskip("diffusers")

# Tiny, odd where the architecture allows: 3 heads of 24 (rope 4/10/10), text length 7.
CONFIG = FluxConfig(
    in_channels=12, num_layers=2, num_single_layers=2, attention_head_dim=24, num_attention_heads=3,
    joint_attention_dim=20, pooled_projection_dim=18, axes_dims_rope=(4, 10, 10),
)


def _image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _models(config: FluxConfig, seed: int):
    ref = diffusers.FluxTransformer2DModel(**{k: v for k, v in config.to_dict().items() if not k.startswith("_")})
    randomize_(ref, seed)
    ours = FluxTransformer2DModel(config)
    ours.load_state_dict(ref.state_dict(), strict=True)  # diffusers' names, no renaming
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("guidance", [False, True])
@pytest.mark.parametrize("hw", [(3, 5), (4, 4)])
def test_matches_diffusers(guidance, hw):
    config = dataclasses.replace(CONFIG, guidance_embeds=guidance)
    ref, ours = _models(config, seed=1 + guidance)
    g = torch.Generator().manual_seed(hw[0] * 10 + guidance)
    b, m, (h, w) = 2, 7, hw
    inputs = dict(
        hidden_states=torch.randn(b, h * w, config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(b, m, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(b, config.pooled_projection_dim, generator=g),
        timestep=torch.rand(b, generator=g),
        img_ids=_image_ids(h, w),
        txt_ids=torch.zeros(m, 3),
        guidance=(1 + 4 * torch.rand(b, generator=g)) if guidance else None,
    )
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        got = ours(**inputs)
    assert got.shape == (b, h * w, config.in_channels)
    assert torch.isfinite(got).all()
    err = (got - expected).abs().max().item()
    print(f"flux transformer max-abs {err:.2e}")
    assert err <= 1e-5, err
    assert expected.abs().max() > 0.1  # a signal that could fail


def test_every_weight_nonzero_and_names_are_diffusers():
    ref, ours = _models(dataclasses.replace(CONFIG, guidance_embeds=True), seed=3)
    assert set(ours.state_dict()) == set(ref.state_dict())
    for name, p in ours.named_parameters():
        assert (p != 0).all(), name


def test_guidance_model_needs_guidance():
    ours = FluxTransformer2DModel(dataclasses.replace(CONFIG, guidance_embeds=True))
    with pytest.raises(ValueError, match="guidance"):
        ours(torch.randn(1, 4, 12), torch.randn(1, 2, 20), torch.randn(1, 18), torch.rand(1),
             _image_ids(2, 2), torch.zeros(2, 3))


def test_config_round_trip_and_presets():
    for name, cfg in FLUX_PRESETS.items():
        assert FluxConfig.from_dict(cfg.to_dict()) == cfg
        assert FluxConfig.from_name(name) is cfg
    assert FLUX_PRESETS["flux-dev"].guidance_embeds and not FLUX_PRESETS["flux-schnell"].guidance_embeds
    with pytest.raises(ConfigError, match="axes_dims_rope"):
        FluxConfig(attention_head_dim=24, axes_dims_rope=(4, 10, 12))
    with pytest.raises(ConfigError, match="unknown"):
        FluxConfig.from_dict({"num_layers": 1, "bogus": 2})
    with pytest.raises(ConfigError, match="flux-dev"):
        FluxConfig.from_name("nope")
