"""ldm_rt.models.vae.AutoencoderKL against diffusers' AutoencoderKL (the independent oracle).

Tiny configs with every parameter randomised (no zero-init hides a bug), fresh seeded inputs,
odd latent sizes, batch 3.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from random_weights import randomize_ as _randomize_
from ldm_rt import ops
from ldm_rt.configs import SD_VAE, VAEConfig
from ldm_rt.errors import WeightsError
from ldm_rt.models.vae import AutoencoderKL, GroupNorm32
from ldm_rt.weights import load_strict

FP32_ATOL = 1e-5  # max-abs vs diffusers in fp32

TWO_BLOCKS = dict(  # factor 2
    block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, latent_channels=4,
)
THREE_BLOCKS = dict(  # factor 4
    block_out_channels=(8, 16, 24), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=8, latent_channels=4,
)
# Flux-VAE-like switches: no 1x1 convs around the latent, no mid-block attention, 16 latents.
NO_QUANT_NO_ATTN = dict(
    TWO_BLOCKS, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
    mid_block_add_attention=False,
)
CONFIGS = pytest.mark.parametrize(
    "kwargs", [TWO_BLOCKS, THREE_BLOCKS, NO_QUANT_NO_ATTN], ids=["2blocks", "3blocks", "noquant-noattn"]
)


def _pair(kwargs: dict, seed: int = 0) -> tuple[DiffusersAutoencoderKL, AutoencoderKL]:
    """A random diffusers VAE and ours built from its config and loaded from its state dict."""
    theirs = DiffusersAutoencoderKL(**kwargs).eval()
    _randomize_(theirs, seed)
    ours = AutoencoderKL(VAEConfig.from_dict(dict(theirs.config))).eval()
    load_strict(ours, theirs.state_dict(), "vae")
    return theirs, ours


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@CONFIGS
def test_state_dict_keys_and_shapes_match_diffusers(kwargs):
    theirs = DiffusersAutoencoderKL(**kwargs)
    ours = AutoencoderKL(VAEConfig.from_dict(dict(theirs.config)))
    ours_shapes = [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    theirs_shapes = [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    assert ours_shapes == theirs_shapes  # same keys, same shapes, same order


def test_sd_vae_state_dict_matches_diffusers():
    """The real SD-VAE layout (4 blocks, 32 groups, 512 wide), built on the meta device (no memory)."""
    with torch.device("meta"):
        theirs = DiffusersAutoencoderKL(**{k: v for k, v in SD_VAE.to_dict().items() if not k.startswith("_")})
        ours = AutoencoderKL(VAEConfig.from_dict(dict(theirs.config)))
    assert VAEConfig.from_dict(dict(theirs.config)) == SD_VAE
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


@CONFIGS
def test_decode_matches_diffusers(kwargs):
    theirs, ours = _pair(kwargs, seed=1)
    cfg = ours.config
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, cfg.latent_channels, 5, 7, generator=g)  # (B, Cz, h, w), odd sizes
    with torch.no_grad():
        expected = theirs.decode(z).sample
        got = ours.decode(z)
    f = cfg.scale_factor
    assert got.shape == expected.shape == (3, cfg.out_channels, 5 * f, 7 * f)
    assert _max_abs(got, expected) <= FP32_ATOL


@CONFIGS
def test_encode_matches_diffusers(kwargs):
    theirs, ours = _pair(kwargs, seed=3)
    cfg = ours.config
    f = cfg.scale_factor
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, cfg.in_channels, 5 * f, 7 * f, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    with torch.no_grad():
        posterior = theirs.encode(x).latent_dist
        mean, logvar = ours.encode(x)
    assert mean.shape == logvar.shape == (3, cfg.latent_channels, 5, 7)
    assert _max_abs(mean, posterior.mean) <= FP32_ATOL
    assert _max_abs(logvar, posterior.logvar) <= FP32_ATOL


def test_logvar_is_clamped_like_diffusers():
    theirs, ours = _pair(TWO_BLOCKS, seed=5)
    with torch.no_grad():  # push the logvar half of quant_conv's output far out of [-30, 20]
        cz = ours.config.latent_channels
        for model in (theirs, ours):
            model.quant_conv.bias[cz:] = torch.tensor([-100.0, 100.0] * (cz // 2))
    x = torch.rand(3, 3, 8, 6, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        _, logvar = ours.encode(x)
        expected = theirs.encode(x).latent_dist.logvar
    assert logvar.min().item() == -30.0 and logvar.max().item() == 20.0
    assert _max_abs(logvar, expected) <= FP32_ATOL


def test_reference_attention_backend_matches_diffusers():
    """The mid-block attention goes through the ops swap point: the einsum reference agrees too."""
    theirs, ours = _pair(THREE_BLOCKS, seed=7)
    z = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(8))
    with torch.no_grad(), ops.use(attention=ops.attention):
        got = ours.decode(z)
    with torch.no_grad():
        expected = theirs.decode(z).sample
    assert _max_abs(got, expected) <= FP32_ATOL


def test_scale_factor_follows_block_count():
    cfg = VAEConfig(**THREE_BLOCKS)
    assert cfg.scale_factor == 4  # 2 ** (3 - 1), not the SD-VAE's 8
    assert VAEConfig(**TWO_BLOCKS).scale_factor == 2
    assert SD_VAE.scale_factor == 8
    torch.manual_seed(9)
    vae = AutoencoderKL(cfg).eval()
    with torch.no_grad():
        image = vae.decode(torch.randn(2, 4, 3, 5))
        mean, logvar = vae.encode(torch.rand(2, 3, 12, 20) * 2 - 1)
    assert image.shape == (2, 3, 12, 20)
    assert mean.shape == logvar.shape == (2, 4, 3, 5)


def test_missing_key_raises_weights_error_naming_it():
    theirs, ours = _pair(TWO_BLOCKS)
    state = theirs.state_dict()
    del state["decoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(WeightsError, match=r"decoder\.mid_block\.attentions\.0\.to_q\.weight"):
        load_strict(ours, state, "vae")


def test_wrong_shape_raises_weights_error_naming_it():
    theirs, ours = _pair(TWO_BLOCKS)
    state = theirs.state_dict()
    state["encoder.conv_out.weight"] = torch.zeros(4, 32, 3, 3)  # latent_channels, not 2 * latent_channels
    with pytest.raises(WeightsError, match=r"encoder\.conv_out\.weight"):
        load_strict(ours, state, "vae")


def test_config_mismatch_raises_weights_error():
    """Weights from a VAE with mid-block attention do not load into one without it."""
    theirs, _ = _pair(TWO_BLOCKS)
    ours = AutoencoderKL(VAEConfig(**dict(TWO_BLOCKS, mid_block_add_attention=False)))
    with pytest.raises(WeightsError, match=r"unexpected keys.*mid_block\.attentions\.0"):
        load_strict(ours, theirs.state_dict(), "vae")


def test_group_norm32_computes_in_fp32(monkeypatch):
    """fp16 in, fp16 out, but the normalisation itself runs on fp32 copies of x, weight and bias.

    (PyTorch's CPU group_norm already accumulates fp16 in fp32, so an overflow cannot be shown
    here; the spy checks the contract that protects the CUDA path.)
    """
    import torch.nn.functional as F

    seen = []
    real_group_norm = F.group_norm

    def spy(x, num_groups, weight=None, bias=None, eps=1e-5):
        seen.append((x.dtype, weight.dtype, bias.dtype))
        return real_group_norm(x, num_groups, weight, bias, eps)

    norm = GroupNorm32(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(16, generator=torch.Generator().manual_seed(10)))
        norm.bias.copy_(0.1 * torch.randn(16, generator=torch.Generator().manual_seed(11)))
    x = 1000.0 * torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(12))  # (B, C, H, W)
    with torch.no_grad():
        expected = norm(x)
        monkeypatch.setattr(F, "group_norm", spy)
        got = norm.half()(x.half())
    assert seen == [(torch.float32, torch.float32, torch.float32)]
    assert got.dtype == torch.float16
    assert torch.isfinite(got).all()
    assert _max_abs(got.float(), expected) <= 1e-2  # fp16 rounding of the inputs and output only


def test_decode_bf16_keeps_dtype_and_stays_close():
    _, ours = _pair(TWO_BLOCKS, seed=13)
    z = torch.randn(3, 4, 5, 7, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        expected = ours.decode(z)
        got = ours.to(torch.bfloat16).decode(z.bfloat16())
    assert got.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    scale = expected.abs().max().item()
    assert _max_abs(got.float(), expected) <= 0.1 * scale
