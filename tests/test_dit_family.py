"""The DiT family options (issue 8): our DiT against diffusers' DiTTransformer2DModel and against a
copy of facebookresearch/DiT's module definitions, through the key maps; class-name lookup."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm_rt.configs import DiTConfig
from ldm_rt.dit_checkpoints import (
    config_from_diffusers,
    config_from_original,
    from_diffusers,
    from_original,
    to_diffusers,
    to_original,
)
from ldm_rt.errors import ConfigError, InputError, WeightsError
from ldm_rt.model_dir import randomize_
from ldm_rt.models.dit import DiT, sincos_pos_embed

diffusers = pytest.importorskip("diffusers")

# A DiT-XL/2-shaped model scaled down: head_dim 18 (not a power of two), 2 blocks, learned sigma.
HF_KWARGS = dict(num_attention_heads=4, attention_head_dim=18, in_channels=4, out_channels=8, num_layers=2,
                 sample_size=8, patch_size=2, num_embeds_ada_norm=1000)


@torch.no_grad()
def _random_diffusers_dit(seed: int = 0):
    """A diffusers DiTTransformer2DModel with every weight random and non-zero, the per-block
    timestep/label embedders tied to block 0's as in the published weights."""
    hf = diffusers.DiTTransformer2DModel(**HF_KWARGS).eval()
    randomize_(hf, torch.Generator().manual_seed(seed))
    first = hf.transformer_blocks[0].norm1.emb
    for block in hf.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first.state_dict())
    assert all((p != 0).any() for p in hf.parameters())
    return hf


def _inputs(batch: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.tensor([999.0, 421.0, 3.0])[:batch]
    labels = torch.tensor([207, 1000, 0])[:batch]  # 1000: the null class
    return x, t, labels


@pytest.mark.parametrize("size", [8, 12])  # the training grid, and another one (positions interpolated)
def test_converted_from_diffusers_equals_diffusers(size):
    hf = _random_diffusers_dit()
    config = config_from_diffusers(dict(hf.config))
    assert (config.timestep_freq_shift, config.mlp_eps, config.norm_eps) == (1, 1e-5, 1e-6)
    ours = DiT(config).eval()
    ours.load_state_dict(from_diffusers(hf.state_dict(), config), strict=True)
    x, t, labels = _inputs(3, size, seed=size)
    with torch.no_grad():
        ref = hf(x, timestep=t, class_labels=labels).sample
        out = ours(x, t, class_labels=labels)
    assert out.shape == ref.shape == (3, 8, size, size)
    assert ref.abs().max() > 0.1
    assert (out - ref).abs().max().item() <= 1e-5


def test_diffusers_key_map_round_trips():
    hf = _random_diffusers_dit(seed=1)
    config = config_from_diffusers(dict(hf.config))
    state = hf.state_dict()
    back = to_diffusers(from_diffusers(state, config), config)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_untied_per_block_embedders_are_refused():
    hf = _random_diffusers_dit()
    config = config_from_diffusers(dict(hf.config))
    state = dict(hf.state_dict())
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
    state[key] = state[key] + 1e-3
    with pytest.raises(WeightsError, match="block 1's .*linear_2.bias differs from block 0's"):
        from_diffusers(state, config)


def test_diffusers_state_dict_with_a_missing_key_is_refused():
    hf = _random_diffusers_dit()
    config = config_from_diffusers(dict(hf.config))
    state = dict(hf.state_dict())
    del state["proj_out_2.bias"]
    with pytest.raises(WeightsError, match=r"missing keys \[proj_out_2.bias\]"):
        from_diffusers(state, config)


@pytest.mark.parametrize("change", [{"norm_type": "ada_norm_single"}, {"activation_fn": "geglu"},
                                    {"norm_elementwise_affine": True}, {"some_new_key": 1}])
def test_diffusers_configs_we_do_not_compute_are_refused(change):
    hf = _random_diffusers_dit()
    with pytest.raises(ConfigError):
        config_from_diffusers({**dict(hf.config), **change})


def test_sincos_pos_embed_matches_diffusers_at_two_resolutions():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for (h, w), base in (((16, 16), 16), ((32, 32), 16), ((12, 20), 8)):
        ref = get_2d_sincos_pos_embed(72 * 4, (h, w), base_size=base, output_type="pt").float()
        ours = sincos_pos_embed(h, w, 72 * 4, base)
        assert torch.equal(ours, ref), (h, w)


def test_timestep_embedding_shift_matches_diffusers_bit_for_bit():
    from diffusers.models.embeddings import get_timestep_embedding

    from ldm_rt.models.dit import timestep_embedding

    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    assert torch.equal(timestep_embedding(t, 256, freq_shift=1), ref)
    assert not torch.equal(timestep_embedding(t, 256, freq_shift=0), ref)


# ------------------------------------------------------------------ facebookresearch/DiT, copied
# The original module definitions (models.py at facebookresearch/DiT), with timm's PatchEmbed,
# Attention and Mlp written out as DiT uses them (qkv_bias=True, GELU-tanh, no norms/dropout).


def _orig_1d(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _orig_2d_sincos(embed_dim, grid_size):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([_orig_1d(embed_dim // 2, grid[0]), _orig_1d(embed_dim // 2, grid[1])], axis=1)


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _PatchEmbed(nn.Module):
    def __init__(self, p, c, d):
        super().__init__()
        self.proj = nn.Conv2d(c, d, p, p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _TimestepEmbedder(nn.Module):
    def __init__(self, d, f=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(f, d), nn.SiLU(), nn.Linear(d, d))
        self.f = f

    def forward(self, t):
        half = self.f // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class _LabelEmbedder(nn.Module):
    def __init__(self, num_classes, d):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, d)

    def forward(self, y):
        return self.embedding_table(y)


class _Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(d, heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = _Mlp(d, 4 * d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class _FinalLayer(nn.Module):
    def __init__(self, d, p, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, p * p * out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class _OriginalDiT(nn.Module):
    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=96, depth=2, num_heads=4,
                 num_classes=1000):
        super().__init__()
        self.out_channels, self.p = in_channels * 2, patch_size
        self.x_embedder = _PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = _TimestepEmbedder(hidden_size)
        self.y_embedder = _LabelEmbedder(num_classes, hidden_size)
        n = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.from_numpy(_orig_2d_sincos(hidden_size, n)).float().unsqueeze(0),
                                      requires_grad=False)
        self.blocks = nn.ModuleList([_Block(hidden_size, num_heads) for _ in range(depth)])
        self.final_layer = _FinalLayer(hidden_size, patch_size, self.out_channels)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        c_, p = self.out_channels, self.p
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c_))
        return x.reshape(x.shape[0], c_, h * p, h * p)

    def forward_with_cfg(self, x, t, y, cfg_scale):  # sample.py's guidance: the first 3 channels
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


@torch.no_grad()
def _random_original(seed=0):
    model = _OriginalDiT().eval()
    generator = torch.Generator().manual_seed(seed)
    pos = model.pos_embed.detach().clone()
    randomize_(model, generator)
    model.pos_embed.copy_(pos)  # a frozen buffer in DiT: the sin-cos table, not a weight
    return model


def test_converted_from_original_layout_equals_the_original_module():
    original = _random_original()
    state = original.state_dict()
    config = config_from_original(state, num_heads=4)
    assert config == DiTConfig(sample_size=8, hidden_size=96, depth=2, num_heads=4, out_channels=8, num_classes=1000,
                               cross_attention=False, pos_embed="sincos")
    ours = DiT(config).eval()
    ours.load_state_dict(from_original(state, config), strict=True)
    x, t, labels = _inputs(3, 8, seed=5)
    with torch.no_grad():
        ref = original(x, t, labels)
        out = ours(x, t, class_labels=labels)
    assert ref.abs().max() > 0.1
    assert (out - ref).abs().max().item() <= 1e-5
    back = to_original(from_original(state, config), config)
    assert set(back) == set(state) and torch.equal(back["pos_embed"], state["pos_embed"])


def test_original_layout_inverse_map_gives_the_same_model():
    """An original-layout state dict built by the inverse key map loads back to the same weights."""
    config = config_from_original(_random_original().state_dict(), num_heads=4)
    ours = DiT(config)
    randomize_(ours, torch.Generator().manual_seed(3))
    back = from_original(to_original(ours.state_dict(), config), config)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_original_pos_embed_that_is_not_sincos_is_refused():
    state = dict(_random_original().state_dict())
    state["pos_embed"] = state["pos_embed"] + 0.01
    with pytest.raises(WeightsError, match="not DiT's fixed 2D sin-cos table"):
        from_original(state, config_from_original(state, num_heads=4))


def test_original_sample_py_guidance_on_three_channels():
    """Pipeline.denoise_class with guidance_channels=3 takes the same DDIM step as DiT's
    forward_with_cfg (eps guided on channels 0-2, channel 3 the conditional prediction)."""
    from ldm_rt.configs import PRESETS, ModelConfig
    from ldm_rt.model_dir import Components
    from ldm_rt.models.vae import AutoencoderKL
    from ldm_rt.pipeline import Pipeline
    from ldm_rt.schedulers import scheduler_from_config

    original = _random_original(seed=4)
    config = config_from_original(original.state_dict(), num_heads=4)
    ours = DiT(config).eval()
    ours.load_state_dict(from_original(original.state_dict(), config))
    preset: ModelConfig = PRESETS["tiny-class"]
    pipe = Pipeline(Components(None, None, ours, AutoencoderKL(preset.vae).eval(), dict(preset.scheduler)),
                    device="cpu", dtype="fp32")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([207, 3])
    with torch.no_grad():
        got = pipe.denoise_class(x, labels, steps=1, guidance=4.0, guidance_channels=3)
        scheduler = scheduler_from_config(preset.scheduler, 1)
        t = scheduler.timesteps[0].expand(4)
        out = original.forward_with_cfg(torch.cat([x, x]), t, torch.cat([labels, torch.full_like(labels, 1000)]), 4.0)
        want = scheduler.step(x, out[:2, :4], 0)
        full = pipe.denoise_class(x, labels, steps=1, guidance=4.0)  # all channels: differs in channel 3
    assert (got - want).abs().max().item() <= 1e-5
    assert (full[:, :3] - got[:, :3]).abs().max().item() <= 1e-6
    assert (full[:, 3] - got[:, 3]).abs().max().item() > 1e-4  # 6e-4 here; float noise is ~1e-7


# ------------------------------------------------------------------ ImageNet class names


def test_imagenet_class_names():
    from ldm_rt.imagenet import class_index, class_name, class_names

    assert len(class_names()) == 1000
    assert (class_name(0), class_name(207), class_name(999)) == ("tench", "golden retriever", "toilet tissue")
    assert class_index("207") == class_index(207) == class_index("golden retriever") == 207
    assert class_index("  Golden Retriever ") == 207 and class_index("Tinca tinca") == 0
    assert class_index("toilet paper") == 999 and class_index("white shark") == 2
    with pytest.raises(InputError, match=r"unknown ImageNet class 'golden retreiver'; closest: 'golden retriever \(207\)'"):
        class_index("golden retreiver")
    with pytest.raises(InputError, match="class index 1000 is out of range; this model has classes 0..999"):
        class_index("1000")
    with pytest.raises(InputError, match="index 0..9"):
        class_index("tench", num_classes=10)
