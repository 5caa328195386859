"""FLUX.1 transformer: a reference `FluxTransformer2DModel` (diffusers), readable and fp32-exact.

x_embedder / context_embedder -> N double-stream blocks (image and text keep their own weights
and meet in one joint attention) -> M single-stream blocks (one concatenated [text, image]
stream, attention and MLP in parallel) -> AdaLayerNormContinuous + linear on the image tokens.
Conditioning vector: timestep (x1000) + optional guidance (x1000, dev) + pooled CLIP text.

Parameter names and config keys are diffusers', so a diffusers state dict (and config.json)
loads with no renaming. Attention, RoPE and the adaLN steps go through `ldm_rt.ops`, the swap
point for faster kernels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm_rt import ops
from ldm_rt.errors import ConfigError
from ldm_rt.models.dit import timestep_embedding

# diffusers writes these into transformer/config.json; none changes the computation here.
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


@dataclass(frozen=True)
class FluxConfig:
    """diffusers `FluxTransformer2DModel` config (transformer/config.json), same keys."""

    patch_size: int = 1
    in_channels: int = 64  # packed latents: 16 VAE channels x 2 x 2
    out_channels: int | None = None  # None: in_channels
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5 hidden size
    pooled_projection_dim: int = 768  # CLIP-L pooled size
    guidance_embeds: bool = False  # True for guidance-distilled models (dev)
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(
                f"FluxConfig: axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                f"{self.attention_head_dim}."
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ConfigError(f"FluxConfig: every axes_dims_rope entry must be even, got {self.axes_dims_rope}.")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FluxConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if k not in names and k not in _IGNORED_KEYS and not k.startswith("_"))
        if unknown:
            raise ConfigError(f"FluxConfig: unknown config key(s) {unknown}; known keys are {sorted(names)}.")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": "FluxTransformer2DModel", **d}

    @staticmethod
    def from_name(name: str) -> FluxConfig:
        if name not in FLUX_PRESETS:
            raise ConfigError(f"unknown Flux preset {name!r}; choose one of {', '.join(FLUX_PRESETS)}.")
        return FLUX_PRESETS[name]


FLUX_PRESETS: dict[str, FluxConfig] = {
    # Tests and CPU demos: 2 heads of 16 (rope 4/6/6), one block of each kind.
    "flux-tiny": FluxConfig(
        num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ),
    # black-forest-labs/FLUX.1-schnell and FLUX.1-dev transformer/config.json (12B parameters).
    "flux-schnell": FluxConfig(guidance_embeds=False),
    "flux-dev": FluxConfig(guidance_embeds=True),
}


# ---------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2 (also the guidance embedder)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """diffusers `CombinedTimestep[Guidance]TextProjEmbeddings`: t (+ guidance) + pooled text -> (B, D).

    Sinusoids are 256 wide, [cos | sin], frequencies exp(-ln(1e4) i / 128) (flip_sin_to_cos,
    shift 0): the DiT `timestep_embedding` with freq_shift 0, the same ops in the same order.
    """

    frequency_dim = 256

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(self.frequency_dim, dim)
        self.guidance_embedder = TimestepEmbedding(self.frequency_dim, dim) if guidance else None
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # PixArtAlphaTextProjection, act silu

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(timestep, self.frequency_dim).to(pooled.dtype))  # (B, D)
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this Flux transformer has guidance embeds: pass guidance (B,)")
            emb = emb + self.guidance_embedder(timestep_embedding(guidance, self.frequency_dim).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


@dataclass
class ModulationOut:
    shift: torch.Tensor  # (B, D)
    scale: torch.Tensor  # (B, D)
    gate: torch.Tensor  # (B, D)


class AdaLayerNormZero(nn.Module):
    """SiLU(c) -> Linear -> (shift, scale, gate) for attention and for the MLP, diffusers' order."""

    def __init__(self, dim: int, n: int = 2):
        super().__init__()
        self.linear = nn.Linear(dim, 3 * n * dim)

    def forward(self, c: torch.Tensor) -> list[ModulationOut]:
        chunks = self.linear(F.silu(c)).chunk(self.linear.out_features // c.shape[-1], dim=1)  # each (B, D)
        return [ModulationOut(*chunks[i : i + 3]) for i in range(0, len(chunks), 3)]


class RMSNorm(nn.Module):
    """torch.nn.RMSNorm over the head dim with a learned scale (qk-norm), through `ops.rms_norm`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.impl("rms_norm")(x, self.weight, self.eps)


class GELUProj(nn.Module):
    """diffusers `GELU(approximate="tanh")`: Linear then GELU-tanh (key `ff.net.0.proj`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """dim -> 4 dim (GELU-tanh) -> dim; `net` indices as diffusers (1 is its dropout)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)  # (B, N, H*Dh) -> (B, H, N, Dh)


class FluxAttention(nn.Module):
    """Joint attention with RMS qk-norm and RoPE on the whole [text, image] sequence.

    Double-stream (`context=True`): text has its own add_{q,k,v}_proj, norm_added_{q,k} and
    to_add_out; single-stream: one set of q/k/v and no output projection (the block's proj_out
    mixes attention and MLP).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, context: bool):
        super().__init__()
        self.head_dim = head_dim
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, num_heads * head_dim) for _ in range(3))
        self.context = context
        if context:
            self.to_out = nn.ModuleList([nn.Linear(num_heads * head_dim, dim)])  # a list: key `to_out.0`
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                nn.Linear(dim, num_heads * head_dim) for _ in range(3)
            )
            self.to_add_out = nn.Linear(num_heads * head_dim, dim)

    def _qkv(self, x: torch.Tensor, to_q, to_k, to_v, norm_q, norm_k):
        q, k, v = (_heads(f(x), self.head_dim) for f in (to_q, to_k, to_v))  # each (B, H, N, Dh)
        return norm_q(q), norm_k(k), v

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D) image (or joint) tokens, context (B, M, D) text tokens (double-stream only);
        cos/sin (M + N, Dh/2) for the joint sequence, text first."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is not None:
            cq, ck, cv = self._qkv(
                context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q, self.norm_added_k
            )
            q, k, v = torch.cat([cq, q], dim=2), torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # (B, H, M+N, Dh)
        out = ops.impl("attention")(q, k, v, cos=cos, sin=sin).transpose(1, 2).flatten(2)  # (B, M+N, H*Dh)
        if context is None:
            return out
        m = context.shape[1]
        return self.to_out[0](out[:, m:]), self.to_add_out(out[:, :m])  # image (B, N, D), text (B, M, D)


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """diffusers clips the residual stream to the fp16 range after each block (fp16 only)."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxTransformerBlock(nn.Module):
    """Double-stream block: per-stream adaLN-Zero, joint attention, per-stream GELU-tanh MLP."""

    eps = 1e-6

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, num_heads, head_dim, context=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, img, txt, c, cos, sin):
        """img (B, N, D), txt (B, M, D), c (B, D) -> (txt, img), diffusers' return order."""
        img_msa, img_mlp = self.norm1(c)
        txt_msa, txt_mlp = self.norm1_context(c)
        img_mod = ops.impl("layernorm_modulate")(img, img_msa.shift, img_msa.scale, self.eps)
        txt_mod = ops.impl("layernorm_modulate")(txt, txt_msa.shift, txt_msa.scale, self.eps)
        img_attn, txt_attn = self.attn(img_mod, cos, sin, context=txt_mod)  # (B, N, D), (B, M, D)

        residual = ops.impl("gated_residual_layernorm_modulate")
        img, img_mod = residual(img, img_attn, img_msa.gate, img_mlp.shift, img_mlp.scale, self.eps)
        img = img + img_mlp.gate[:, None] * self.ff(img_mod)
        txt, txt_mod = residual(txt, txt_attn, txt_msa.gate, txt_mlp.shift, txt_mlp.scale, self.eps)
        txt = txt + txt_mlp.gate[:, None] * self.ff_context(txt_mod)
        return _clip_fp16(txt), img


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on x = [text, image]: x + gate * proj_out([attn(x'), gelu(proj_mlp(x'))])."""

    eps = 1e-6

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp_hidden = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZero(dim, n=1)
        self.attn = FluxAttention(dim, num_heads, head_dim, context=False)
        self.proj_mlp = nn.Linear(dim, mlp_hidden)
        self.proj_out = nn.Linear(dim + mlp_hidden, dim)

    def forward(self, x, c, cos, sin):
        """x (B, M + N, D), c (B, D) -> (B, M + N, D)."""
        (mod,) = self.norm(c)
        x_mod = ops.impl("layernorm_modulate")(x, mod.shift, mod.scale, self.eps)
        attn = self.attn(x_mod, cos, sin)  # (B, M+N, D)
        mlp = F.gelu(self.proj_mlp(x_mod), approximate="tanh")  # (B, M+N, 4D)
        return _clip_fp16(x + mod.gate[:, None] * self.proj_out(torch.cat([attn, mlp], dim=2)))


class AdaLayerNormContinuous(nn.Module):
    """Final norm: LayerNorm(x) * (1 + scale) + shift with (scale, shift) = Linear(SiLU(c)).

    Mind the order: diffusers chunks the projection as (scale, shift), the reverse of adaLN-Zero.
    """

    eps = 1e-6

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(c).to(x.dtype)).chunk(2, dim=1)  # each (B, D)
        return ops.impl("layernorm_modulate")(x, shift, scale, self.eps)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class FluxTransformer2DModel(nn.Module):
    """Packed latent tokens + T5 tokens + pooled CLIP + timestep (+ guidance) -> velocity tokens.

    forward(hidden_states (B, N, in_channels), encoder_hidden_states (B, M, joint_attention_dim),
    pooled_projections (B, pooled_projection_dim), timestep (B,) in [0, 1], img_ids (N, 3),
    txt_ids (M, 3), guidance (B,) or None) -> (B, N, patch_size**2 * out_channels); the same
    arguments as diffusers' forward (2D ids), returning the tensor rather than an output object.
    """

    rope_theta = 10000.0

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        d, heads, hd = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.time_text_embed = TimeTextEmbed(d, config.pooled_projection_dim, config.guidance_embeds)
        self.context_embedder = nn.Linear(config.joint_attention_dim, d)
        self.x_embedder = nn.Linear(config.in_channels, d)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(d, heads, hd) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(d, heads, hd) for _ in range(config.num_single_layers)]
        )
        self.norm_out = AdaLayerNormContinuous(d)
        self.proj_out = nn.Linear(d, config.patch_size**2 * config.output_channels)

    def rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (M + N, head_dim / 2) for the joint sequence, text first."""
        return ops.rope_freqs_from_ids(torch.cat([txt_ids, img_ids], dim=0), self.config.axes_dims_rope, self.rope_theta)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        img = self.x_embedder(hidden_states)  # (B, N, D)
        timestep = timestep.to(img.dtype) * 1000
        guidance = None if guidance is None else guidance.to(img.dtype) * 1000
        c = self.time_text_embed(timestep, guidance, pooled_projections)  # (B, D)
        txt = self.context_embedder(encoder_hidden_states)  # (B, M, D)
        cos, sin = self.rope(txt_ids, img_ids)  # (M+N, Dh/2)

        for block in self.transformer_blocks:
            txt, img = block(img, txt, c, cos, sin)
        m = txt.shape[1]
        x = torch.cat([txt, img], dim=1)  # (B, M+N, D): diffusers re-concatenates per block, the same values
        for block in self.single_transformer_blocks:
            x = block(x, c, cos, sin)
        img = self.norm_out(x[:, m:], c)  # (B, N, D)
        return self.proj_out(img)  # (B, N, p*p*C)
