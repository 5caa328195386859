"""FLUX.1 (schnell, dev) as a model family: diffusers' `FluxPipeline`, step for step, on the seam.

The folder also holds the building blocks (reference transformer, config presets, pure sampling
functions); this module is the `Family` that assembles them. Sampling follows FluxPipeline so the
same seed draws the same image:
- prompts: CLIP pooled output (B, 768) + T5 last hidden states padded to `max_sequence_length`
  (256 schnell, 512 dev; no attention mask, as FluxPipeline) + text ids zeros (L, 3);
- noise (B, 16, h, w) drawn by the generic seeding, packed into 2x2-patch tokens. The step's
  latent layout is the token grid (B, h/2, w/2, 64): the same values as diffusers' (B, h/2 * w/2,
  64), kept 4-D so that the step function derives the image position ids from the shape;
- schedule: FlowMatchEuler with sigmas linspace(1, 1/steps, steps), dynamic shift mu from the
  image token count (`sampling.flux_scheduler`);
- guidance: dev's embedded guidance (one transformer call per step, no unconditional half); a
  model without a guidance embedder (schnell) ignores it, with a warning when one is given;
- true CFG (`true_cfg_scale` > 1 and a negative prompt, as diffusers): [negative; prompt] in one
  batched transformer call, negative + scale * (cond - negative).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

from ldm_rt.errors import ConfigError, InputError
from ldm_rt.families.base import Family, StepFunction


def flux_step(transformer, update, latents, t, coefficients, guidance, prompt_embeds, pooled, txt_ids, *condition,
              guidance_embeds: bool, true_cfg_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """latents (B, h/2, w/2, 64) fp32 -> the latents after one step. t (B,) is the step's
    timestep (sigma x 1000), guidance a 0-d fp32 tensor (fed to the guidance embedder when the
    model has one). prompt_embeds/pooled hold B rows, or 2B ([negative; prompt]) for true CFG.
    `condition`: FLUX.1 Fill / Control's image conditioning (B, h/2, w/2, C) (`conditioning.py`),
    concatenated after the latents on the channel axis, as FluxFillPipeline / FluxControlPipeline."""
    from ldm_rt.families.flux.sampling import true_cfg

    b, gh, gw, c = latents.shape
    x = torch.cat([latents, *(x.to(latents.dtype) for x in condition)], dim=-1) if condition else latents
    x = x.reshape(b, gh * gw, x.shape[-1])  # (B, N, 64 [+ C]), diffusers' packed layout
    axes = [torch.arange(n, device=x.device, dtype=torch.float32) for n in (1, gh, gw)]  # (0, row, col)
    img_ids = torch.stack(torch.meshgrid(axes[0] * 0, axes[1], axes[2], indexing="ij"), -1).reshape(-1, 3)
    do_cfg = prompt_embeds.shape[0] == 2 * b
    model_in = torch.cat([x, x]) if do_cfg else x
    rows = model_in.shape[0]
    timestep = t[:1].expand(rows).to(dtype) / 1000  # as FluxPipeline: t.to(latents dtype) / 1000
    g = guidance.expand(rows) if guidance_embeds else None
    out = transformer(model_in.to(dtype), prompt_embeds, pooled, timestep, img_ids.to(dtype), txt_ids, g).float()
    if do_cfg:
        negative, cond = out.chunk(2)
        out = true_cfg(cond, negative, true_cfg_scale)
    return update(latents, out.reshape(b, gh, gw, c), coefficients)


@dataclass
class FluxRequest:
    prompts: list[str]  # one row per distinct prompt; num_images repeats the encodings (as diffusers)
    negatives: list[str] | None  # with true CFG only
    num_images: int
    true_cfg_scale: float
    max_sequence_length: int | None = None  # T5 tokens; None: the model's (tokenizer_2's length)


def _placed(module, device: torch.device, dtype: torch.dtype, t5: bool = False):
    """`module` on the text-encoder device in `dtype` (moved once, then a no-op)."""
    from ldm_rt.models.t5 import to_inference_dtype

    p = module.shared.weight if t5 else next(module.parameters())
    if p.device != device or p.dtype != dtype:
        module.to(device)
        to_inference_dtype(module, dtype) if t5 else module.to(dtype)
    return module


def text_encoder_dtype(pipe) -> torch.dtype:
    """The pipeline's dtype; on a CPU text-encoder device under an fp16 pipeline bf16 (torch's CPU
    fp16 kernels are incomplete)."""
    dtype = pipe.precision.dtype
    return torch.bfloat16 if pipe.text_encoder_device.type == "cpu" and dtype == torch.float16 else dtype


MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.check_inputs: "`max_sequence_length` cannot be greater than 512"
SCHNELL_SEQUENCE_LENGTH = 256  # what FLUX.1-schnell was distilled with (BFL's flux repo: 256 if schnell else 512)


def check_max_sequence_length(value, guidance_embeds: bool) -> int:
    """A T5 token count for FluxPipeline's `max_sequence_length`: a whole number in 1..512, as diffusers
    accepts; above 256 on a model without a guidance embedder (schnell-like) a warning, not an error,
    since diffusers runs it (BFL's reference caps schnell at 256)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEQUENCE_LENGTH:
        raise InputError(f"max_sequence_length must be a whole number from 1 to {MAX_SEQUENCE_LENGTH} (T5 tokens, "
                         f"as diffusers' FluxPipeline), got {value!r}.")
    if not guidance_embeds and value > SCHNELL_SEQUENCE_LENGTH:
        warnings.warn(f"max_sequence_length {value} is above the {SCHNELL_SEQUENCE_LENGTH} T5 tokens FLUX.1-schnell "
                      "was distilled with; diffusers runs it, black-forest-labs' reference does not.", stacklevel=5)
    return value


@torch.no_grad()
def encode_prompt(pipe, prompts: list[str], num_images: int = 1, max_sequence_length: int | None = None):
    """prompts -> (prompt_embeds (B, L, d_t5), pooled (B, d_clip), txt_ids (L, 3)) on pipe.device in the
    pipeline's dtype, each prompt's rows repeated num_images times; FluxPipeline.encode_prompt. L is
    `max_sequence_length` (None: the model's, tokenizer_2's length: 256 schnell, 512 dev).
    Through the backend's graphs where it runs exported graphs (`pipe.graphs`: onnxruntime,
    tensorrt; the T5 graph's token axis is dynamic), else through the reference modules on
    `pipe.text_encoder_device` (torch, triton)."""
    from ldm_rt.pipeline import check_finite

    tokens = pipe.tokenizer(prompts)
    for prompt, cut in zip(prompts, tokens.truncated):
        if cut:
            warnings.warn(f"prompt truncated to {pipe.tokenizer.max_length} tokens for CLIP, as FluxPipeline does: "
                          f"{prompt[:60]!r}...", stacklevel=4)
    t5_ids = pipe.components.tokenizer_2(prompts, max_sequence_length)
    if "text_encoder_2" in pipe.graphs:  # a backend that runs the exported graphs (specs.py: CLIP pooled, T5)
        (pooled,) = pipe.graphs["text_encoder"](tokens.input_ids.to(pipe.device))
        (prompt_embeds,) = pipe.graphs["text_encoder_2"](t5_ids.to(pipe.device))
        clip = t5 = None
    else:  # the reference modules, on the text-encoder device
        device, dtype = pipe.text_encoder_device, text_encoder_dtype(pipe)
        clip = _placed(pipe.components.text_encoder, device, dtype)
        t5 = _placed(pipe.components.text_encoder_2, device, dtype, t5=True)
        _, pooled = clip(tokens.input_ids.to(device))
        prompt_embeds = t5(t5_ids.to(device))
    out_dtype = pipe.precision.dtype
    prompt_embeds = prompt_embeds.to(pipe.device, out_dtype).repeat_interleave(num_images, dim=0)
    pooled = pooled.to(pipe.device, out_dtype).repeat_interleave(num_images, dim=0)
    check_finite(prompt_embeds, "T5 text encoding", pipe.precision)
    check_finite(pooled, "CLIP text encoding", pipe.precision)
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=pipe.device, dtype=out_dtype)
    if pipe.release_text_encoders and clip is not None:  # graphs: the backend owns their memory
        offload_text_encoders(clip, t5)
    return prompt_embeds, pooled, txt_ids


def offload_text_encoders(*modules) -> None:
    """Move the text encoders to the CPU (`Pipeline(release_text_encoders=True)`), in the dtype they ran
    in, and hand their CUDA blocks back to the driver: the transformer and the VAE get the memory
    (T5-XXL is ~9.5 GB in bf16). The next `encode_prompt` puts them back on the text-encoder device
    (`_placed`), so every call works; the cost is one host-to-device copy of the encoders per call."""
    on_cuda = any(next(m.parameters()).device.type == "cuda" for m in modules)
    for module in modules:
        module.to("cpu")
    if on_cuda:
        torch.cuda.empty_cache()


class FluxFamily(Family):
    name = "flux"
    pipeline_classes = ("FluxPipeline", "FluxFillPipeline", "FluxControlPipeline")  # conditioning.py
    default_steps = 28  # the directory's defaults (loading.run_defaults) hold schnell's 4
    default_guidance = 3.5
    backends = ("torch", "triton", "onnxruntime", "tensorrt")
    places_text_encoders = True  # honours Pipeline(text_encoder_device=...)

    def owns(self, config):
        from ldm_rt.families.flux.config import FluxModelConfig

        return isinstance(config, FluxModelConfig)

    def load(self, root, index):
        from ldm_rt.families.flux.loading import load_flux_dir

        return load_flux_dir(root, index, self.name)

    def save(self, components, root, dtype=torch.float32):
        from ldm_rt.families.flux.loading import save_flux_dir

        return save_flux_dir(components, root, dtype)

    def presets(self):
        from ldm_rt.families.flux.loading import _presets

        return _presets()

    def random_components(self, config, seed=0):
        from ldm_rt.families.flux.loading import random_flux_components

        return random_flux_components(config, seed, self.name)

    # -- sizes and layout

    def default_size(self, config):
        from ldm_rt.families.flux.loading import DEFAULT_SAMPLE_SIZE

        return DEFAULT_SAMPLE_SIZE * config.vae.scale_factor

    def latent_shape(self, config, batch, height, width):
        multiple = 2 * config.vae.scale_factor  # VAE factor x the 2x2 packing
        for name, value in (("height", height), ("width", width)):
            if value < multiple or value % multiple:
                raise InputError(f"{name} {value} must be a positive multiple of {multiple} for this FLUX.1 model "
                                 f"(VAE factor {config.vae.scale_factor} x 2x2 latent packing).")
        return (batch, config.transformer.output_channels // 4, height // config.vae.scale_factor,
                width // config.vae.scale_factor)

    def pack(self, config, noise):
        from ldm_rt.families.flux.sampling import pack_latents

        b, _, h, w = noise.shape
        return pack_latents(noise).reshape(b, h // 2, w // 2, -1)  # (B, h/2, w/2, 64)

    def unpack(self, config, latents, height, width):
        from ldm_rt.families.flux.sampling import unpack_latents

        b, gh, gw, c = latents.shape
        return unpack_latents(latents.reshape(b, gh * gw, c), 2 * gh, 2 * gw)

    def image_seq_len(self, config, latents):
        return latents.shape[1] * latents.shape[2]

    def scheduler(self, scheduler_config, steps, image_seq_len):
        from ldm_rt.families.flux.sampling import flux_scheduler

        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps must be a positive integer, got {steps!r}.")
        name = scheduler_config.get("_class_name")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ConfigError(f"scheduler class {name!r} is not supported for FLUX.1; scheduler/scheduler_config.json "
                              "must name FlowMatchEulerDiscreteScheduler.")
        return flux_scheduler(scheduler_config, steps, image_seq_len)

    def check_size(self, config, batch, height, width, guidance, device):
        """The generic limits (`ldm_rt.limits`) with FLUX.1's sizes: 16x the default side, and the
        single-stream block's activations (x, q/k/v, the 4x MLP, their concatenation: ~14 x inner_dim
        per token) or the VAE decoder's maps against the free memory."""
        from ldm_rt import limits

        default = self.default_size(config)
        for name, value in (("height", height), ("width", width)):
            if value > limits.MAX_SIDE_FACTOR * default:
                raise InputError(f"{name} {value} is larger than this model takes: at most "
                                 f"{limits.MAX_SIDE_FACTOR * default} pixels, {limits.MAX_SIDE_FACTOR}x its default "
                                 f"side of {default}; ask for a smaller size.")
        free = limits.available_memory(device)
        if free is None:
            return
        f = config.vae.scale_factor
        tokens = (height // (2 * f)) * (width // (2 * f)) + 512
        need = {"transformer": batch * tokens * config.transformer.inner_dim * 14 * limits.FP32_BYTES,
                "VAE decoder": limits.VAE_MAPS_ALIVE * batch * config.vae.block_out_channels[0] * height * width
                * limits.FP32_BYTES}
        stage, size = max(need.items(), key=lambda kv: kv[1])
        if size > free:
            raise InputError(f"{batch} image(s) of {height}x{width} would need about {size / 2**30:.1f} GiB for the "
                             f"{stage}, more than the {free / 2**30:.1f} GiB free on {device}; ask for fewer images "
                             "or a smaller size.")

    # -- sampling

    def prepare(self, pipe, prompts, negative_prompt, num_images, options):
        unknown = sorted(set(options) - {"true_cfg_scale", "max_sequence_length"})
        if unknown:
            raise InputError(f"{', '.join(unknown)} does not apply to a FLUX.1 model.")
        scale = float(options.get("true_cfg_scale", 1.0))
        if not math.isfinite(scale) or scale < 0:
            raise InputError(f"true_cfg_scale must be a finite number >= 0, got {scale}.")
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
                raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts.")
        if scale > 1 and negatives is None:
            warnings.warn(f"true_cfg_scale {scale} needs a negative prompt; without one no true CFG runs "
                          "(as in diffusers' FluxPipeline).", stacklevel=4)
        elif negatives is not None and scale <= 1:
            warnings.warn("the negative prompt is ignored: FLUX.1 uses one only with true CFG, true_cfg_scale > 1 "
                          "(--true-cfg-scale).", stacklevel=4)
            negatives = None
        length = options.get("max_sequence_length")
        if length is not None:
            length = check_max_sequence_length(length, pipe.config.transformer.guidance_embeds)
        return FluxRequest(list(prompts), negatives if scale > 1 else None, num_images, scale, length)

    def encode(self, pipe, request: FluxRequest, guidance):
        if not pipe.config.transformer.guidance_embeds and guidance != 0:
            warnings.warn(f"guidance {guidance} is ignored: this FLUX.1 model has no guidance embedder "
                          "(schnell-like); pass guidance 0 to silence this.", stacklevel=4)
        texts = request.prompts if request.negatives is None else request.negatives + request.prompts
        embeds, pooled, txt_ids = encode_prompt(pipe, texts, request.num_images, request.max_sequence_length)
        return embeds, pooled, txt_ids

    # -- image conditioning: FLUX.1 Fill (image + mask) and Control (Canny/Depth), conditioning.py

    def condition_channels(self, config):
        from ldm_rt.families.flux.conditioning import condition_channels

        return condition_channels(config.transformer)

    def condition_inputs(self, config):
        from ldm_rt.families.flux.conditioning import INPUTS, condition_kind

        return INPUTS[condition_kind(config.transformer)]

    def condition_before_noise(self, config):
        from ldm_rt.families.flux.conditioning import condition_kind

        return condition_kind(config.transformer) == "control"  # FluxControlPipeline encodes first; Fill after

    def encode_condition(self, pipe, images, generator):
        from ldm_rt.families.flux.conditioning import encode_condition

        return encode_condition(pipe, images, generator)

    def step(self, pipe, scheduler, guidance, options):
        static = dict(guidance_embeds=pipe.config.transformer.guidance_embeds,
                      true_cfg_scale=float(options.get("true_cfg_scale", 1.0)), dtype=pipe.precision.dtype)
        fn = functools.partial(flux_step, pipe.transformer, scheduler.update, **static)
        return StepFunction("flux", fn, static, batch_factor=1)  # a CFG batch is doubled inside, from the shapes

    def diffusers_transformer(self, ours, place):
        from ldm_rt.families.flux.baseline import _DiffusersFlux, diffusers_flux

        return _DiffusersFlux(place(diffusers_flux(ours)))

    def pipeline_methods(self, pipe):
        return {"encode_prompt": functools.partial(encode_prompt, pipe)}

    # -- export

    def export_specs(self, config):
        from ldm_rt.families.flux.specs import export_specs

        return export_specs(config)


FAMILY = FluxFamily()
