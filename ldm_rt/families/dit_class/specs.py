"""Export specs of the class-conditional DiT (issue 8): no text encoder; the transformer's
conditioning input is `class_labels` [batch] int64 (num_classes = the null class of CFG)."""

from __future__ import annotations

import torch
from torch import nn

from ldm_rt.export.specs import ComponentSpec, TensorSpec, vae_decoder_spec


class ClassConditionalDiT(nn.Module):
    """A class-conditional DiT as a module with positional inputs (latents, timestep, class_labels)."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor,
                condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.dit(latents, timestep, class_labels=class_labels, condition=condition)


def export_specs(config) -> dict[str, ComponentSpec]:
    dit, f32 = config.transformer, torch.float32

    cc = dit.condition_channels

    def transformer_sample(batch, height, width, g):
        inputs = (
            torch.randn(batch, dit.in_channels, height, width, generator=g),
            torch.rand(batch, generator=g) * 1000,  # the scheduler's timestep range
            torch.randint(0, dit.num_classes + 1, (batch,), generator=g),  # the null class included
        )
        return inputs + ((torch.randn(batch, cc, height, width, generator=g),) if cc else ())

    transformer = ComponentSpec(
        name="transformer",
        parity_key="transformer",
        inputs=(
            TensorSpec("latents", f32, ("batch", dit.in_channels, "height", "width")),
            TensorSpec("timestep", f32, ("batch",)),
            TensorSpec("class_labels", torch.int64, ("batch",)),
            *((TensorSpec("condition", f32, ("batch", cc, "height", "width")),) if cc else ()),
        ),
        outputs=(TensorSpec("prediction", f32, ("batch", dit.output_channels, "height", "width")),),
        module=lambda c: ClassConditionalDiT(c.transformer),
        sample=transformer_sample,
        multiple_of={"height": dit.patch_size, "width": dit.patch_size},
        latent=True,
    )
    return {"transformer": transformer, "vae_decoder": vae_decoder_spec(config.vae)}
