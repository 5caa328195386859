"""AutoencoderKL: the KL-regularised VAE of Latent Diffusion (Rombach et al., 2022).

A readable reference for diffusers' `AutoencoderKL`. Every module and parameter is named as in
diffusers (`encoder.down_blocks.0.resnets.1.norm1.weight`, `decoder.mid_block.attentions.0.to_q`,
...) and registered in the same order, so a diffusers `vae/diffusion_pytorch_model.safetensors`
loads with `load_strict` as it is, with no renaming.

    encode: image (B, 3, H, W) -> Encoder -> quant_conv -> (mean, logvar), each (B, Cz, H/f, W/f)
    decode: latent (B, Cz, h, w) -> post_quant_conv -> Decoder -> image (B, 3, h*f, w*f)

with f = `VAEConfig.scale_factor` = 2 ** (number of blocks - 1). `decode` takes the raw latent:
undoing `scaling_factor` / `shift_factor` is the pipeline's job.

Precision: every GroupNorm computes its statistics in fp32 whatever the input dtype
(`GroupNorm32`); the mid-block attention goes through `ops.impl("attention")`, whose softmax is
fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_rt import ops
from ldm_rt.configs import VAEConfig

# diffusers builds every VAE GroupNorm (resnets, attention, conv_norm_out) with this eps.
_EPS = 1e-6


class GroupNorm32(nn.GroupNorm):
    """nn.GroupNorm that computes in fp32 and casts the result back to the input dtype.

    fp16 GroupNorm statistics overflow on SD-VAE activations (the decoder's late blocks reach
    values whose squares exceed fp16's 65504), so the mean/variance and the affine step are
    always computed in fp32. Parameter names (`weight`, `bias`) are nn.GroupNorm's.
    """

    def forward(self, x: Tensor) -> Tensor:
        y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block without a timestep input (diffusers' `ResnetBlock2D`, temb=None).

    out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))
    The 1x1 `conv_shortcut` exists only when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = GroupNorm32(groups, out_channels, eps=_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W pixels, with a residual (the VAE mid-block's).

    diffusers' `Attention(..., heads=1, dim_head=C, residual_connection=True)`; `to_out` is a
    ModuleList so the output projection's key is `to_out.0` (diffusers keeps a Dropout at
    `to_out.1`, which has no parameters and is a no-op at inference).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm32(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        # One head: (B, 1, N, C); scale 1/sqrt(C), the ops default for head dim C.
        q = self.to_q(h)[:, None]
        k = self.to_k(h)[:, None]
        v = self.to_v(h)[:, None]
        h = ops.impl("attention")(q, k, v)[:, 0]  # (B, N, C)
        h = self.to_out[0](h)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # a view with channels-last strides
        # `h + x`, not `x + h`: the sum takes the first operand's (channels-last) memory layout,
        # as diffusers' `hidden_states + residual` does, and the later GroupNorms and convs then
        # round exactly as diffusers' do. With `x + h` the decoder output drifts from diffusers
        # by up to 7e-6 (fp32, tiny random VAEs in tests/test_vae.py); this way it is bit-equal on CPU.
        return h + x


class Downsample2D(nn.Module):
    """Halve H and W: zero-pad one row at the bottom and one column at the right, then a 3x3
    stride-2 conv with no padding (diffusers' `Downsample2D(padding=0)`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H // 2, W // 2)


class Upsample2D(nn.Module):
    """Double H and W: nearest-neighbour 2x, then a 3x3 conv (diffusers' `Upsample2D(use_conv=True)`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then a 2x downsample unless it is the last block."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets, then a 2x upsample unless it is the last block."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet -> attention (optional: `mid_block_add_attention`) -> resnet, at constant width."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        # Registered before `resnets`, as diffusers does, so state_dict keys come in its order.
        self.attentions = nn.ModuleList([Attention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """image (B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f): mean and logvar stacked."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                add_downsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        )
        self.mid_block = UNetMidBlock2D(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm32(groups, channels[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)  # (B, C_last, H/f, W/f) after the last block
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2 * Cz, H/f, W/f)


class Decoder(nn.Module):
    """latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f).

    The block widths run in reverse, and each up block has `layers_per_block + 1` resnets.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1)
        # Registered before `mid_block` (though run after it), as diffusers does, so
        # state_dict keys come in its order.
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(
                channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups,
                add_upsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        )
        self.mid_block = UNetMidBlock2D(channels[0], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm32(groups, channels[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)  # (B, C_last, h, w)
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h)  # (B, C0, h*f, w*f) after the last block
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, h*f, w*f)


class AutoencoderKL(nn.Module):
    """Encoder + decoder with the 1x1 `quant_conv` / `post_quant_conv` around the latent.

    Either 1x1 conv is absent when the config says so (`use_quant_conv`, `use_post_quant_conv`:
    e.g. the Flux VAE has neither).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        cz = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * cz, 2 * cz, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(cz, cz, kernel_size=1) if config.use_post_quant_conv else None

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """image (B, in_channels, H, W) in [-1, 1] -> (mean, logvar), each (B, Cz, H/f, W/f).

        logvar is clamped to [-30, 20], as diffusers' `DiagonalGaussianDistribution`.
        """
        moments = self.encoder(x)  # (B, 2 * Cz, H/f, W/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """raw latent (B, Cz, h, w) -> image (B, out_channels, h*f, w*f), roughly in [-1, 1].

        `z` is the VAE's own latent: the pipeline undoes `scaling_factor`/`shift_factor` first.
        """
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
