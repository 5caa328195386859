"""One whole FLUX.1 model's configuration: what `init-model --preset flux-*` writes and what the
Flux family's loader reads back from a diffusers FluxPipeline directory.

It has the attributes the generic code asks every model config for (`transformer`, `vae`,
`text_encoder`, `scheduler`) plus Flux's second text encoder (`text_encoder_2`, T5), so the
family (`owns`) and its export specs (`specs.py`) take this one object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ldm_rt.configs import TextEncoderConfig, VAEConfig
from ldm_rt.families.flux.transformer import FluxConfig
from ldm_rt.models.t5 import T5Config

# FLUX.1's scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler). schnell ships
# use_dynamic_shifting false and shift 1.0; dev ships it true with shift 3.0.
FLUX_SCHEDULER_DEV = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_SCHEDULER_SCHNELL = dict(FLUX_SCHEDULER_DEV, shift=1.0, use_dynamic_shifting=False)


@dataclass(frozen=True)
class FluxModelConfig:
    """transformer (FluxTransformer2DModel), text_encoder (CLIP, pooled output only),
    text_encoder_2 (T5 encoder), vae (AutoencoderKL, 16 latent channels, scaling and shift)."""

    transformer: FluxConfig
    text_encoder: TextEncoderConfig
    text_encoder_2: T5Config
    vae: VAEConfig
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(FLUX_SCHEDULER_DEV))
