"""Text encoder -> DiT denoising loop with classifier-free guidance -> VAE decoder.

Conventions follow diffusers so the same seed draws the same image:
- initial latents: `torch.randn((B, C, h, w), generator=torch.Generator("cpu").manual_seed(seed))`
  in fp32 on the CPU, then moved to the device;
- CFG: `uncond + g * (cond - uncond)`, both halves in one batched DiT call ([uncond; cond]),
  no unconditional half when g <= 1;
- images: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.

A class-conditional DiT (ImageNet classes as prompts) samples as diffusers' `DiTPipeline` does:
see `denoise_class`.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_rt.backends import load_backend
from ldm_rt.errors import InputError, NonFiniteError
from ldm_rt.precision import Precision
from ldm_rt.schedulers import scheduler_from_config

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 4.0


# ------------------------------------------------------------------------------ one denoising step
# Pure tensor functions with no host sync, handed to the backend's `run_step` so the triton
# backend can capture a whole step (DiT, CFG, scheduler update) in one CUDA graph. Everything
# not a tensor is bound before (functools.partial) and named in the step's cache key.


def text_cfg_step(transformer, update, latents, t, coefficients, guidance, text_states, text_mask, pooled, *,
                  do_cfg: bool, dtype: torch.dtype) -> torch.Tensor:
    """latents (B, C, h, w) fp32 -> the latents after one step. t (B',) is the step's timestep,
    `coefficients` the scheduler's for the step, guidance a 0-d fp32 tensor; with CFG the text
    inputs are [uncond; cond] (B' = 2B) and the DiT runs once on [latents; latents]."""
    model_in = torch.cat([latents, latents]) if do_cfg else latents
    out = transformer(model_in.to(dtype), t, text_states, text_mask, pooled).float()
    if do_cfg:
        uncond, cond = out.chunk(2)
        out = uncond + guidance * (cond - uncond)
    return update(latents, out, coefficients)


def class_cfg_step(transformer, update, latents, t, coefficients, guidance, labels, *, do_cfg: bool,
                   dtype: torch.dtype, channels: int, guided_channels: int) -> torch.Tensor:
    """`text_cfg_step` for a class-conditional DiT (see `Pipeline.denoise_class`): labels are
    [cond; null] with CFG; the learned-variance half of the output is dropped, and guidance
    steers the first `guided_channels` latent channels."""
    model_in = torch.cat([latents, latents]) if do_cfg else latents
    out = transformer(model_in.to(dtype), t, class_labels=labels).float()
    eps = out[:, :channels]  # (B', C, h, w): drop the learned variance
    if do_cfg:
        k = guided_channels
        cond, uncond = eps.chunk(2)
        guided = uncond[:, :k] + guidance * (cond[:, :k] - uncond[:, :k])
        eps = torch.cat([guided, cond[:, k:]], dim=1)
    return update(latents, eps, coefficients)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: CUDA when available, else CPU. A CUDA device without CUDA is an InputError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r} is not a valid torch device; use cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for but this machine has no CUDA GPU; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device {device} is not supported; use cpu or cuda.")
    return device


def check_finite(x: torch.Tensor, stage: str, precision: Precision) -> None:
    if not torch.isfinite(x).all():
        hint = " (fp16 overflow? try --dtype bf16 or fp32)" if precision is Precision.FP16 else ""
        raise NonFiniteError(f"{stage} produced NaN or Inf values{hint}.")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, as diffusers' `VaeImageProcessor` does."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    arr = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


class Pipeline:
    """Text-to-image with a DiT. Build with `Pipeline.from_pretrained(path)`.

    Attributes: `text_encoder`, `transformer`, `vae` (backend callables with the reference
    modules' signatures), `tokenizer`, `scheduler` (the scheduler config dict from
    `scheduler/scheduler_config.json`; a fresh pure scheduler is made from it for each call).
    """

    def __init__(self, components, backend: str = "torch", device=None, dtype=None, onnx_dir=None):
        self.device = resolve_device(device)
        self.precision = Precision.parse(dtype) or Precision.default_for(self.device)
        # torch's CPU fp16 kernels are incomplete; onnxruntime's CPU provider runs fp16 graphs.
        if self.device.type == "cpu" and self.precision is Precision.FP16 and backend != "onnxruntime":
            raise InputError("fp16 is not supported on the CPU; use --dtype fp32 or bf16 there.")
        self.backend = backend
        self.config = components.config
        self.defaults = dict(components.defaults)
        runtime = load_backend(backend, components, self.device, self.precision, onnx_dir=onnx_dir)
        self.text_encoder = runtime.text_encoder
        self.transformer = runtime.transformer
        self.vae = runtime.vae
        self.vae_dtype = runtime.vae_dtype
        self.run_step = runtime.run_step
        self.tokenizer = components.tokenizer
        self.scheduler = dict(components.scheduler_config)

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "torch", device=None, dtype=None) -> Pipeline:
        from ldm_rt.model_dir import load_model_dir

        return cls(load_model_dir(path), backend=backend, device=device, dtype=dtype)

    # -- derived sizes ---------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return self.config.vae.scale_factor

    @property
    def default_size(self) -> int:
        """Image side in pixels when neither the call nor the model's defaults give one."""
        return self.config.transformer.sample_size * self.vae_scale_factor

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        multiple = self.vae_scale_factor * self.config.transformer.patch_size
        for name, value in (("height", height), ("width", width)):
            if value < multiple or value % multiple:
                raise InputError(
                    f"{name} {value} must be a positive multiple of {multiple} "
                    f"(VAE factor {self.vae_scale_factor} x patch size {self.config.transformer.patch_size})."
                )
        f = self.vae_scale_factor
        return (batch, self.config.transformer.in_channels, height // f, width // f)

    # -- stages ----------------------------------------------------------------------------------

    def _warn_unknown_words(self, prompts: list[str]) -> None:
        """A model trained on a closed caption vocabulary (the demo model's `_ldm_rt_defaults`
        has `vocabulary`) warns about words outside it: they still tokenise (byte fallback), but
        the model has never seen them, so the image will not show them. The warning names the
        words, and where the vocabulary is listed (`vocabulary_doc`). `closed_slots` (each a
        regex `pattern` with one group, its allowed `words` and `what` they are) warn about a
        known word where the grammar has no place for it ("a blue background")."""
        vocabulary = self.defaults.get("vocabulary")
        if not vocabulary:
            return
        known = set(vocabulary)
        doc = self.defaults.get("vocabulary_doc")
        where = f", listed in {doc}" if doc else ""
        for prompt in prompts:
            text = prompt.lower()
            unknown = sorted({w for w in re.findall(r"[a-z]+", text) if w not in known})
            if unknown:
                shown = ", ".join(unknown[:8]) + (", ..." if len(unknown) > 8 else "")
                warnings.warn(
                    f"this model does not know the word(s) {shown} (its captions use {len(known)} words{where}); "
                    "the image will not show them",
                    stacklevel=3,
                )
            for slot in self.defaults.get("closed_slots", ()):
                allowed = slot["words"]
                wrong = sorted({m.group(1) for m in re.finditer(slot["pattern"], text)} - set(allowed))
                if wrong:
                    warnings.warn(
                        f"this model knows no {slot['what']} {', '.join(wrong)} (only {', '.join(allowed)}{where}); "
                        "the image will not show it",
                        stacklevel=3,
                    )

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prompts -> (text_states (B, M, D), text_mask (B, M) bool, pooled (B, D))."""
        tokens = self.tokenizer(prompts)
        self._warn_unknown_words(prompts)
        for prompt, cut in zip(prompts, tokens.truncated):
            if cut:
                warnings.warn(
                    f"prompt truncated to {self.tokenizer.max_length} tokens, as CLIP does: {prompt[:60]!r}...",
                    stacklevel=3,
                )
        ids = tokens.input_ids.to(self.device)
        states, pooled = self.text_encoder(ids)
        check_finite(states, "text encoding", self.precision)
        return states, tokens.attention_mask.to(self.device), pooled

    @torch.no_grad()
    def denoise(self, latents, text_states, text_mask, pooled, steps: int, guidance: float, progress: bool = False):
        """The sampling loop. latents (B, C, h, w) fp32; text inputs are [uncond; cond] when g > 1.

        Latents stay in fp32 between steps (the scheduler update is computed in fp32); only the
        DiT runs in the pipeline's dtype.
        """
        from tqdm.auto import tqdm

        seq_len = (latents.shape[-2] // self.config.transformer.patch_size) * (
            latents.shape[-1] // self.config.transformer.patch_size
        )
        scheduler = scheduler_from_config(self.scheduler, steps, image_seq_len=seq_len)
        step = self.text_step(scheduler, guidance)
        for i in tqdm(range(steps), desc="denoising", disable=not progress, leave=False):
            latents = step(latents, i, text_states, text_mask, pooled)
        check_finite(latents, "denoising", self.precision)
        return latents

    def text_step(self, scheduler, guidance: float):
        """step(latents, i, text_states, text_mask, pooled) -> the latents after step i of
        `scheduler`: `text_cfg_step` run through the backend's `run_step`."""
        static = dict(do_cfg=guidance > 1.0, dtype=self.precision.dtype)
        fn = functools.partial(text_cfg_step, self.transformer, scheduler.update, **static)
        return self._stepper("text", fn, static, scheduler, guidance)

    def class_step(self, scheduler, guidance: float, guided_channels: int):
        """step(latents, i, labels) -> the latents after step i: `class_cfg_step` through `run_step`."""
        static = dict(do_cfg=guidance > 1.0, dtype=self.precision.dtype,
                      channels=self.config.transformer.in_channels, guided_channels=guided_channels)
        fn = functools.partial(class_cfg_step, self.transformer, scheduler.update, **static)
        return self._stepper("class", fn, static, scheduler, guidance)

    def _stepper(self, kind: str, fn, static: dict, scheduler, guidance: float):
        # The key names all that `fn` holds besides its tensor arguments: the step kind, the
        # transformer (bench swaps it), the scheduler's update and the static settings.
        key = (kind, id(self.transformer), scheduler.update_key, tuple(static.items()))
        # The schedule moves to the device once, not once per step
        timesteps = scheduler.timesteps.to(self.device)  # (steps,)
        coefficients = torch.stack([scheduler.coefficients(i) for i in range(scheduler.num_steps)]).to(self.device)
        g = torch.tensor(guidance, dtype=torch.float32, device=self.device)
        cfg_factor = 2 if static["do_cfg"] else 1

        def step(latents, i, *conditioning):
            t = timesteps[i].expand(cfg_factor * latents.shape[0])
            return self.run_step(key, fn, latents, t, coefficients[i], g, *conditioning)

        return step

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
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        progress: bool = False,
        guidance_channels: int | None = None,
    ) -> GenerationResult:
        """Text models: prompts are text. Class-conditional models: prompts are ImageNet class names
        or indices ("golden retriever", "207", 207), and `guidance_channels` picks how many latent
        channels CFG steers (None: all, as diffusers' DiTPipeline; 3: the original DiT sample.py)."""
        class_model = self.config.transformer.class_conditional
        prompts = [prompt] if isinstance(prompt, (str, int)) else list(prompt)
        steps = self.defaults.get("steps", DEFAULT_STEPS) if steps is None else steps
        guidance = self.defaults.get("guidance", DEFAULT_GUIDANCE) if guidance is None else guidance
        # `is None`, not `or`: an explicit 0 must reach latent_shape's check (InputError), not be
        # replaced silently by the default size (`--height 0` used to give a default-size image).
        height = self.defaults.get("height", self.default_size) if height is None else height
        width = self.defaults.get("width", self.default_size) if width is None else width
        if not prompts or not all(isinstance(p, str) or (class_model and isinstance(p, int)) for p in prompts):
            raise InputError("prompt must be a string or a non-empty list of strings.")
        if int(steps) != steps or steps < 1:
            raise InputError(f"steps must be a whole number >= 1, got {steps}.")
        if guidance < 0 or guidance != guidance:
            raise InputError(f"guidance must be >= 0, got {guidance}.")
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}.")
        if class_model:
            return self._generate_class(prompts, negative_prompt, int(steps), float(guidance), seed, height, width,
                                        num_images, guidance_channels, progress)
        if guidance_channels is not None:
            raise InputError("guidance_channels applies to class-conditional DiTs only.")
        negatives = [negative_prompt or ""] * len(prompts) if not isinstance(negative_prompt, list) else negative_prompt
        if len(negatives) != len(prompts):
            raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts.")
        shape = self.latent_shape(len(prompts) * num_images, height, width)

        timings: dict[str, float] = {}
        with _stage("text_encoding", self.device, timings):
            # Each prompt repeated num_images times, as diffusers' num_images_per_prompt.
            cond = [p for p in prompts for _ in range(num_images)]
            uncond = [n for n in negatives for _ in range(num_images)]
            do_cfg = guidance > 1.0
            states, mask, pooled = self.encode_prompt(uncond + cond if do_cfg else cond)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        with _stage("denoising", self.device, timings):
            latents = self.denoise(latents, states, mask, pooled, int(steps), float(guidance), progress)
        with _stage("decoding", self.device, timings):
            images = to_pil(self.decode(latents))
        return GenerationResult(images=images, seed=seed, timings=timings)

    # -- class-conditional DiT (ImageNet) ----------------------------------------------------------

    @torch.no_grad()
    def denoise_class(self, latents, labels, steps: int, guidance: float, guidance_channels: int | None = None,
                      progress: bool = False):
        """The sampling loop of diffusers' `DiTPipeline`, step for step. latents (B, C, h, w) fp32,
        labels (B,) int64.

        - CFG (guidance > 1): one DiT call on [latents; latents] with labels [cond; null], null =
          num_classes; eps = uncond + g * (cond - uncond) on the first `guidance_channels` latent
          channels (None: all C, diffusers; 3: facebookresearch/DiT sample.py), the cond half's own
          prediction on the rest. DiTPipeline steps both halves and keeps the cond one; stepping
          only the cond half is the same elementwise arithmetic.
        - learned sigma: the variance half of the output (channels C..2C) is dropped.
        - the scheduler (DDIM, epsilon) comes from scheduler_config.json.
        """
        from tqdm.auto import tqdm

        dit = self.config.transformer
        channels = dit.in_channels
        k = channels if guidance_channels is None else guidance_channels
        if not 1 <= k <= channels:
            raise InputError(f"guidance_channels {k} must be between 1 and the {channels} latent channels.")
        seq_len = (latents.shape[-2] // dit.patch_size) * (latents.shape[-1] // dit.patch_size)
        scheduler = scheduler_from_config(self.scheduler, steps, image_seq_len=seq_len)
        labels = labels.to(self.device)
        y = torch.cat([labels, torch.full_like(labels, dit.num_classes)]) if guidance > 1.0 else labels  # (2B,) or (B,)
        step = self.class_step(scheduler, guidance, k)
        for i in tqdm(range(steps), desc="denoising", disable=not progress, leave=False):
            latents = step(latents, i, y)
        check_finite(latents, "denoising", self.precision)
        return latents

    def _generate_class(self, prompts, negative_prompt, steps, guidance, seed, height, width, num_images,
                        guidance_channels, progress) -> GenerationResult:
        from ldm_rt.imagenet import class_index

        if negative_prompt:
            raise InputError("a class-conditional model takes no negative prompt: guidance steers away from the "
                             "null class.")
        dit = self.config.transformer
        labels = torch.tensor([class_index(p, dit.num_classes) for p in prompts for _ in range(num_images)])
        shape = self.latent_shape(len(labels), height, width)
        timings: dict[str, float] = {"text_encoding": 0.0}  # no text: class labels index a table
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        with _stage("denoising", self.device, timings):
            latents = self.denoise_class(latents, labels, steps, guidance, guidance_channels, progress)
        with _stage("decoding", self.device, timings):
            images = to_pil(self.decode(latents))
        return GenerationResult(images=images, seed=seed, timings=timings)

    def __call__(self, prompt, **kwargs) -> list[Image.Image]:
        return self.generate(prompt, **kwargs).images


@contextlib.contextmanager
def _stage(name: str, device: torch.device, timings: dict[str, float]):
    """Record the wall-clock seconds of one stage into timings[name] (syncing CUDA first)."""
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = time.perf_counter() - start
