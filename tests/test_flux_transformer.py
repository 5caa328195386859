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


@pytest.mark.parametrize("name", ["flux-schnell", "flux-dev"])
def test_full_size_presets_match_diffusers_layout(name):
    """The 12B presets, built on the meta device (no memory): diffusers' keys and shapes."""
    cfg = FLUX_PRESETS[name]
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
        ours = FluxTransformer2DModel(cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    n = sum(p.numel() for p in ours.parameters())
    assert 11.8e9 < n < 12.0e9, n  # FLUX.1 is the "12B" transformer


def _inputs(config, b=2, m=6, h=3, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(b, h * w, config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(b, m, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(b, config.pooled_projection_dim, generator=g),
        timestep=torch.rand(b, generator=g), img_ids=_image_ids(h, w), txt_ids=torch.zeros(m, 3),
        guidance=torch.full((b,), 3.5) if config.guidance_embeds else None,
    )


def test_attention_routes_through_ops_swap_point():
    """Swapping ops' attention for the plain einsum reference changes nothing beyond 1e-5, and a
    broken attention is seen (the model really calls the swap point)."""
    from ldm_rt import ops

    _, ours = _models(CONFIG, seed=4)
    x = _inputs(CONFIG, seed=5)
    with torch.no_grad():
        base = ours(**x)
        with ops.use(attention=ops.attention):
            ref = ours(**x)
        with ops.use(attention=lambda q, k, v, **kw: ops.attention(q, k, v, **kw) * 1.01):
            broken = ours(**x)
    assert (base - ref).abs().max() <= 1e-5
    assert (base - broken).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_finite_and_matches_diffusers(dtype):
    """In bf16/fp16 against diffusers in the same dtype (not fp32: both round timestep * 1000 in
    the model dtype, as diffusers does, which moves the sinusoids far from the fp32 ones)."""
    ref, ours = _models(dataclasses.replace(CONFIG, guidance_embeds=True), seed=6)
    x = {k: v.to(dtype) if v is not None and k not in ("img_ids", "txt_ids") else v
         for k, v in _inputs(ours.config, seed=7).items()}
    with torch.no_grad():
        expected = ref.to(dtype)(**x, return_dict=False)[0].float()
        got = ours.to(dtype)(**x)
    assert got.dtype == dtype and torch.isfinite(got).all()
    rel = ((got.float() - expected).norm() / expected.norm()).item()
    print(f"flux transformer {dtype} rel-L2 vs diffusers {dtype} {rel:.2e}")
    assert rel < 2e-2
