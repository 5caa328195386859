"""diffusers-style call arguments, mapped onto ldm-rt's and checked before any work.

`pipe(prompt, num_inference_steps=20, guidance_scale=4.0, generator=g, output_type="np",
latents=x, callback_on_step_end=fn)` means what it means in diffusers' FluxPipeline /
StableDiffusion3Pipeline `__call__`:

- `num_inference_steps`, `guidance_scale`, `num_images_per_prompt`: aliases of `steps`,
  `guidance`, `num_images` (giving both names with different values is an error);
- `generator`: a `torch.Generator` the initial noise is drawn from (instead of `seed`), on the
  generator's device, as diffusers' `randn_tensor`; `latents`: the initial noise itself
  (B, C, h, w), used instead of drawing;
- `output_type`: "pil" (PIL images), "np" (float32 array (B, H, W, 3) in [0, 1]), "pt" (float32
  tensor (B, 3, H, W) in [0, 1]) or "latent" (the final latents, not decoded);
- `callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`, called after each step
  with `callback_kwargs = {"latents": ...}` (the names in `callback_on_step_end_tensor_inputs`;
  only "latents" here: there are no prompt embeddings to hand out); a "latents" entry of the
  returned dict replaces the latents.
"""

from __future__ import annotations

import numpy as np
import torch

from ldm_rt.errors import InputError

ALIASES = {"num_inference_steps": "steps", "guidance_scale": "guidance", "num_images_per_prompt": "num_images"}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSOR_INPUTS = ("latents",)


def normalize(kwargs: dict) -> dict:
    """diffusers' names -> ours; both spellings of one argument must agree."""
    out = dict(kwargs)
    for theirs, ours in ALIASES.items():
        if theirs in out:
            value = out.pop(theirs)
            if ours in out and out[ours] is not None and out[ours] != value:
                raise InputError(f"{theirs}={value!r} and {ours}={out[ours]!r} name the same setting; give one.")
            out[ours] = value
    return out


def check(output_type: str, generator, seed, latents, callback, tensor_inputs) -> None:
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator, not {type(generator).__name__}.")
    if generator is not None and seed not in (None, 0):
        raise InputError("give a seed or a generator, not both: the noise comes from one of them.")
    if latents is not None and not isinstance(latents, torch.Tensor):
        raise InputError(f"latents must be a torch.Tensor, not {type(latents).__name__}.")
    if callback is not None and not callable(callback):
        raise InputError("callback_on_step_end must be callable as fn(pipe, step, timestep, callback_kwargs).")
    unknown = [n for n in tensor_inputs if n not in CALLBACK_TENSOR_INPUTS]
    if unknown:
        raise InputError(f"callback_on_step_end_tensor_inputs {unknown} are not offered; this pipeline hands out "
                         f"{', '.join(CALLBACK_TENSOR_INPUTS)}.")


def initial_latents(shape: tuple, seed: int | None, generator, latents, device: torch.device) -> torch.Tensor:
    """The starting noise, fp32 on `device`: given latents, or drawn from the generator, or from
    `torch.Generator("cpu").manual_seed(seed)` (the diffusers convention for a seed)."""
    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise InputError(f"latents have shape {tuple(latents.shape)}; this call needs {tuple(shape)} "
                             "(batch x latent channels x height/VAE factor x width/VAE factor).")
        if not torch.isfinite(latents).all():
            raise InputError("latents hold NaN or Inf values.")
        return latents.to(device=device, dtype=torch.float32)
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def step_callback(pipe, callback, tensor_inputs):
    """latents -> latents after the user's callback, or None without one."""
    if callback is None:
        return None

    def after_step(i: int, t, latents: torch.Tensor) -> torch.Tensor:
        kwargs = {name: latents for name in tensor_inputs}
        out = callback(pipe, i, t, kwargs)
        if not isinstance(out, dict):
            raise InputError(f"callback_on_step_end returned {type(out).__name__}; it must return a dict "
                             "(e.g. the callback_kwargs it was given).")
        new = out.get("latents", latents)
        if not isinstance(new, torch.Tensor) or new.shape != latents.shape:
            raise InputError("callback_on_step_end's 'latents' must be a tensor of the latents' shape.")
        return new.to(device=latents.device, dtype=torch.float32)

    return after_step


def to_output(images: torch.Tensor, output_type: str, to_pil):
    """(B, 3, H, W) in [-1, 1] -> the output_type's form (as diffusers' VaeImageProcessor.postprocess)."""
    if output_type == "pil":
        return to_pil(images)
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return x.cpu()
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).cpu().numpy())
