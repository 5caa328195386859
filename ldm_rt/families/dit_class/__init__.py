"""The class-conditional DiT (facebookresearch/DiT, diffusers' `DiTPipeline`): ImageNet class
labels -> DiT (sin-cos positions, learned sigma, no text) -> AutoencoderKL.

The family owns the recognition of `DiTPipeline` directories (converted on load through the key
maps of `ldm_rt/dit_checkpoints.py`) and of ldm-rt-layout class models, class prompts (ImageNet
names or indices), the class-label CFG step of diffusers' `DiTPipeline`, its export specs and the
`*-class` presets.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_rt.components import Components
from ldm_rt.configs import DiTConfig, ModelConfig, VAEConfig, read_json
from ldm_rt.errors import InputError, ModelDirError
from ldm_rt.families.base import Family, StepFunction
from ldm_rt.families.dit_text import LDM_RT_PIPELINE, DiTImageConditioning

DIT_PIPELINE = "DiTPipeline"
# What diffusers' DiTPipeline.__call__ defaults to.
DIT_PIPELINE_DEFAULTS = {"steps": 50, "guidance": 4.0}


def class_cfg_step(transformer, update, latents, t, coefficients, guidance, labels, condition=None, *,
                   do_cfg: bool, dtype: torch.dtype, channels: int, guided_channels: int) -> torch.Tensor:
    """One step of diffusers' `DiTPipeline`: labels are [cond; null] with CFG; the learned-variance
    half of the output is dropped, and guidance steers the first `guided_channels` latent channels.
    `condition` (B, Cc, h, w), for a DiT with condition channels: doubled as the latents are."""
    model_in = torch.cat([latents, latents]) if do_cfg else latents
    extra = {}
    if condition is not None:
        extra["condition"] = (torch.cat([condition, condition]) if do_cfg else condition).to(dtype)
    out = transformer(model_in.to(dtype), t, class_labels=labels, **extra).float()
    eps = out[:, :channels]  # (B', C, h, w): drop the learned variance
    if do_cfg:
        k = guided_channels
        cond, uncond = eps.chunk(2)
        guided = uncond[:, :k] + guidance * (cond[:, :k] - uncond[:, :k])
        eps = torch.cat([guided, cond[:, k:]], dim=1)
    return update(latents, eps, coefficients)


def check_compatible(dit: DiTConfig, vae: VAEConfig) -> None:
    """The components must agree on the shapes that pass between them."""
    problems = []
    if not dit.class_conditional:
        problems.append("a class-conditional transformer (num_classes set) goes without a text encoder, "
                        "a text-conditioned one needs one")
    if dit.in_channels != vae.latent_channels:
        problems.append(f"transformer in_channels {dit.in_channels} != vae latent_channels {vae.latent_channels}")
    if dit.condition_channels and dit.condition_channels != vae.latent_channels:  # the condition is VAE latents
        problems.append(f"transformer condition_channels {dit.condition_channels} != vae latent_channels "
                        f"{vae.latent_channels} (the condition is the encoded image)")
    if problems:
        raise ModelDirError("components do not fit together: " + "; ".join(problems) + ".")
    # out_channels is in_channels or 2 x (learned sigma): DiTConfig checks it


def class_labels(labels: torch.Tensor, num_classes: int, guidance: float) -> torch.Tensor:
    """labels (B,) -> the step's conditioning: [cond; null] (2B,) with CFG, null = num_classes."""
    return torch.cat([labels, torch.full_like(labels, num_classes)]) if guidance > 1.0 else labels


@dataclass
class ClassRequest:
    labels: torch.Tensor  # (B,) int64, each class repeated num_images times


class DiTClassFamily(DiTImageConditioning, Family):
    name = "dit-class"
    pipeline_classes = (DIT_PIPELINE, LDM_RT_PIPELINE)
    prompt_types = (str, int)

    def recognizes(self, index, root):
        name = index.get("_class_name", LDM_RT_PIPELINE)
        if name == DIT_PIPELINE:
            return True
        if name != LDM_RT_PIPELINE:
            return False
        try:  # an ldm-rt-layout directory whose transformer takes class labels
            return read_json(Path(root) / "transformer" / "config.json", "transformer config").get(
                "num_classes") is not None
        except Exception:  # a broken directory: the text family's loader reports what is wrong
            return False

    def owns(self, config):
        return isinstance(config, ModelConfig) and config.transformer.class_conditional

    def load(self, root: Path, index: dict) -> Components:
        if index.get("_class_name") == DIT_PIPELINE:  # diffusers' layout, converted on load
            from ldm_rt.families.dit_class.convert import load_dit_pipeline_dir

            return load_dit_pipeline_dir(root)
        from ldm_rt.model_dir import component_dir, load_module
        from ldm_rt.models.dit import DiT
        from ldm_rt.models.vae import AutoencoderKL

        tr_dir = component_dir(root, "transformer")
        vae_dir = component_dir(root, "vae")
        dit_config = DiTConfig.from_dict(read_json(tr_dir / "config.json", "transformer config"))
        vae_config = VAEConfig.from_dict(read_json(vae_dir / "config.json", "vae config"))
        check_compatible(dit_config, vae_config)  # class labels, no text: no text_encoder/ or tokenizer/
        transformer = load_module(DiT(dit_config), tr_dir, "transformer")
        vae = load_module(AutoencoderKL(vae_config), vae_dir, "vae")
        scheduler_config = read_json(component_dir(root, "scheduler") / "scheduler_config.json", "scheduler config")
        return Components(None, None, transformer, vae, scheduler_config, dict(index.get("_ldm_rt_defaults", {})),
                          family=self.name)

    def save(self, components, root, dtype=torch.float32):
        from ldm_rt.model_dir import write_ldm_rt_layout

        return write_ldm_rt_layout(components, root, dtype)

    def presets(self):
        from ldm_rt.configs import PRESETS

        return {k: v for k, v in PRESETS.items() if self.owns(v)}

    def random_components(self, config, seed=0):
        from ldm_rt.model_dir import randomize_
        from ldm_rt.models.dit import DiT
        from ldm_rt.models.vae import AutoencoderKL

        generator = torch.Generator("cpu").manual_seed(seed)
        transformer, vae = DiT(config.transformer), AutoencoderKL(config.vae)
        for module in (transformer, vae):
            randomize_(module, generator)
            module.eval().requires_grad_(False)
        return Components(None, None, transformer, vae, dict(config.scheduler), family=self.name)

    # -- sampling

    def prepare(self, pipe, prompts, negative_prompt, num_images, options):
        from ldm_rt.imagenet import class_index

        unknown = sorted(set(options) - {"guidance_channels"})
        if unknown:
            raise InputError(f"{', '.join(unknown)} does not apply to a class-conditional DiT.")
        if negative_prompt:
            raise InputError("a class-conditional model takes no negative prompt: guidance steers away from the "
                             "null class.")
        n = pipe.config.transformer.num_classes
        return ClassRequest(torch.tensor([class_index(p, n) for p in prompts for _ in range(num_images)]))

    def encode(self, pipe, request: ClassRequest, guidance):
        # no text: class labels index a table
        return (class_labels(request.labels, pipe.config.transformer.num_classes, guidance).to(pipe.device),)

    def step(self, pipe, scheduler, guidance, options):
        """CFG (guidance > 1): one DiT call on [latents; latents] with labels [cond; null];
        eps = uncond + g * (cond - uncond) on the first `guidance_channels` latent channels (None:
        all C, diffusers; 3: facebookresearch/DiT sample.py), the cond half's own prediction on the
        rest. DiTPipeline steps both halves and keeps the cond one; stepping only the cond half is
        the same elementwise arithmetic. The variance half of the output (channels C..2C) is dropped."""
        channels = pipe.config.transformer.in_channels
        k = options.get("guidance_channels")
        k = channels if k is None else k
        if not 1 <= k <= channels:
            raise InputError(f"guidance_channels {k} must be between 1 and the {channels} latent channels.")
        static = dict(do_cfg=guidance > 1.0, dtype=pipe.precision.dtype, channels=channels, guided_channels=k)
        fn = functools.partial(class_cfg_step, pipe.transformer, scheduler.update, **static)
        return StepFunction("class", fn, static, batch_factor=2 if static["do_cfg"] else 1)

    def sample_prompts(self, config, batch):
        return [i % config.transformer.num_classes for i in range(batch)]

    def diffusers_transformer(self, ours, place):
        from ldm_rt.families.dit_class.baseline import _HFDiT, diffusers_dit

        return _HFDiT(place(diffusers_dit(ours)))

    def pipeline_methods(self, pipe):
        num_classes = pipe.config.transformer.num_classes

        @torch.no_grad()
        def denoise_class(latents, labels, steps: int, guidance: float, guidance_channels: int | None = None,
                          progress: bool = False):
            """The sampling loop of diffusers' `DiTPipeline`, step for step. latents (B, C, h, w)
            fp32, labels (B,) int64 (see `DiTClassFamily.step`)."""
            y = class_labels(labels.to(pipe.device), num_classes, guidance)  # (2B,) or (B,)
            return pipe.denoise(latents, y, steps=steps, guidance=guidance, progress=progress,
                                guidance_channels=guidance_channels)

        def class_step(scheduler, guidance: float, guided_channels: int):
            """step(latents, i, labels) -> the latents after step i: `class_cfg_step` through `run_step`."""
            return pipe.step(scheduler, guidance, guidance_channels=guided_channels)

        return {"denoise_class": denoise_class, "class_step": class_step}

    def export_specs(self, config):
        from ldm_rt.families.dit_class.specs import export_specs

        return export_specs(config)


FAMILY = DiTClassFamily()
