"""DiT denoiser: patchify -> N adaLN-Zero blocks (2D-RoPE self-attention, cross-attention to
text, MLP) -> final adaLN + linear -> unpatchify.

The same modules carry the DiT family options of `DiTConfig` (class labels instead of text, fixed
2D sin-cos positions instead of RoPE, no cross-attention, learned sigma, the original/diffusers
conventions), so facebookresearch/DiT and diffusers `DiTTransformer2DModel` checkpoints load onto
them through the key maps in `ldm_rt/dit_checkpoints.py`.

Names follow the DiT paper and facebookresearch/DiT `models.py` (`TimestepEmbedder`,
`DiTBlock`, `FinalLayer`, `x_embedder`, `adaLN_modulation`). Attention, RoPE and the
modulated LayerNorm are called through `ldm_rt.ops` so backends can swap kernels in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ldm_rt import ops
from ldm_rt.configs import DiTConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) as [cos | sin], DiT's convention.

    Frequencies exp(-ln(max_period) * i / (half - freq_shift)): freq_shift 0 is the original DiT
    (GLIDE) embedding, 1 is diffusers' `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=1)`
    used by `DiTTransformer2DModel` (the same ops in the same order, so both match bit for bit).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    )
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> vector: sinusoidal frequencies then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)  # (B, F) fp32
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class PooledTextEmbedder(nn.Module):
    """Pooled text vector (B, P) -> (B, D), added to the timestep embedding."""

    def __init__(self, pooled_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(pooled_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled)


class LabelEmbedder(nn.Module):
    """Class label (B,) int64 -> (B, D): a table of num_classes + 1 rows, row num_classes being the
    null class that classifier-free guidance uses (DiT's LabelEmbedder; no label dropout here)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


def sincos_pos_embed(
    height: int, width: int, dim: int, base_size: int, interpolation_scale: float = 1.0, device=None
) -> torch.Tensor:
    """Fixed 2D sin-cos position table (height*width, dim) fp32, row-major tokens.

    The first dim/2 channels encode the column (x), the rest the row (y), each as [sin | cos] of
    pos * 10000 ** (-2i / (dim/2)) computed in fp64: facebookresearch/DiT `get_2d_sincos_pos_embed`
    (MAE) and diffusers' `get_2d_sincos_pos_embed`, op for op. Positions follow diffusers'
    PatchEmbed: arange(n) / (n / base_size) / interpolation_scale, which is arange(n) itself on the
    training grid (n = base_size = sample_size / patch_size), the only grid the original supports.
    """
    def axis(n: int) -> torch.Tensor:  # (n,) fp32 positions, as diffusers computes them
        return torch.arange(n, device=device, dtype=torch.float32) / (n / base_size) / interpolation_scale

    rows = axis(height)[:, None].expand(height, width).reshape(-1)  # (N,) y of each token
    cols = axis(width)[None, :].expand(height, width).reshape(-1)  # (N,) x of each token
    omega = torch.arange(dim // 4, device=device, dtype=torch.float64)
    omega = 1.0 / 10000 ** (omega / (dim / 4.0))  # (dim/4,)
    out = []
    for pos in (cols, rows):  # x first: DiT's meshgrid(grid_w, grid_h) puts w in grid[0]
        angle = pos.double()[:, None] * omega[None, :]  # (N, dim/4)
        out += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(out, dim=-1).float()  # (N, dim)


class PatchEmbed(nn.Module):
    """(B, C, H, W) latents -> (B, N, D) tokens with a p x p, stride-p convolution (row-major tokens)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


@dataclass
class ModulationOut:
    shift: torch.Tensor  # (B, D)
    scale: torch.Tensor  # (B, D)
    gate: torch.Tensor  # (B, D)


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused qkv, optional RMS qk-norm, and 2D RoPE on q and k."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        head_dim = hidden_size // num_heads
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        """cos/sin: RoPE tables, or None (no rotation: sin-cos position models)."""
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = ops.impl("attention")(q, k, v, cos=cos, sin=sin)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, N, D)


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to text tokens (keys/values); padded text keys are masked."""

    def __init__(self, hidden_size: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(context_dim, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, N, Dh)
        kv = self.kv(context).unflatten(-1, (2, self.num_heads, -1))  # (B, M, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, H, M, Dh)
        out = ops.impl("attention")(q, k, v, key_padding_mask=mask)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, N, D)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.impl("rms_norm")(x, self.weight, self.eps)


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: modulated self-attention, cross-attention, modulated MLP.

    x = x + gate_msa * attn(modulate(LN(x), shift_msa, scale_msa))
    x = x + cross_attn(LN_affine(x), text)          (only with config.cross_attention)
    x = x + gate_mlp * mlp(modulate(LN(x), shift_mlp, scale_mlp))
    The six modulation vectors come from Linear(SiLU(c)), zero-initialised in training so
    every block starts as the identity. The MLP's LayerNorm uses `config.mlp_eps` (diffusers'
    DiT has 1e-5 there, the original 1e-6).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.hidden_size
        self.eps = config.norm_eps
        self.mlp_eps = config.mlp_eps
        self.attn = SelfAttention(d, config.num_heads, config.qk_norm, config.norm_eps)
        if config.cross_attention:
            self.norm2 = nn.LayerNorm(d, eps=config.norm_eps)  # cross-attention: plain affine LN, no gate
            self.cross_attn = CrossAttention(d, config.context_dim, config.num_heads)
        else:
            self.norm2 = self.cross_attn = None
        self.mlp = Mlp(d, int(d * config.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def modulation(self, c: torch.Tensor) -> tuple[ModulationOut, ModulationOut]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        return ModulationOut(shift_msa, scale_msa, gate_msa), ModulationOut(shift_mlp, scale_mlp, gate_mlp)

    def forward(self, x, c, context, context_mask, cos, sin) -> torch.Tensor:
        msa, mlp = self.modulation(c)
        y = self.attn(ops.impl("layernorm_modulate")(x, msa.shift, msa.scale, self.eps), cos, sin)
        gate = msa.gate
        if self.cross_attn is not None:
            x = x + gate[:, None] * y
            y = self.cross_attn(ops.layer_norm(x, self.norm2.eps, self.norm2.weight, self.norm2.bias), context, context_mask)
            gate = None  # the cross-attention residual has no gate
        # x + gate * y, then the MLP's adaLN of that sum: one swap point, so a backend fuses the two
        x, x_mod = ops.impl("gated_residual_layernorm_modulate")(x, y, gate, mlp.shift, mlp.scale, self.mlp_eps)
        return x + mlp.gate[:, None] * self.mlp(x_mod)


class FinalLayer(nn.Module):
    """Final adaLN (shift, scale) + linear decode of each token to a p x p x C patch."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.eps = config.norm_eps
        self.linear = nn.Linear(d, p * p * config.output_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(ops.impl("layernorm_modulate")(x, shift, scale, self.eps))  # (B, N, p*p*C)


class DiT(nn.Module):
    """DiT. Text-conditioned: forward(latents, timestep, text_states, text_mask, pooled);
    class-conditional (config.num_classes): forward(latents, timestep, class_labels=labels).

    latents (B, C, H, W), timestep (B,) float (the scheduler's `timesteps` value),
    text_states (B, M, context_dim), text_mask (B, M) bool (True = real token) or None,
    pooled (B, pooled_dim); class_labels (B,) int64 in 0..num_classes (num_classes = null class).
    Returns (B, out_channels, H, W). H and W must be multiples of `patch_size`; RoPE and sin-cos
    tables are computed from H and W, so any resolution works.
    With config.condition_channels > 0, `condition` (B, condition_channels, H, W) is concatenated
    to the latents on the channel axis before patchify (channel-concatenation conditioning: the
    seeds' super-resolution, FLUX.1 Fill/Control's `in_channels`).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels + config.condition_channels, d)
        self.t_embedder = TimestepEmbedder(d, config.frequency_embedding_size, config.timestep_freq_shift)
        if config.class_conditional:
            self.y_embedder = LabelEmbedder(config.num_classes, d)
        else:
            self.pooled_embedder = PooledTextEmbedder(config.pooled_dim, d)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The training init of DiT's `models.py`: xavier linears, and adaLN-Zero.

        The adaLN modulation and the final layer start at zero, and so does the
        cross-attention output projection (as PixArt does), so every block starts as the
        identity and the model predicts zero. The label table is N(0, 0.02), as DiT's.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        mlps = [self.t_embedder.mlp] + ([] if self.config.class_conditional else [self.pooled_embedder.mlp])
        for mlp in mlps:
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        if self.config.class_conditional:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for block in self.blocks:
            zeroed_layers = [block.adaLN_modulation[-1]] + ([block.cross_attn.proj] if block.cross_attn else [])
            for zeroed in zeroed_layers:
                nn.init.zeros_(zeroed.weight)
                nn.init.zeros_(zeroed.bias)
        for zeroed in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(zeroed.weight)
            nn.init.zeros_(zeroed.bias)

    def rope(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables (h*w, head_dim/2) for an h x w token grid."""
        return ops.rope_freqs(h, w, self.config.axes_dim, self.config.rope_theta, device=device)

    def pos_embed(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Sin-cos table (h*w, D) fp32 for an h x w token grid (pos_embed "sincos" / "rope+sincos")."""
        c = self.config
        return sincos_pos_embed(h, w, c.hidden_size, c.sample_size // c.patch_size,
                                c.pos_embed_interpolation_scale, device=device)

    def patchify_shape(self, height: int, width: int) -> tuple[int, int]:
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch size {p}")
        return height // p, width // p

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h*p, w*p) -> (B, h*w, p*p*C): the exact inverse of `unpatchify`."""
        p = self.config.patch_size
        h, w = self.patchify_shape(x.shape[-2], x.shape[-1])
        x = x.reshape(x.shape[0], x.shape[1], h, p, w, p)
        # A permute, not einsum("nchpwq->nhwpqc"): the same op, but ONNX Einsum has no bf16 type,
        # so a bf16 export would not be a valid graph (onnx.checker full_check, ONNX Einsum-12).
        x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
        return x.reshape(x.shape[0], h * w, p * p * x.shape[-1])

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
        p, c = self.config.patch_size, self.config.output_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p); "nhwpqc->nchpwq"
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h, w = self.patchify_shape(latents.shape[-2], latents.shape[-1])
        extra = self.config.condition_channels
        if extra:
            if condition is None or condition.shape[1] != extra or condition.shape[-2:] != latents.shape[-2:]:
                got = None if condition is None else tuple(condition.shape)
                raise ValueError(f"this DiT takes a condition (B, {extra}, {latents.shape[-2]}, {latents.shape[-1]}) "
                                 f"at the latents' size; got {got}")
            latents = torch.cat([latents, condition.to(latents.dtype)], dim=1)  # (B, C + Cc, H, W)
        elif condition is not None:
            raise ValueError("this DiT has no condition channels (config.condition_channels = 0); pass no condition")
        x = self.x_embedder(latents)  # (B, N, D)
        cos = sin = None
        if self.config.uses_rope:
            cos, sin = self.rope(h, w, latents.device)
        if self.config.uses_sincos:  # added in fp32, then cast, as diffusers' PatchEmbed
            x = (x + self.pos_embed(h, w, latents.device)[None]).to(x.dtype)
        if self.config.class_conditional:
            if class_labels is None:
                raise ValueError("this DiT is class-conditional: pass class_labels (B,) int64")
            c = self.t_embedder(timestep) + self.y_embedder(class_labels)  # (B, D)
        else:
            c = self.t_embedder(timestep) + self.pooled_embedder(pooled)  # (B, D)
        for block in self.blocks:
            x = block(x, c, text_states, text_mask, cos, sin)
        x = self.final_layer(x, c)  # (B, N, p*p*C)
        return self.unpatchify(x, h, w)
