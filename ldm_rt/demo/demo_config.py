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
from ldm_rt.demo.shapes import BACKGROUNDS, VOCABULARY, CaptionVariation
from ldm_rt.errors import ConfigError

# Where a user finds the words and grammar the demo model knows (named in the pipeline's warning).
VOCABULARY_DOC = "README.md, section 'Demo model' > 'Vocabulary and grammar'"


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
    vae_decay: int = 0  # step at which the lr has decayed linearly to a tenth (0: constant)
    vae_kl_weight: float = 1e-6
    # VAE training crop side (None: whole images). The VAE is convolutional (its one attention
    # layer sees any token count), so 64 px crops of the 128 px images train it at ~1/4 the cost.
    vae_crop: int | None = None
    vae_crop_fg: float = 0.8  # share of crops centred on a foreground pixel
    dit_batch: int = 64
    dit_lr: float = 3e-4
    dit_warmup: int = 500
    dit_decay: int = 0
    caption_dropout: float = 0.1
    # shortened captions in the dit stage (shapes.vary_caption); None: the scenes' full captions
    caption_variation: CaptionVariation | None = CaptionVariation()
    # (first step, variation) pairs in step order: from that step on, `caption_variation_at`
    # gives that variation instead (a later stage of a run changes its mix without changing
    # what the earlier steps drew, so a resume stays exact)
    caption_variation_from: tuple[tuple[int, CaptionVariation], ...] = ()
    ema_decay: float = 0.999  # 0 disables the EMA
    steps: int = 20  # run defaults of the exported model
    guidance: float = 4.0
    # super-resolution (issue 17, `ldm_rt/demo/sr.py`): output side / input side; > 1 trains a
    # DiT with condition channels on top of `base_model`'s VAE, text encoder and tokenizer
    upscale: int = 1
    base_model: str | None = None  # a model directory, relative to ldm_rt/demo/

    def __post_init__(self):
        f = self.vae.scale_factor
        if self.image_size != self.transformer.sample_size * f:
            raise ConfigError(
                f"image_size {self.image_size} != transformer sample_size {self.transformer.sample_size} "
                f"x VAE factor {f}; make them agree."
            )

    def caption_variation_at(self, step: int) -> CaptionVariation | None:
        variation = self.caption_variation
        for first, later in self.caption_variation_from:
            if step >= first:
                variation = later
        return variation

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
        # `vocabulary` makes the pipeline warn about words the captions never use, naming
        # `vocabulary_doc`; `closed_slots` about known words where the grammar has no place for
        # them ("blue" is an object colour, not a background colour)
        background = {"pattern": r"\b(?!(?:a|an|the|on)\b)([a-z]+) background\b", "words": list(BACKGROUNDS),
                      "what": "background colour"}
        size = {"upscale": self.upscale} if self.upscale > 1 else {"height": self.image_size, "width": self.image_size}
        return {"steps": self.steps, "guidance": self.guidance, **size, "vocabulary": sorted(VOCABULARY),
                "vocabulary_doc": VOCABULARY_DOC, "closed_slots": [background]}


DEMO_CONFIGS: dict[str, DemoConfig] = {
    "demo": DemoConfig(
        image_size=128,
        text_encoder=TextEncoderConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=32,  # the longest two-object caption is < 25 tokens with bos/eos
        ),
        transformer=DiTConfig(
            sample_size=16, patch_size=2, hidden_size=256, depth=6, num_heads=4, context_dim=128,
            pooled_dim=128, qk_norm=True, pos_embed="rope+sincos",
        ),
        # (16, 32, 64, 64): a train step (16 crops of 64 px) takes 0.35 s on the 2-core CPU, against
        # 1.4 s for (32, 64, 128, 128), whose 32 channels at full resolution dominate; flat shapes
        # need no more. The mid-block attention (256 tokens of 64 channels) is kept: it costs little
        # and the shipped model then exercises the whole decoder on every backend.
        vae=VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                      scaling_factor=1.0),
        num_train_images=20_000,
        vae_crop=64, vae_warmup=100, vae_decay=2500,
        # batch 32 rather than 64: on the 2-core CPU a step costs ~half, and with a few thousand
        # steps in a session more updates beat bigger batches
        dit_batch=32, dit_warmup=300, dit_decay=10_000,
        # From step 16000 (issue 19): the position-free forms ("a red circle") drew the object
        # twice or three times (the classifier then reads a low fill as "triangle"); more
        # captions without position or background: a single object's "a <colour> <shape>" (no
        # position, no clause, no unknown word; article or none) goes from 16% to 26% of its captions.
        caption_variation_from=((16_000, CaptionVariation(omit_position=0.5, omit_background=0.5)),),
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


# The 2x super-resolution demo: 64 px -> 128 px on the demo's data, reusing the demo model's VAE,
# text encoder and tokenizer. A smaller DiT than the demo's (hidden 192, depth 4: ~2.9 M
# parameters, patch 2 on 16 x 16 latents): it learns a correction of the upsampled image, not a
# scene, and must train in about an hour on a shared 2-core CPU. No sin-cos positions: where an
# edge goes is in the conditioning, so relative (RoPE) positions suffice.
DEMO_CONFIGS["sr"] = DemoConfig(
    image_size=128,
    text_encoder=DEMO_CONFIGS["demo"].text_encoder,
    transformer=DiTConfig(
        sample_size=16, patch_size=2, hidden_size=192, depth=4, num_heads=4, context_dim=128,
        pooled_dim=128, qk_norm=True, condition_channels=4,
    ),
    vae=DEMO_CONFIGS["demo"].vae,
    num_train_images=4000,
    dit_batch=32, dit_lr=5e-4, dit_warmup=200, dit_decay=4000,
    caption_dropout=0.5, caption_variation=None,
    steps=4, guidance=1.0, upscale=2, base_model="model",
)


def demo_config(name: str) -> DemoConfig:
    if name not in DEMO_CONFIGS:
        raise ConfigError(f"unknown demo config {name!r}; choose one of {', '.join(DEMO_CONFIGS)}.")
    return DEMO_CONFIGS[name]
