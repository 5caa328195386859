"""Export specs of the FLUX.1 family: text_encoder (CLIP, pooled), text_encoder_2 (T5),
transformer, vae_decoder (fp32; see `ldm_rt.export.specs` for the declaration format and the
precision casts).

- `text_encoder`: CLIP's sequence axis is static (= `max_position_embeddings`, 77): the
  tokenizer pads to it and the position table has that many rows. Flux uses only the pooled
  output (`FluxPipeline._get_clip_prompt_embeds` takes `pooler_output`), so the graph returns
  only that.
- `text_encoder_2`: T5 with a dynamic "text_tokens" axis: the family pads to
  `max_sequence_length` (256 schnell, 512 dev), and T5's relative position bias has no length
  limit, so one graph serves both; no attention mask, as FluxPipeline runs it.
- `transformer`: packed latent tokens (B, "tokens", in_channels) with a dynamic token axis;
  RoPE tables are computed in the graph from `img_ids` / `txt_ids` (as the DiT's are from its
  grid), so the graph takes any resolution. `guidance` is an input only where the config has
  the guidance embedder (dev).
- `vae_decoder`: the shared spec (raw latents (B, 16, h, w); the family undoes scaling/shift).

`height`/`width` given to a sample factory are VAE latent sizes (multiples of 2: Flux packs
2x2 latent patches into one token), so the transformer's tokens are (h/2) * (w/2).
Graphs above the export driver's threshold (2 GiB: the 12B transformer, T5-XXL) are written
with external data by the driver (`export.onnx_export.EXTERNAL_DATA_THRESHOLD`).
"""

from __future__ import annotations

import torch
from torch import nn

from ldm_rt.export.specs import ComponentSpec, TensorSpec, vae_decoder_spec
from ldm_rt.models.t5 import to_inference_dtype

# Text length of the sample inputs the graphs are traced with (odd and unlike every other dim,
# so torch.export specialises no dynamic axis); the axis stays dynamic.
SAMPLE_TEXT_TOKENS = 7


class CLIPPooled(nn.Module):
    """The CLIP text encoder's pooled output only: input_ids (B, 77) -> (B, hidden_size)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[1]


def image_ids(height: int, width: int) -> torch.Tensor:
    """(h/2 * w/2, 3) fp32 ids (0, row, col) of the packed tokens, as diffusers'
    `FluxPipeline._prepare_latent_image_ids` for a latent of height x width."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


# FluxPipeline refuses max_sequence_length above 512: the longest T5 text a graph is built for.
MAX_TEXT_TOKENS = 512


def export_specs(config) -> dict[str, ComponentSpec]:
    from ldm_rt.families.flux.loading import run_defaults

    clip, t5, flux, vae = config.text_encoder, config.text_encoder_2, config.transformer, config.vae
    clip_seq, f32 = clip.max_position_embeddings, torch.float32
    # TensorRT profiles: T5 text padded to max_sequence_length (256 schnell, 512 dev) at opt; image
    # tokens from the latent size (2x2 packing); one row per image (embedded guidance, no CFG batch),
    # two at max so that true CFG ([negative; prompt]) fits.
    text = {"text_tokens": {"min": 1, "opt": run_defaults(flux)["max_sequence_length"], "max": MAX_TEXT_TOKENS}}
    rows = (1, 1, 2)

    def text_encoder_sample(batch, height, width, g):
        ids = torch.randint(0, clip.vocab_size, (batch, clip_seq), generator=g)
        eos = torch.randint(1, clip_seq, (batch,), generator=g)  # one EOS per row, at a random place
        ids[ids == clip.eos_token_id] = clip.eos_token_id - 1
        ids[torch.arange(batch), eos] = clip.eos_token_id
        ids[:, 0] = clip.bos_token_id
        return (ids,)

    def text_encoder_2_sample(batch, height, width, g):
        return (torch.randint(0, t5.vocab_size, (batch, SAMPLE_TEXT_TOKENS), generator=g),)

    def transformer_sample(batch, height, width, g):
        tokens = (height // 2) * (width // 2)
        xs = (
            torch.randn(batch, tokens, flux.in_channels, generator=g),
            torch.randn(batch, SAMPLE_TEXT_TOKENS, flux.joint_attention_dim, generator=g),
            torch.randn(batch, flux.pooled_projection_dim, generator=g),
            torch.rand(batch, generator=g),  # sigma in [0, 1]; x1000 inside the graph
            image_ids(height, width),
            torch.zeros(SAMPLE_TEXT_TOKENS, 3),  # FluxPipeline's txt_ids
        )
        return xs + ((1 + 4 * torch.rand(batch, generator=g),) if flux.guidance_embeds else ())

    guidance = (TensorSpec("guidance", f32, ("batch",)),) if flux.guidance_embeds else ()
    return {
        "text_encoder": ComponentSpec(
            name="text_encoder",
            parity_key="text_encoder",
            inputs=(TensorSpec("input_ids", torch.int64, ("batch", clip_seq)),),
            outputs=(TensorSpec("pooled", f32, ("batch", clip.hidden_size)),),
            module=lambda c: CLIPPooled(c.text_encoder),
            sample=text_encoder_sample,
            source="text_encoder",
            profile_batch=rows,
        ),
        "text_encoder_2": ComponentSpec(
            name="text_encoder_2",
            parity_key="text_encoder",
            inputs=(TensorSpec("input_ids", torch.int64, ("batch", "text_tokens")),),
            outputs=(TensorSpec("last_hidden_state", f32, ("batch", "text_tokens", t5.d_model)),),
            module=lambda c: c.text_encoder_2,
            sample=text_encoder_2_sample,
            cast=to_inference_dtype,  # fp16: the FFN output projections stay fp32, as the torch backend runs T5
            profile_dims=text,
            profile_batch=rows,
        ),
        "transformer": ComponentSpec(
            name="transformer",
            parity_key="transformer",
            inputs=(
                TensorSpec("hidden_states", f32, ("batch", "tokens", flux.in_channels)),
                TensorSpec("encoder_hidden_states", f32, ("batch", "text_tokens", flux.joint_attention_dim)),
                TensorSpec("pooled_projections", f32, ("batch", flux.pooled_projection_dim)),
                TensorSpec("timestep", f32, ("batch",)),
                TensorSpec("img_ids", f32, ("tokens", 3)),
                TensorSpec("txt_ids", f32, ("text_tokens", 3)),
            ) + guidance,
            outputs=(TensorSpec("prediction", f32, ("batch", "tokens", flux.patch_size**2 * flux.output_channels)),),
            module=lambda c: c.transformer,
            sample=transformer_sample,
            # Latent height/width (the sample's sizes; no input dim) pack 2x2: the driver's traced
            # sample is then 6x4 latents = 6 tokens.
            multiple_of={"height": 2, "width": 2},
            latent=True,
            profile_dims={"tokens": {"grid": 2}, **text},
            profile_batch=rows,
        ),
        "vae_decoder": vae_decoder_spec(vae),
    }
