"""Frozen configs for every component, and the named presets.

Each config reads and writes the JSON its source library uses, so a directory written by
`transformers`/`diffusers` `save_pretrained` loads as it is:

- `TextEncoderConfig`: transformers' `CLIPTextConfig` (text_encoder/config.json)
- `DiTConfig`: ldm-rt's own denoiser config (transformer/config.json); unknown keys are errors
- `VAEConfig`: diffusers' `AutoencoderKL` config (vae/config.json)

Shapes are derived from these configs everywhere else; never repeat them as literals.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm_rt.errors import ConfigError

# Keys the source libraries write that carry metadata or training-only settings, never a
# change to the inference computation.
_METADATA_KEYS = {
    "_class_name", "_diffusers_version", "_name_or_path", "_commit_hash", "_ldm_rt_version",
    "_use_default_values", "architectures", "transformers_version", "torch_dtype", "dtype",
    "model_type", "return_dict", "output_hidden_states", "output_attentions", "use_return_dict",
    "is_encoder_decoder", "chunk_size_feed_forward", "tie_word_embeddings", "id2label", "label2id",
    "problem_type", "tokenizer_class", "prefix", "task_specific_params", "finetuning_task",
    "cross_attention_hidden_size", "add_cross_attention", "is_decoder", "pruned_heads",
    "tf_legacy_loss", "use_bfloat16", "torchscript", "attn_implementation",
}
# transformers CLIPTextConfig fields that only matter for training or for heads we do not have.
_CLIP_IGNORED = {
    "projection_dim", "dropout", "attention_dropout", "initializer_range", "initializer_factor",
    "hidden_dropout_prob", "layerdrop",
}
# diffusers AutoencoderKL fields that do not change decode()/encode() math here.
_VAE_IGNORED = {"sample_size"}


def _from_dict(cls, data: dict[str, Any], *, what: str, ignored: set[str], strict: bool):
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs, unknown = {}, []
    for key, value in data.items():
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key in _METADATA_KEYS or key in ignored or key.startswith("_"):
            continue
        else:
            unknown.append(key)
    if unknown:
        msg = f"{what}: unknown config key(s) {sorted(unknown)}"
        if strict:
            raise ConfigError(msg + f"; known keys are {sorted(names)}.")
        warnings.warn(msg + " (ignored).", stacklevel=3)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from None


def read_json(path: Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: {path} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} must hold a JSON object.")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer; field names are transformers' `CLIPTextConfig`'s."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of quick_gelu, gelu")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextEncoderConfig:
        return _from_dict(cls, data, what="text_encoder config", ignored=_CLIP_IGNORED, strict=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            **dataclasses.asdict(self),
            "projection_dim": self.hidden_size,
        }


@dataclass(frozen=True)
class DiTConfig:
    """DiT with adaLN-Zero: text-conditioned with 2D axial RoPE and cross-attention by default.

    `sample_size` is the default latent side (image side / VAE factor).

    The DiT family options (issue 8), so published checkpoints load onto the same modules:
    - `num_classes`: class-label conditioning instead of text (an embedding table of
      num_classes + 1 rows; row num_classes is the null class used for CFG), as DiT's LabelEmbedder;
    - `cross_attention`: False drops the cross-attention sub-block (class models have no text);
    - `pos_embed`: "rope" (2D axial RoPE in attention) or "sincos" (fixed 2D sin-cos absolute
      embedding added to the patch tokens, facebookresearch/DiT and diffusers' PatchEmbed; at a
      latent grid other than sample_size/patch the positions are scaled as diffusers does), or
      "rope+sincos", both (the demo model: RoPE alone is relative, and a small model trained
      briefly did not learn where "on the left" is from the grid's edges: 6% position accuracy
      after 2000 steps, against 83% colour);
    - learned sigma: out_channels = 2 * in_channels (the variance half is ignored at sampling);
    - the conventions in which the original and diffusers layouts differ:
      `timestep_freq_shift` (0: frequencies exp(-ln(1e4) i / half), original DiT; 1: / (half - 1),
      diffusers' Timesteps(downscale_freq_shift=1)) and `mlp_norm_eps` (the LayerNorm before the
      MLP: 1e-6 in the original, diffusers' norm_eps = 1e-5 in DiTTransformer2DModel).

    Channel-concatenation conditioning (issue 17): `condition_channels` > 0 makes the DiT take a
    conditioning tensor (B, condition_channels, H, W) at the latents' size, concatenated to the
    latents on the channel axis before patchify (the patch embedding sees in_channels +
    condition_channels); the prediction keeps the latents' channels. 0 (the default) is every
    other model: the key is then left out of the saved config, which stays byte-identical.
    """

    sample_size: int = 32
    in_channels: int = 4
    out_channels: int | None = None  # None: same as in_channels
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    context_dim: int = 768  # text encoder hidden size (cross-attention keys/values)
    pooled_dim: int = 768  # pooled text vector size (added to the timestep embedding)
    qk_norm: bool = False  # RMS norm on q and k of self-attention (per head)
    rope_theta: float = 10000.0
    rope_axes_dim: tuple[int, int] | None = None  # (rows, cols); None: head_dim split in half
    frequency_embedding_size: int = 256
    norm_eps: float = 1e-6
    num_classes: int | None = None  # None: text conditioning; N: class labels 0..N-1, null class N
    cross_attention: bool = True
    pos_embed: str = "rope"  # "rope" | "sincos" | "rope+sincos"
    pos_embed_interpolation_scale: float = 1.0  # sincos only: diffusers' PatchEmbed interpolation_scale
    timestep_freq_shift: int = 0  # 0: original DiT (divide by half); 1: diffusers (divide by half - 1)
    mlp_norm_eps: float | None = None  # None: norm_eps
    condition_channels: int = 0  # extra input channels concatenated to the latents (0: none)

    def __post_init__(self):
        if self.condition_channels < 0:
            raise ValueError(f"condition_channels must be >= 0, got {self.condition_channels}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.pos_embed not in ("rope", "sincos", "rope+sincos"):
            raise ValueError(f"pos_embed {self.pos_embed!r} is not one of rope, sincos, rope+sincos")
        if self.uses_rope:
            axes = self.axes_dim
            if len(axes) != 2 or sum(axes) != self.head_dim or any(a % 2 for a in axes):
                raise ValueError(
                    f"rope_axes_dim {axes} must be two even numbers summing to head_dim {self.head_dim}"
                )
        if self.uses_sincos and self.hidden_size % 4:
            raise ValueError(f"sincos position embedding needs hidden_size divisible by 4, got {self.hidden_size}")
        if self.patch_size < 1 or self.depth < 1:
            raise ValueError("patch_size and depth must be >= 1")
        if self.num_classes is not None:
            if self.num_classes < 1:
                raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
            if self.cross_attention:
                raise ValueError("a class-conditional DiT (num_classes set) has no text: set cross_attention to false")
        if self.timestep_freq_shift not in (0, 1):
            raise ValueError(f"timestep_freq_shift must be 0 (original DiT) or 1 (diffusers), got {self.timestep_freq_shift}")
        if self.output_channels not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(
                f"out_channels {self.output_channels} must be in_channels {self.in_channels} or twice it (learned sigma)"
            )

    @property
    def uses_rope(self) -> bool:
        return self.pos_embed in ("rope", "rope+sincos")

    @property
    def uses_sincos(self) -> bool:
        return self.pos_embed in ("sincos", "rope+sincos")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def axes_dim(self) -> tuple[int, int]:
        if self.rope_axes_dim is not None:
            return tuple(self.rope_axes_dim)
        half = self.head_dim // 2
        # Rows get the larger even half when head_dim / 2 is odd.
        rows = half + (half % 2)
        return (rows, self.head_dim - rows)

    @property
    def output_channels(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @property
    def learn_sigma(self) -> bool:
        """The model also predicts the variance (out_channels = 2 * in_channels), as DiT does."""
        return self.output_channels == 2 * self.in_channels

    @property
    def class_conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def mlp_eps(self) -> float:
        return self.norm_eps if self.mlp_norm_eps is None else self.mlp_norm_eps

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTConfig:
        return _from_dict(cls, data, what="transformer config", ignored=set(), strict=True)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["rope_axes_dim"] is not None:
            d["rope_axes_dim"] = list(d["rope_axes_dim"])
        if not d["condition_channels"]:  # unconditioned models keep the config they always had
            del d["condition_channels"]
        return {"_class_name": "DiT", **d}


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL; field names are diffusers' `AutoencoderKL` config keys."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # diffusers' meaning: a fp16 pipeline decodes with this VAE in fp32 (SD-VAE convolutions
    # overflow fp16; GroupNorm statistics are fp32 regardless).
    force_upcast: bool = True
    # Per-channel latent normalisation (e.g. Playground v2.5) is not supported yet: refusing it
    # is better than decoding wrong images silently.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have equal length")
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise ValueError(f"unsupported VAE block types {bad}")
        if self.act_fn not in ("silu", "swish"):  # diffusers maps both names to SiLU
            raise ValueError(f"act_fn {self.act_fn!r} is not supported (only silu)")
        if self.latents_mean is not None or self.latents_std is not None:
            raise ValueError("latents_mean/latents_std (per-channel latent normalisation) are not supported")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError("every block_out_channels entry must be divisible by norm_num_groups")

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        return _from_dict(cls, data, what="vae config", ignored=_VAE_IGNORED, strict=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("down_block_types", "up_block_types", "block_out_channels"):
            d[k] = list(d[k])
        for k in ("latents_mean", "latents_std"):
            if d[k] is None:
                del d[k]
        return {"_class_name": "AutoencoderKL", **d}


@dataclass(frozen=True)
class ModelConfig:
    """One whole model: what `init-model` writes for a preset. A class-conditional DiT has no
    text encoder (text_encoder is None)."""

    text_encoder: TextEncoderConfig | None
    transformer: DiTConfig
    vae: VAEConfig
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(FLOW_SCHEDULER))

    @staticmethod
    def from_name(name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return PRESETS[name]


FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
# The published DiT checkpoints' sampler: diffusers' scripts/convert_dit_to_diffusers.py writes
# DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
# clip_sample=False); the rest are DDIMScheduler's defaults, spelled out.
DIT_DDIM_SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": True,
    "steps_offset": 0, "timestep_spacing": "leading",
}

CLIP_L = TextEncoderConfig()  # 768 wide, 12 layers, 12 heads, 77 tokens
SD_VAE = VAEConfig()  # factor 8, 4 latent channels, 0.18215

# DiT paper sizes: (depth, hidden, heads).
_DIT_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        text_encoder=TextEncoderConfig(
            vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, bos_token_id=998, eos_token_id=999,
            pad_token_id=999,
        ),
        transformer=DiTConfig(
            sample_size=8, hidden_size=64, depth=2, num_heads=4, context_dim=32, pooled_dim=32,
            qk_norm=True,
        ),
        vae=VAEConfig(
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        ),
    ),
}
# Class-conditional DiT (facebookresearch/DiT): ImageNet labels, sin-cos positions, learned sigma,
# no text. The conventions are the original checkpoints' (timestep frequencies / half, eps 1e-6);
# a diffusers DiTPipeline directory loads with its own (see ldm_rt/dit_checkpoints.py).
_DIT_CLASS = dict(num_classes=1000, cross_attention=False, pos_embed="sincos", out_channels=8)
PRESETS["tiny-class"] = ModelConfig(
    text_encoder=None,
    transformer=DiTConfig(sample_size=8, hidden_size=64, depth=2, num_heads=4, **_DIT_CLASS),
    vae=PRESETS["tiny"].vae,
    scheduler=dict(DIT_DDIM_SCHEDULER),
)
for _px in (256, 512):  # the published DiT-XL-2-256x256.pt and DiT-XL-2-512x512.pt
    PRESETS[f"dit-xl-2-{_px}-class"] = ModelConfig(
        text_encoder=None,
        transformer=DiTConfig(sample_size=_px // SD_VAE.scale_factor, patch_size=2, hidden_size=1152, depth=28,
                              num_heads=16, **_DIT_CLASS),
        vae=SD_VAE,
        scheduler=dict(DIT_DDIM_SCHEDULER),
    )
for _size, (_depth, _hidden, _heads) in _DIT_SIZES.items():
    for _patch in (2, 4, 8):
        PRESETS[f"dit-{_size}-{_patch}"] = ModelConfig(
            text_encoder=CLIP_L,
            transformer=DiTConfig(
                sample_size=32, patch_size=_patch, hidden_size=_hidden, depth=_depth, num_heads=_heads,
                context_dim=CLIP_L.hidden_size, pooled_dim=CLIP_L.hidden_size,
            ),
            vae=SD_VAE,
        )
