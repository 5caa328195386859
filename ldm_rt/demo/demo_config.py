"""The demo model's configs and training settings, one frozen `DemoConfig` per preset.

`demo` is the shipped model (128 px, sized for CPU training and < 10 s CPU inference);
`tiny` is for tests only (32 px, a few seconds per stage).
The text encoder's vocab and special ids are not fixed here: they come from the tokenizer
trained on the caption vocabulary (`train.build_tokenizer`), so `text_encoder_config` derives
them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ldm_rt.configs import FLOW_SCHEDULER, DiTConfig, TextEncoderConfig, VAEConfig
from ldm_rt.errors import ConfigError


@dataclass(frozen=True)
class DemoConfig:
    image_size: int
    text_encoder: TextEncoderConfig  # vocab_size / bos / eos / pad are filled from the tokenizer
    transformer: DiTConfig
    vae: VAEConfig  # scaling_factor / shift_factor are filled from the cached latents
    num_train_images: int  # fixed, pre-rendered, latent-cached dataset of the dit stage
    # stage settings: batch, peak lr, warmup steps
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_warmup: int = 200
    vae_kl_weight: float = 1e-6
    # VAE training crop side (None: whole images). The VAE is convolutional (its one attention
    # layer sees any token count), so 64 px crops of the 128 px images train it at ~1/4 the cost.
    vae_crop: int | None = None
    dit_batch: int = 64
    dit_lr: float = 3e-4
    dit_warmup: int = 500
    caption_dropout: float = 0.1
    ema_decay: float = 0.999  # 0 disables the EMA
    steps: int = 20  # run defaults of the exported model
    guidance: float = 4.0

    def __post_init__(self):
        f = self.vae.scale_factor
        if self.image_size != self.transformer.sample_size * f:
            raise ConfigError(
                f"image_size {self.image_size} != transformer sample_size {self.transformer.sample_size} "
                f"x VAE factor {f}; make them agree."
            )

    def text_encoder_config(self, tokenizer) -> TextEncoderConfig:
        return replace(
            self.text_encoder, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )

    @property
    def scheduler(self) -> dict:
        return dict(FLOW_SCHEDULER)  # shift 1.0

    @property
    def defaults(self) -> dict:
        return {"steps": self.steps, "guidance": self.guidance, "height": self.image_size,
                "width": self.image_size}


DEMO_CONFIGS: dict[str, DemoConfig] = {
    "demo": DemoConfig(
        image_size=128,
        text_encoder=TextEncoderConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=32,  # the longest two-object caption is < 25 tokens with bos/eos
        ),
        transformer=DiTConfig(
            sample_size=16, patch_size=2, hidden_size=256, depth=6, num_heads=4, context_dim=128,
            pooled_dim=128, qk_norm=True,
        ),
        vae=VAEConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=16,
                      scaling_factor=1.0),
        num_train_images=20_000,
        vae_crop=64,
    ),
    "tiny": DemoConfig(
        image_size=32,
        text_encoder=TextEncoderConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=32,
        ),
        transformer=DiTConfig(
            sample_size=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, context_dim=32,
            pooled_dim=32, qk_norm=True,
        ),
        vae=VAEConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                      mid_block_add_attention=False, scaling_factor=1.0),
        num_train_images=48, vae_crop=16,
        vae_batch=4, vae_lr=2e-3, vae_warmup=2, dit_batch=8, dit_lr=2e-3, dit_warmup=2, steps=4,
    ),
}


def demo_config(name: str) -> DemoConfig:
    if name not in DEMO_CONFIGS:
        raise ConfigError(f"unknown demo config {name!r}; choose one of {', '.join(DEMO_CONFIGS)}.")
    return DEMO_CONFIGS[name]
