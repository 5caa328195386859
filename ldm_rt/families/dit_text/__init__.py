"""ldm-rt's own text DiT: CLIP text encoder -> DiT (2D RoPE, cross-attention) -> AutoencoderKL.

The family owns the `LdmRtPipeline` directory layout (`model_dir` docstring), prompt encoding
(CLIP tokens, states, mask, pooled), the classifier-free-guidance step and its export specs.
Conventions follow diffusers so the same seed draws the same image:
- CFG: `uncond + g * (cond - uncond)`, both halves in one batched DiT call ([uncond; cond]),
  no unconditional half when g <= 1.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_rt.components import Components
from ldm_rt.configs import DiTConfig, ModelConfig, TextEncoderConfig, VAEConfig, read_json
from ldm_rt.errors import InputError, ModelDirError
from ldm_rt.families.base import Family, StepFunction

LDM_RT_PIPELINE = "LdmRtPipeline"


def text_cfg_step(transformer, update, latents, t, coefficients, guidance, text_states, text_mask, pooled,
                  condition=None, *, do_cfg: bool, dtype: torch.dtype) -> torch.Tensor:
    """latents (B, C, h, w) fp32 -> the latents after one step. t (B',) is the step's timestep,
    `coefficients` the scheduler's for the step, guidance a 0-d fp32 tensor; with CFG the text
    inputs are [uncond; cond] (B' = 2B) and the DiT runs once on [latents; latents].
    `condition` (B, Cc, h, w), for a DiT with condition channels: doubled as the latents are, and
    concatenated to them on the channel axis by the DiT (its `condition` input, before patchify)."""
    model_in = torch.cat([latents, latents]) if do_cfg else latents
    extra = {}
    if condition is not None:
        extra["condition"] = (torch.cat([condition, condition]) if do_cfg else condition).to(dtype)
    out = transformer(model_in.to(dtype), t, text_states, text_mask, pooled, **extra).float()
    if do_cfg:
        uncond, cond = out.chunk(2)
        out = uncond + guidance * (cond - uncond)
    return update(latents, out, coefficients)


def check_compatible(te: TextEncoderConfig, dit: DiTConfig, vae: VAEConfig) -> None:
    """The components must agree on the shapes that pass between them."""
    problems = []
    if dit.context_dim != te.hidden_size:
        problems.append(f"transformer context_dim {dit.context_dim} != text_encoder hidden_size {te.hidden_size}")
    if dit.pooled_dim != te.hidden_size:
        problems.append(f"transformer pooled_dim {dit.pooled_dim} != text_encoder hidden_size {te.hidden_size}")
    if dit.in_channels != vae.latent_channels:
        problems.append(f"transformer in_channels {dit.in_channels} != vae latent_channels {vae.latent_channels}")
    # The prediction is added to the latents by the scheduler step: an out_channels other than the
    # latent channels (e.g. DiT's learned-sigma 2*C) used to load and then fail mid-denoising with a
    # broadcasting traceback.
    if dit.output_channels != vae.latent_channels:
        problems.append(
            f"transformer out_channels {dit.output_channels} != vae latent_channels {vae.latent_channels}"
        )
    if dit.condition_channels and dit.condition_channels != vae.latent_channels:  # the condition is VAE latents
        problems.append(f"transformer condition_channels {dit.condition_channels} != vae latent_channels "
                        f"{vae.latent_channels} (the condition is the encoded image)")
    if problems:
        raise ModelDirError("components do not fit together: " + "; ".join(problems) + ".")


@dataclass
class TextRequest:
    cond: list[str]  # each prompt repeated num_images times, as diffusers' num_images_per_prompt
    uncond: list[str]


@torch.no_grad()
def encode_prompt(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prompts -> (text_states (B, M, D), text_mask (B, M) bool, pooled (B, D))."""
    from ldm_rt.pipeline import check_finite

    tokens = pipe.tokenizer(prompts)
    _warn_unknown_words(pipe.defaults, prompts)
    for prompt, cut in zip(prompts, tokens.truncated):
        if cut:
            warnings.warn(
                f"prompt truncated to {pipe.tokenizer.max_length} tokens, as CLIP does: {prompt[:60]!r}...",
                stacklevel=3,
            )
    ids = tokens.input_ids.to(pipe.device)
    states, pooled = pipe.text_encoder(ids)
    check_finite(states, "text encoding", pipe.precision)
    return states, tokens.attention_mask.to(pipe.device), pooled


def _warn_unknown_words(defaults: dict, prompts: list[str]) -> None:
    """A model trained on a closed caption vocabulary (the demo model's `_ldm_rt_defaults` has
    `vocabulary`) warns about words outside it: they still tokenise (byte fallback), but the
    model has never seen them, so the image will not show them. The warning names the words,
    and where the vocabulary is listed (`vocabulary_doc`). `closed_slots` (each a regex
    `pattern` with one group, its allowed `words` and `what` they are) warn about a known word
    where the grammar has no place for it ("a blue background")."""
    vocabulary = defaults.get("vocabulary")
    if not vocabulary:
        return
    known = set(vocabulary)
    doc = defaults.get("vocabulary_doc")
    where = f", listed in {doc}" if doc else ""
    for prompt in prompts:
        text = prompt.lower()
        unknown = sorted({w for w in re.findall(r"[a-z]+", text) if w not in known})
        if unknown:
            shown = ", ".join(unknown[:8]) + (", ..." if len(unknown) > 8 else "")
            warnings.warn(
                f"this model does not know the word(s) {shown} (its captions use {len(known)} words{where}); "
                "the image will not show them",
                stacklevel=4,
            )
        for slot in defaults.get("closed_slots", ()):
            allowed = slot["words"]
            wrong = sorted({m.group(1) for m in re.finditer(slot["pattern"], text)} - set(allowed))
            if wrong:
                warnings.warn(
                    f"this model knows no {slot['what']} {', '.join(wrong)} (only {', '.join(allowed)}{where}); "
                    "the image will not show it",
                    stacklevel=4,
                )


def encode_image_condition(pipe, images: dict, generator) -> torch.Tensor:
    """The DiT families' `encode_condition`: `images["image"]` (B, 3, H, W) in [-1, 1] -> scaled VAE
    latents of its posterior mean (B, C, H/f, W/f) (`Pipeline.encode`, sample_mode "argmax"), the
    layout the DiT concatenates to its latents."""
    return pipe.encode(images["image"], generator, sample_mode="argmax")


class DiTImageConditioning:
    """The image-conditioning hooks of both DiT families (`DiTConfig.condition_channels`, the
    super-resolution demo): the image, resized to the output size, encoded by the VAE (posterior
    mean: the condition is a function of the image, with no draw from the generator), in the
    latents' layout."""

    def condition_channels(self, config):
        return config.transformer.condition_channels

    def condition_inputs(self, config):
        return ("image",) if config.transformer.condition_channels else ()

    def encode_condition(self, pipe, images, generator):
        return encode_image_condition(pipe, images, generator)


class DiTTextFamily(DiTImageConditioning, Family):
    name = "dit-text"
    pipeline_classes = (LDM_RT_PIPELINE,)

    def recognizes(self, index, root):
        return index.get("_class_name", LDM_RT_PIPELINE) == LDM_RT_PIPELINE

    def owns(self, config):
        return isinstance(config, ModelConfig) and not config.transformer.class_conditional

    def load(self, root: Path, index: dict) -> Components:
        from ldm_rt.model_dir import TEXT_ENCODER_WEIGHTS, component_dir, load_module
        from ldm_rt.models.dit import DiT
        from ldm_rt.models.text_encoder import CLIPTextModel, load_text_encoder
        from ldm_rt.models.vae import AutoencoderKL
        from ldm_rt.tokenizer import CLIPTokenizer
        from ldm_rt.weights import read_safetensors

        tr_dir = component_dir(root, "transformer")
        vae_dir = component_dir(root, "vae")
        dit_config = DiTConfig.from_dict(read_json(tr_dir / "config.json", "transformer config"))
        vae_config = VAEConfig.from_dict(read_json(vae_dir / "config.json", "vae config"))
        te_dir = component_dir(root, "text_encoder")
        te_config = TextEncoderConfig.from_dict(read_json(te_dir / "config.json", "text_encoder config"))
        # Checked on the config files, before any weights are read: a config edited to a size that
        # does not fit the other components is reported as that (ModelDirError naming both values),
        # not as the weight-shape mismatch it also causes (which used to be raised first).
        check_compatible(te_config, dit_config, vae_config)

        text_encoder = CLIPTextModel(te_config)
        load_text_encoder(text_encoder, read_safetensors(te_dir / TEXT_ENCODER_WEIGHTS, "text_encoder"))
        tokenizer = CLIPTokenizer.from_dir(component_dir(root, "tokenizer"),
                                           max_length=te_config.max_position_embeddings)
        if tokenizer.vocab_size > te_config.vocab_size:
            raise ModelDirError(
                f"the tokenizer produces ids up to {tokenizer.vocab_size - 1} but the text encoder's vocab_size "
                f"is {te_config.vocab_size}; the tokenizer/ folder does not belong to this text encoder."
            )
        transformer = load_module(DiT(dit_config), tr_dir, "transformer")
        vae = load_module(AutoencoderKL(vae_config), vae_dir, "vae")
        scheduler_config = read_json(component_dir(root, "scheduler") / "scheduler_config.json", "scheduler config")
        text_encoder.eval().requires_grad_(False)
        return Components(text_encoder, tokenizer, transformer, vae, scheduler_config,
                          dict(index.get("_ldm_rt_defaults", {})), family=self.name)

    def save(self, components, root, dtype=torch.float32):
        from ldm_rt.model_dir import write_ldm_rt_layout

        return write_ldm_rt_layout(components, root, dtype)

    def presets(self):
        from ldm_rt.configs import PRESETS

        return {k: v for k, v in PRESETS.items() if self.owns(v)}

    def random_components(self, config, seed=0):
        from ldm_rt.model_dir import randomize_
        from ldm_rt.models.dit import DiT
        from ldm_rt.models.text_encoder import CLIPTextModel
        from ldm_rt.models.vae import AutoencoderKL
        from ldm_rt.tokenizer import CLIPTokenizer

        generator = torch.Generator("cpu").manual_seed(seed)
        modules = CLIPTextModel(config.text_encoder), DiT(config.transformer), AutoencoderKL(config.vae)
        for module in modules:
            randomize_(module, generator)
            module.eval().requires_grad_(False)
        te = config.text_encoder
        tokenizer = CLIPTokenizer.byte_level(
            te.bos_token_id, te.eos_token_id, te.pad_token_id, te.max_position_embeddings, vocab_size=te.vocab_size
        )
        return Components(modules[0], tokenizer, modules[1], modules[2], dict(config.scheduler), family=self.name)

    # -- sampling

    def prepare(self, pipe, prompts, negative_prompt, num_images, options):
        if options:
            raise InputError(f"{', '.join(options)} does not apply to ldm-rt's text DiT.")
        negatives = ([negative_prompt or ""] * len(prompts) if not isinstance(negative_prompt, list)
                     else negative_prompt)
        if len(negatives) != len(prompts):
            raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts.")
        return TextRequest(cond=[p for p in prompts for _ in range(num_images)],
                           uncond=[n for n in negatives for _ in range(num_images)])

    def encode(self, pipe, request: TextRequest, guidance):
        do_cfg = guidance > 1.0
        return encode_prompt(pipe, request.uncond + request.cond if do_cfg else request.cond)

    def step(self, pipe, scheduler, guidance, options):
        static = dict(do_cfg=guidance > 1.0, dtype=pipe.precision.dtype)
        fn = functools.partial(text_cfg_step, pipe.transformer, scheduler.update, **static)
        return StepFunction("text", fn, static, batch_factor=2 if static["do_cfg"] else 1)

    def sample_prompts(self, config, batch):
        return ["a red circle on the left"] * batch

    def diffusers_transformer(self, ours, place):
        return ("diffusers has no implementation of ldm-rt's text-conditioned DiT (RoPE, cross-attention); "
                "only class-conditional DiTs map onto DiTTransformer2DModel")

    def pipeline_methods(self, pipe):
        def text_step(scheduler, guidance: float):
            """step(latents, i, text_states, text_mask, pooled) -> the latents after step i."""
            return pipe.step(scheduler, guidance)

        return {"encode_prompt": functools.partial(encode_prompt, pipe), "text_step": text_step}

    def export_specs(self, config):
        from ldm_rt.families.dit_text.specs import export_specs

        return export_specs(config)


FAMILY = DiTTextFamily()
