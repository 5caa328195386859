"""Prompt -> conditioning -> denoising loop -> VAE decoder, for any model family.

The loop is generic; what differs between families (prompt encoding, the step function with its
guidance, the latent layout, defaults) is asked from the model's `Family` (`ldm_rt/families/`).
Conventions follow diffusers so the same seed draws the same image:
- initial latents: `torch.randn(family.latent_shape(...), generator=torch.Generator("cpu").manual_seed(seed))`
  in fp32 on the CPU, then moved to the device and packed into the transformer's layout;
- images: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.

Image-to-image and inpainting (`image=`, `strength=`, `mask_image=`) follow diffusers' flow-matching
img2img/inpaint pipelines (FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline/InpaintPipeline),
and their DDPM-family ones for a DDIM scheduler:
- one generator: the VAE's latent sample is drawn first, then the noise (so strength 1 starts from
  other noise than text-to-image with the same seed, as in diffusers);
- the schedule's tail from `scheduler.img2img_start(strength)`, its first latents
  `scheduler.add_noise(image_latents, noise, start)` (diffusers' `scale_noise` / `add_noise`);
- inpainting for a model not trained for it: after every step the known region is put back,
  `latents = (1 - mask) * add_noise(image_latents, noise, next) + mask * latents`, the clean image
  latents after the last step.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_rt import call_args
from ldm_rt.backends import load_backend
from ldm_rt.errors import InputError, NonFiniteError
from ldm_rt.precision import Precision
from ldm_rt.schedulers import check_strength
from ldm_rt.seeds import resolve_seed

# What a family without defaults of its own samples with (`Family.default_steps`/`default_guidance`).
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 4.0
# diffusers' default strength in its flow-matching img2img/inpaint pipelines (Flux, SD3).
DEFAULT_STRENGTH = 0.6


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    steps: int | None = None  # the steps and guidance the call ran with (after the model's defaults)
    guidance: float | None = None
    strength: float | None = None  # image-to-image: the strength it ran with (None: text-to-image)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: CUDA when available, else CPU. A CUDA device without CUDA is an InputError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a valid torch device; use cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for but this machine has no CUDA GPU; use device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device {device} is not supported; use cpu or cuda.")
    return device


def check_finite(x: torch.Tensor, stage: str, precision: Precision) -> None:
    if not torch.isfinite(x).all():
        hint = " (fp16 overflow? try dtype bf16 or fp32)" if precision is Precision.FP16 else ""
        raise NonFiniteError(f"{stage} produced NaN or Inf values{hint}.")


def seeded_latents(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial noise `Pipeline.generate` draws for `seed`: fp32, on the CPU, as diffusers. A
    caller batching several seeds (ldm_rt.serve) concatenates one draw per seed and passes the
    result as `generate(latents=...)`, so each image equals an unbatched call with its own seed."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, as diffusers' `VaeImageProcessor` does."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    arr = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


class Pipeline:
    """Text-to-image (or class-to-image) with a latent diffusion transformer. Build with
    `Pipeline.from_pretrained(path)`.

    Attributes: `text_encoder`, `transformer`, `vae` (backend callables with the reference
    modules' signatures), `graphs` (every exported graph by spec name, on the backends that run
    graphs; empty on torch and triton, see `ldm_rt.backends`), `tokenizer`, `scheduler` (the scheduler config dict from
    `scheduler/scheduler_config.json`; a fresh pure scheduler is made from it for each call),
    `family` (the model's `Family`), and the family's own helpers (`Family.pipeline_methods`:
    `encode_prompt` for a text DiT, `denoise_class` for a class DiT).
    """

    def __init__(self, components, backend: str = "torch", device=None, dtype=None, onnx_dir=None,
                 text_encoder_device=None, release_text_encoders: bool = False):
        from ldm_rt import families

        self._components, self._onnx_dir = components, onnx_dir  # for `to()`
        self._text_encoder_device = text_encoder_device
        self._path = getattr(self, "_path", None)
        self.device = resolve_device(device)
        self.precision = Precision.parse(dtype) or Precision.default_for(self.device)
        # torch's CPU fp16 kernels are incomplete; onnxruntime's CPU provider runs fp16 graphs.
        if self.device.type == "cpu" and self.precision is Precision.FP16 and backend != "onnxruntime":
            raise InputError("fp16 is not supported on the CPU; use dtype fp32 or bf16 there.")
        self.backend = backend
        self.family = families.for_components(components)
        if self.family.backends is not None and backend not in self.family.backends:
            raise InputError(f"{self.family.name} models run on backend {' or '.join(self.family.backends)} in this "
                             f"version of ldm-rt, not {backend}; use backend {self.family.backends[0]}.")
        self.text_encoder_device = self._resolve_text_encoder_device(text_encoder_device)
        if release_text_encoders and not self.family.places_text_encoders:
            raise InputError(f"release_text_encoders does not apply to {self.family.name} models: their text encoder "
                             "runs through the backend, on the pipeline's device.")
        self.release_text_encoders = bool(release_text_encoders)
        self.components = components  # the reference modules (a family's extra encoders are read here)
        self.config = components.config
        self.defaults = dict(components.defaults)
        runtime = load_backend(backend, components, self.device, self.precision, onnx_dir=onnx_dir)
        self.text_encoder = runtime.text_encoder
        self.transformer = runtime.transformer
        self.vae = runtime.vae
        self.vae_dtype = runtime.vae_dtype
        self.run_step = runtime.run_step
        self.graphs = runtime.graphs  # spec name -> graph, on backends that run exported graphs
        if self.graphs and self.text_encoder_device != self.device:
            raise InputError(f"text_encoder_device {self.text_encoder_device} applies where the reference text encoders "
                             f"run (backend torch); backend {backend} runs their graphs on {self.device}.")
        self.tokenizer = components.tokenizer
        self.scheduler = dict(components.scheduler_config)
        for name, method in self.family.pipeline_methods(self).items():
            setattr(self, name, method)

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "torch", device=None, dtype=None,
                        text_encoder_device=None, release_text_encoders: bool = False) -> Pipeline:
        """`text_encoder_device`: where a family that runs its own text encoders (FLUX.1's CLIP and
        T5) keeps them: "same" or None (the pipeline's device), "cpu" (frees the GPU memory of T5-XXL,
        ~9.5 GB in bf16, for the transformer) or "cuda". `release_text_encoders`: such a family
        moves them back to the CPU after each encoding (their device memory is freed while the
        transformer runs) and onto `text_encoder_device` again at the next call."""
        from ldm_rt.model_dir import load_model_dir

        pipe = cls.__new__(cls)
        pipe._path = Path(path)
        pipe.__init__(load_model_dir(path), backend=backend, device=device, dtype=dtype,
                      text_encoder_device=text_encoder_device, release_text_encoders=release_text_encoders)
        return pipe

    def _resolve_text_encoder_device(self, value) -> torch.device:
        if value is None or value == "same":
            return self.device
        device = resolve_device(value)
        if device != self.device and not self.family.places_text_encoders:
            raise InputError(f"text_encoder_device does not apply to {self.family.name} models: their text encoder "
                             "runs through the backend, on the pipeline's device.")
        return device

    # -- derived sizes ---------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return self.config.vae.scale_factor

    @property
    def default_size(self) -> int:
        """Image side in pixels when neither the call nor the model's defaults give one."""
        return self.family.default_size(self.config)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The shape of the noise drawn for `batch` images (the family's; InputError on a bad size)."""
        return self.family.latent_shape(self.config, batch, height, width)

    # -- stages ----------------------------------------------------------------------------------

    def make_scheduler(self, latents, steps: int):
        """The pure scheduler of a `steps`-step call on `latents` (transformer layout)."""
        seq_len = self.family.image_seq_len(self.config, latents)
        return self.family.scheduler(self.scheduler, steps, seq_len)

    @torch.no_grad()
    def denoise(self, latents, *conditioning, steps: int, guidance: float, progress: bool = False, callback=None,
                start: int = 0, scheduler=None, after_step=None, **options):
        """The sampling loop. latents in the transformer's layout, fp32; `conditioning` the
        family's tensors (`Family.encode`: for a text DiT (text_states, text_mask, pooled), each
        [uncond; cond] when g > 1); `options` the family's step options (guidance_channels).
        Image-to-image runs steps `start`..steps-1 of the schedule (`scheduler`, made by
        `make_scheduler` when None); `after_step(i, latents) -> latents` runs after step i, before
        the user's callback (inpainting's blend, as diffusers orders them).

        Latents stay in fp32 between steps (the scheduler update is computed in fp32); only the
        transformer runs in the pipeline's dtype.
        """
        from tqdm.auto import tqdm

        scheduler = self.make_scheduler(latents, steps) if scheduler is None else scheduler
        step = self.step(scheduler, guidance, **options)
        for i in tqdm(range(start, steps), desc="denoising", disable=not progress, leave=False):
            latents = step(latents, i, *conditioning)
            if after_step is not None:
                latents = after_step(i, latents)
            if callback is not None:  # callback(i, timestep, latents) -> latents (call_args.step_callback)
                latents = callback(i - start, scheduler.timesteps[i], latents)  # diffusers counts the run steps
        check_finite(latents, "denoising", self.precision)
        return latents

    def step(self, scheduler, guidance: float, **options):
        """step(latents, i, *conditioning) -> the latents after step i of `scheduler`: the
        family's pure step function (`Family.step`) run through the backend's `run_step`."""
        fn = self.family.step(self, scheduler, guidance, options)
        # The key names all that `fn` holds besides its tensor arguments: the step kind, the
        # transformer (bench swaps it), the scheduler's update and the static settings.
        key = (fn.kind, id(self.transformer), scheduler.update_key, tuple(fn.static.items()))
        # The schedule moves to the device once, not once per step
        timesteps = scheduler.timesteps.to(self.device)  # (steps,)
        coefficients = torch.stack([scheduler.coefficients(i) for i in range(scheduler.num_steps)]).to(self.device)
        g = torch.tensor(guidance, dtype=torch.float32, device=self.device)

        def step(latents, i, *conditioning):
            t = timesteps[i].expand(fn.batch_factor * latents.shape[0])
            return self.run_step(key, fn.fn, latents, t, coefficients[i], g, *conditioning)

        return step

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample_mode: str = "sample") -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), fp32 on the device, as
        diffusers' img2img pipelines: `retrieve_latents` ("sample": mean + std * randn drawn from
        `generator`, the default of FluxImg2ImgPipeline and StableDiffusion3Img2ImgPipeline;
        "argmax": the mean), then `(z - shift_factor) * scaling_factor`.

        A backend without an encoder graph (onnxruntime, tensorrt export the decoder only) encodes
        with the reference module, eager, where it lives."""
        if sample_mode not in ("sample", "argmax"):
            raise InputError(f"sample_mode {sample_mode!r} is not one of sample, argmax.")
        encoder = getattr(self.vae, "encode", None)
        if encoder is None:
            module = self.components.vae
            weight = next(module.parameters())
            mean, logvar = module.encode(images.to(device=weight.device, dtype=weight.dtype))
        else:
            mean, logvar = encoder(images.to(device=self.device, dtype=self.vae_dtype))
        mean, logvar = mean.float().to(self.device), logvar.float().to(self.device)
        check_finite(mean, "VAE encoding", self.precision)
        z = mean
        if sample_mode == "sample":
            generator = torch.Generator("cpu").manual_seed(0) if generator is None else generator
            eps = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
            z = mean + torch.exp(0.5 * logvar) * eps.to(self.device)  # DiagonalGaussianDistribution.sample
        vae = self.config.vae
        if vae.shift_factor is not None:
            z = z - vae.shift_factor
        return z * vae.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> image in [-1, 1] (B, 3, H, W), applying the VAE config's scaling/shift."""
        vae = self.config.vae
        z = latents / vae.scaling_factor
        if vae.shift_factor is not None:
            z = z + vae.shift_factor
        image = self.vae.decode(z.to(self.vae_dtype))
        check_finite(image, "VAE decoding", self.precision)
        return image

    # -- the whole job ---------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = 0,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        progress: bool = False,
        guidance_channels: int | None = None,
        true_cfg_scale: float | None = None,
        max_sequence_length: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        image=None,
        strength: float | None = None,
        mask_image=None,
        control_image=None,
        **diffusers_names,
    ) -> GenerationResult:
        """Text models: prompts are text. Class-conditional models: prompts are ImageNet class names
        or indices ("golden retriever", "207", 207), and `guidance_channels` picks how many latent
        channels CFG steers (None: all, as diffusers' DiTPipeline; 3: the original DiT sample.py).
        FLUX.1: `guidance` is the embedded guidance (dev); `true_cfg_scale` > 1 with a
        `negative_prompt` runs diffusers' true CFG; `max_sequence_length` (1..512) is the T5 token
        count prompts are padded or truncated to (default: the model's, 256 schnell / 512 dev).
        `latents` (B, C, h, w), as diffusers' argument of that name: the initial noise, instead of
        `seeded_latents(shape, seed)`.

        `seed`: 0..2**64-1; None draws a fresh one, returned as `GenerationResult.seed`.
        diffusers' names and arguments (num_inference_steps, guidance_scale, generator, latents,
        output_type, callback_on_step_end): see `ldm_rt.call_args`.

        Image-to-image: `image` (PIL image, file path, or tensor (B, 3, H, W) in [0, 1]), `strength`
        in (0, 1] (default 0.6, diffusers' Flux/SD3 default; 1 redraws everything); the size
        defaults to the image's, rounded down to the model's multiple, and the image is resized to
        height x width otherwise. `mask_image` (same size as `image`; white = repaint) inpaints:
        the black region keeps the image. See `ldm_rt.image_input` and the module docstring.

        A model with condition channels (`Family.condition_channels` > 0: the super-resolution
        demo, FLUX.1 Fill/Control) requires the image roles it names (`Family.condition_inputs`:
        `image`, `mask_image`, `control_image`) as conditioning, not as a start to blend back;
        `strength` then defaults to 1.0 (from noise), and the size to the first role's times the
        model's `upscale` default (2 for the super-resolution demo). See `ldm_rt.families.base`."""
        if diffusers_names:
            unknown = [k for k in diffusers_names if k not in call_args.ALIASES]
            if unknown:
                raise TypeError(f"generate() got unexpected keyword argument(s) {', '.join(unknown)}")
            given = call_args.normalize(dict(diffusers_names, steps=steps, guidance=guidance,
                                              num_images=None if num_images == 1 else num_images))
            steps, guidance, num_images = given["steps"], given["guidance"], given["num_images"] or 1
        call_args.check(output_type, generator, seed, latents, callback_on_step_end, callback_on_step_end_tensor_inputs)
        hooks = dict(generator=generator, latents=latents, output_type=output_type,
                     callback=call_args.step_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs))
        family = self.family
        prompts = [prompt] if isinstance(prompt, (str, int)) else list(prompt)
        steps = self.defaults.get("steps", family.default_steps) if steps is None else steps
        guidance = self.defaults.get("guidance", family.default_guidance) if guidance is None else guidance
        init = self._image_input(image, strength, mask_image, latents, control_image)
        if init is not None and height is None:  # the image's size, rounded down (diffusers)
            height = init.default_size[0]
        if init is not None and width is None:
            width = init.default_size[1]
        # `is None`, not `or`: an explicit 0 must reach latent_shape's check (InputError), not be
        # replaced silently by the default size (`--height 0` used to give a default-size image).
        height = self.defaults.get("height", self.default_size) if height is None else height
        width = self.defaults.get("width", self.default_size) if width is None else width
        if not prompts or not all(isinstance(p, family.prompt_types) for p in prompts):
            raise InputError("prompt must be a string or a non-empty list of strings.")
        if int(steps) != steps or steps < 1:
            raise InputError(f"steps must be a whole number >= 1, got {steps}.")
        if not math.isfinite(guidance) or guidance < 0:
            raise InputError(f"guidance must be a finite number >= 0, got {guidance}.")
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}.")
        # The family-specific arguments, passed on only when given.
        options = {k: v for k, v in dict(guidance_channels=guidance_channels, true_cfg_scale=true_cfg_scale,
                                         max_sequence_length=max_sequence_length).items() if v is not None}
        seed = resolve_seed(seed) if generator is None else generator.initial_seed()
        if init is not None:
            hooks["init"] = init
        return self._sample(prompts, negative_prompt, int(steps), float(guidance), seed, height, width, num_images,
                            progress, options, **hooks)

    def _image_input(self, image, strength, mask_image, latents, control_image=None) -> _ImageInput | None:
        """Check generate's image arguments (cheap: no model call); None for text-to-image."""
        from ldm_rt import image_input

        if self.family.condition_channels(self.config) > 0:
            return self._condition_input(image, strength, mask_image, control_image, latents)
        if control_image is not None:
            raise InputError("control_image applies to a model with condition channels (e.g. FLUX.1 Canny/Depth); "
                             "this model takes none.")
        if image is None:
            for name, value in (("strength", strength), ("mask_image", mask_image)):
                if value is not None:
                    raise InputError(f"{name} applies to image-to-image; give an image too (image=..., --image).")
            return None
        if latents is not None:
            raise InputError("give image or latents, not both: with an image the starting latents come from it.")
        strength = DEFAULT_STRENGTH if strength is None else check_strength(strength)
        picture = image_input.open_image(image, "image")
        mask = None if mask_image is None else image_input.open_image(mask_image, "mask_image", mask=True)
        size = image_input.image_size(picture)
        if mask is not None and image_input.image_size(mask) != size:
            h, w = image_input.image_size(mask)
            raise InputError(f"mask_image is {w}x{h} but image is {size[1]}x{size[0]}; give a mask of the image's "
                             "size (white = repaint).")
        multiple = self.family.size_multiple(self.config)
        default = image_input.default_size(picture, multiple)
        if min(default) < multiple:
            raise InputError(f"image is {size[1]}x{size[0]}, smaller than this model's size multiple {multiple}; "
                             f"give an image at least {multiple}x{multiple}, or height and width.")
        return _ImageInput(picture, mask, strength, default)

    def _condition_input(self, image, strength, mask_image, control_image, latents) -> _ImageInput:
        """generate's image arguments for a model with condition channels: every role of
        `condition_inputs` given, no other; strength 1.0 by default, < 1 only with an `image` role."""
        from ldm_rt import image_input

        roles = self.family.condition_inputs(self.config)
        given = {"image": image, "mask_image": mask_image, "control_image": control_image}
        flag = {"image": "--image", "mask_image": "--mask", "control_image": "--control-image"}
        needs = ", ".join(f"{r}= ({flag[r]})" for r in roles)
        for role in roles:
            if given[role] is None:
                raise InputError(f"this model is conditioned on {needs}; give {role}= ({flag[role]}).")
        for role, value in given.items():
            if value is not None and role not in roles:
                raise InputError(f"{role} does not apply to this model: it is conditioned on {needs} only.")
        strength = 1.0 if strength is None else check_strength(strength)
        if strength < 1.0 and "image" not in roles:
            raise InputError(f"strength {strength} < 1 starts from an image, and this model takes none "
                             f"(it is conditioned on {needs}); leave strength at 1.")
        if latents is not None and strength < 1.0:
            raise InputError("give latents or strength < 1, not both: strength < 1 starts from the image.")
        pictures = {r: image_input.open_image(given[r], r, mask=r == "mask_image") for r in roles}
        first = pictures[roles[0]]
        size = image_input.image_size(first)
        for role, picture in pictures.items():
            if image_input.image_size(picture) != size:
                h, w = image_input.image_size(picture)
                raise InputError(f"{role} is {w}x{h} but {roles[0]} is {size[1]}x{size[0]}; give them one size.")
        upscale = self.defaults.get("upscale", 1)
        multiple = self.family.size_multiple(self.config)
        default = (size[0] * upscale - size[0] * upscale % multiple, size[1] * upscale - size[1] * upscale % multiple)
        if min(default) < multiple:
            raise InputError(f"{roles[0]} is {size[1]}x{size[0]}, too small for this model's size multiple {multiple}"
                             + (f" at {upscale}x" if upscale != 1 else "") + "; give a larger image, or height and width.")
        start = pictures.get("image") if latents is None else None
        return _ImageInput(start, None, strength, default, conditions=pictures)

    def _start_latents(self, init: _ImageInput, shape, steps, seed, generator, height, width):
        """Image-to-image's starting point (transformer layout) and its inpainting blend."""
        from ldm_rt import image_input

        family, batch = self.family, shape[0]
        generator = torch.Generator("cpu").manual_seed(seed) if generator is None else generator
        pixels = image_input.preprocess(init.image, height, width)
        image_latents = family.encode_image(self, pixels, generator)  # draws the VAE sample first
        if init.conditions and tuple(image_latents.shape[2:]) != tuple(shape[2:]):
            raise InputError(f"the image encodes to latents {tuple(image_latents.shape[1:])}, but this call "
                             f"samples {tuple(shape[1:])}; the VAE does not fit the transformer.")
        if init.conditions:  # a Fill-like model: the start image may have more channels than drawn
            image_latents = image_latents[:, : shape[1]]
        if tuple(image_latents.shape[1:]) != tuple(shape[1:]):
            raise InputError(f"the image encodes to latents {tuple(image_latents.shape[1:])}, but this call "
                             f"samples {tuple(shape[1:])}; the VAE does not fit the transformer.")
        image_latents = image_input.tile(image_latents, batch, "image")
        noise = call_args.initial_latents(shape, seed, generator, None, self.device)  # then the noise
        x0, noise = family.pack(self.config, image_latents), family.pack(self.config, noise)
        scheduler = self.make_scheduler(x0, steps)
        start = scheduler.img2img_start(init.strength)
        latents = scheduler.add_noise(x0, noise, start)
        after_step = None
        if init.mask is not None:
            mask = image_input.tile(image_input.preprocess(init.mask, height, width, mask=True), batch, "mask_image")
            mask = family.pack(self.config, family.mask_latents(self.config, mask, shape)).to(self.device)
            last = scheduler.num_steps - 1

            def after_step(i, latents):  # diffusers' inpaint blend for a model without mask inputs
                known = x0 if i == last else scheduler.add_noise(x0, noise, i + 1)
                return (1 - mask) * known + mask * latents

        return latents, dict(start=start, scheduler=scheduler, after_step=after_step)

    def _condition(self, init: _ImageInput, batch: int, height: int, width: int, generator) -> torch.Tensor:
        """The roles' pixels at the output size, tiled to the batch -> `Family.encode_condition`."""
        from ldm_rt import image_input

        pixels = {role: image_input.tile(image_input.preprocess(picture, height, width, mask=role == "mask_image"),
                                         batch, role)
                  for role, picture in init.conditions.items()}
        condition = self.family.encode_condition(self, pixels, generator).float().to(self.device)
        check_finite(condition, "condition encoding", self.precision)
        return condition

    def _sample(self, prompts, negative_prompt, steps, guidance, seed, height, width, num_images, progress,
                options, generator=None, latents=None, output_type="pil", callback=None,
                init: _ImageInput | None = None) -> GenerationResult:
        """The family's part of `generate`, once the arguments are checked."""
        family = self.family
        request = family.prepare(self, prompts, negative_prompt, num_images, options)
        shape = family.latent_shape(self.config, len(prompts) * num_images, height, width)
        family.check_size(self.config, shape[0], height, width, guidance, self.device)
        timings: dict[str, float] = {}
        with _stage("text_encoding", self.device, timings):
            conditioning = family.encode(self, request, guidance)
        loop: dict = {}
        conditioned = init is not None and bool(init.conditions)
        before = conditioned and family.condition_before_noise(self.config)
        if conditioned:
            generator = torch.Generator("cpu").manual_seed(seed) if generator is None else generator
            if before:
                with _stage("condition_encoding", self.device, timings):
                    conditioning = (*conditioning, self._condition(init, shape[0], height, width, generator))
        if init is None or init.image is None:
            noise = call_args.initial_latents(shape, seed, generator, latents, self.device)
            latents = family.pack(self.config, noise)
        else:
            with _stage("image_encoding", self.device, timings):
                latents, loop = self._start_latents(init, shape, steps, seed, generator, height, width)
        if conditioned and not before:
            with _stage("condition_encoding", self.device, timings):
                conditioning = (*conditioning, self._condition(init, shape[0], height, width, generator))
        with _stage("denoising", self.device, timings):
            latents = self.denoise(latents, *conditioning, steps=steps, guidance=guidance, progress=progress,
                                   callback=callback, **loop, **options)
        latents = family.unpack(self.config, latents, height, width)
        with _stage("decoding", self.device, timings):
            images = latents if output_type == "latent" else call_args.to_output(self.decode(latents), output_type,
                                                                                 to_pil)
        return GenerationResult(images=images, seed=seed, timings=timings, steps=steps, guidance=guidance,
                                strength=None if init is None else init.strength)

    def __call__(self, prompt, **kwargs):
        """`generate(...).images`: PIL images, or the `output_type`'s array/tensor (`ldm_rt.call_args`)."""
        return self.generate(prompt, **kwargs).images

    def to(self, device=None, dtype=None) -> Pipeline:
        """diffusers' `pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cuda", torch.bfloat16)`:
        the same model on another device/dtype (same backend). Weights are reloaded from the model
        directory when the pipeline was made by `from_pretrained`, so a round trip through fp16
        loses nothing."""
        if isinstance(device, torch.dtype) and dtype is None:
            device, dtype = None, device
        device = self.device if device is None else device
        precision = self.precision if dtype is None else Precision.parse(dtype)
        if self._path is not None:
            from ldm_rt.model_dir import load_model_dir

            components = load_model_dir(self._path)
        else:
            components = self._components
        self.__init__(components, backend=self.backend, device=device, dtype=precision, onnx_dir=self._onnx_dir,
                      text_encoder_device=self._text_encoder_device, release_text_encoders=self.release_text_encoders)
        return self


@dataclass(frozen=True)
class _ImageInput:
    """generate's checked image arguments (`image_input.open_image` results)."""

    image: object
    mask: object | None
    strength: float
    default_size: tuple[int, int]  # (height, width): the image's, rounded down to the size multiple
    # a model with condition channels: {role: open_image result}; `image` is then the start image
    # (None: start from noise)
    conditions: dict = field(default_factory=dict)


@contextlib.contextmanager
def _stage(name: str, device: torch.device, timings: dict[str, float]):
    """Record the wall-clock seconds of one stage into timings[name] (syncing CUDA first)."""
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = time.perf_counter() - start
