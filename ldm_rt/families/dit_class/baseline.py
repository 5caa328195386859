"""diffusers' `DiTTransformer2DModel` holding our class DiT's weights: the `diffusers` baseline
of `ldm-rt bench` (`Family.diffusers_transformer`)."""

from __future__ import annotations


class _HFDiT:
    """diffusers' DiTTransformer2DModel with the backend call signature."""

    def __init__(self, model):
        self.model = model

    def __call__(self, latents, timestep, class_labels=None):
        return self.model(latents, timestep=timestep, class_labels=class_labels).sample


def diffusers_dit(ours):
    """diffusers DiTTransformer2DModel with our class-conditional DiT's weights (dit_checkpoints key map).

    diffusers computes with its own conventions (timestep frequencies / (half - 1), MLP LayerNorm
    eps 1e-5); the shapes and the work are the same, which is what a latency baseline needs."""
    from ldm_rt.dit_checkpoints import to_diffusers
    from ldm_rt.errors import require

    diffusers = require("diffusers", "diffusers", "the diffusers DiTTransformer2DModel baseline")
    c = ours.config
    hf = diffusers.DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads, in_channels=c.in_channels,
        out_channels=c.output_channels, num_layers=c.depth, sample_size=c.sample_size, patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes,
    ).eval()
    hf.load_state_dict(to_diffusers(ours.state_dict(), c), strict=True)
    return hf.requires_grad_(False)
