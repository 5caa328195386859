"""`Components`: one model's reference modules, as a family's loader returns them.

Shared by every family and by the generic code (pipeline, backends, export), so it lives on its
own: `model_dir` (the directory layout) and `dit_checkpoints` (key maps) both reach it without
importing each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from ldm_rt.configs import ModelConfig


@dataclass
class Components:
    """Everything a pipeline needs, as reference modules on the CPU in fp32.

    A class-conditional DiT (ImageNet DiT) has no text encoder and no tokenizer (both None).
    `family` names the family (`ldm_rt.families`) that samples with these components; None: the
    family is found from `config` (each family says which configs it owns). A family whose
    components go beyond these five (Flux: a second text encoder and tokenizer) subclasses this
    dataclass and adds fields.
    """

    text_encoder: nn.Module | None
    tokenizer: Any | None
    transformer: nn.Module
    vae: nn.Module
    scheduler_config: dict[str, Any]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # run defaults (steps, guidance, size)
    family: str | None = None

    @property
    def config(self) -> ModelConfig:
        te = None if self.text_encoder is None else self.text_encoder.config
        return ModelConfig(te, self.transformer.config, self.vae.config, dict(self.scheduler_config))

    def modules(self) -> dict[str, nn.Module]:
        """name -> module, for everything with weights (hashing, export, moving to a device)."""
        named = {"text_encoder": self.text_encoder, "transformer": self.transformer, "vae": self.vae}
        return {k: v for k, v in named.items() if v is not None}
