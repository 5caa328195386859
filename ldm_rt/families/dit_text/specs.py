"""Export specs of the text DiT family: text_encoder, transformer, vae_decoder (fp32; see
`ldm_rt.export.specs` for the declaration format and the precision casts).

The text encoder's sequence axis is static (= `max_position_embeddings`, 77 for CLIP): the
tokenizer always pads to that length, and the learned position table has exactly that many
rows, so a dynamic axis would buy nothing.
"""

from __future__ import annotations

import torch

from torch import nn

from ldm_rt.export.specs import ComponentSpec, TensorSpec, vae_decoder_spec


class ConditionedDiT(nn.Module):
    """A DiT with condition channels as a module with positional inputs (latents, timestep,
    text_states, text_mask, pooled, condition): the graph's extra `condition` input."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, latents, timestep, text_states, text_mask, pooled, condition):
        return self.dit(latents, timestep, text_states, text_mask, pooled, condition=condition)


def _text_mask(batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """(B, M) bool, True = attend: a random prefix length per row, at least one real token."""
    lengths = torch.randint(1, seq + 1, (batch,), generator=generator)
    return torch.arange(seq)[None, :] < lengths[:, None]


def export_specs(config) -> dict[str, ComponentSpec]:
    te, dit, vae = config.text_encoder, config.transformer, config.vae
    f32 = torch.float32
    seq, p = te.max_position_embeddings, dit.patch_size

    def text_encoder_sample(batch, height, width, g):
        ids = torch.randint(0, te.vocab_size, (batch, seq), generator=g)
        eos = torch.randint(1, seq, (batch,), generator=g)  # one EOS per row, at a random place
        ids[torch.arange(batch), eos] = te.eos_token_id
        ids[:, 0] = te.bos_token_id
        return (ids,)

    cc = dit.condition_channels

    def transformer_sample(batch, height, width, g):
        inputs = (
            torch.randn(batch, dit.in_channels, height, width, generator=g),
            torch.rand(batch, generator=g) * 1000,  # the scheduler's timestep range
            torch.randn(batch, seq, dit.context_dim, generator=g),
            _text_mask(batch, seq, g),
            torch.randn(batch, dit.pooled_dim, generator=g),
        )
        return inputs + ((torch.randn(batch, cc, height, width, generator=g),) if cc else ())

    condition = (TensorSpec("condition", f32, ("batch", cc, "height", "width")),) if cc else ()

    return {
        "text_encoder": ComponentSpec(
            name="text_encoder",
            parity_key="text_encoder",
            inputs=(TensorSpec("input_ids", torch.int64, ("batch", seq)),),
            outputs=(
                TensorSpec("last_hidden_state", f32, ("batch", seq, te.hidden_size)),
                TensorSpec("pooled", f32, ("batch", te.hidden_size)),
            ),
            module=lambda c: c.text_encoder,
            sample=text_encoder_sample,
        ),
        "transformer": ComponentSpec(
            name="transformer",
            parity_key="transformer",
            inputs=(
                TensorSpec("latents", f32, ("batch", dit.in_channels, "height", "width")),
                TensorSpec("timestep", f32, ("batch",)),
                TensorSpec("text_states", f32, ("batch", seq, dit.context_dim)),
                TensorSpec("text_mask", torch.bool, ("batch", seq)),
                TensorSpec("pooled", f32, ("batch", dit.pooled_dim)),
                *condition,
            ),
            outputs=(TensorSpec("prediction", f32, ("batch", dit.output_channels, "height", "width")),),
            module=(lambda c: ConditionedDiT(c.transformer)) if cc else (lambda c: c.transformer),
            sample=transformer_sample,
            multiple_of={"height": p, "width": p},
            latent=True,
        ),
        "vae_decoder": vae_decoder_spec(vae),
    }
