"""FLUX.1 sampling as pure functions of tensors, exactly as diffusers' `FluxPipeline` does it.

Latents are drawn as (B, 16, h, w) and packed: each 2x2 patch of the latent becomes one
64-wide token, so the transformer runs with patch_size 1 on (B, h/2 * w/2, 64) tokens; image
position ids are (0, row, col) per token, text ids are all zero. The schedule is diffusers'
FlowMatchEuler with the sigmas FluxPipeline passes (linspace(1, 1/steps, steps)) and, for
dynamic shifting, mu from the image token count (`calculate_shift`). A step is one transformer
call (embedded guidance for guidance-distilled models: dev), or two with true CFG
(a negative prompt and true_cfg_scale > 1), then the shared Euler update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ldm_rt.errors import ConfigError
from ldm_rt.schedulers import _FLOW_DEFAULTS, _FLOW_UNSUPPORTED, FlowMatchEuler, _settings, calculate_shift

__all__ = [
    "FluxConditioning", "calculate_shift", "denoise_step", "flux_scheduler", "flux_sigmas", "guidance_vector",
    "latent_image_ids", "pack_latents", "text_ids", "true_cfg", "unpack_latents",
]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches, channel-major within a token (diffusers)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of `pack_latents`.

    diffusers' `_unpack_latents(tokens, height, width, vae_scale_factor)` takes pixels; its
    latent size is 2 * (pixels // (2 * vae_scale_factor)) per side.
    """
    b, n, d = tokens.shape
    h, w = latent_height, latent_width
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, d // 4, h, w)


def latent_image_ids(grid_height: int, grid_width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(grid_height * grid_width, 3) ids (0, row, col) of the packed tokens (grid = latent / 2)."""
    ids = torch.zeros(grid_height, grid_width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(grid_height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(grid_width)[None, :]
    return ids.reshape(grid_height * grid_width, 3).to(device=device, dtype=dtype)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(length, 3) zeros: text tokens get no rotation."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def flux_sigmas(scheduler_config: dict[str, Any], num_steps: int, image_seq_len: int) -> np.ndarray:
    """(num_steps,) float32 sigmas: FluxPipeline's linspace(1, 1/steps, steps) through
    FlowMatchEulerDiscreteScheduler.set_timesteps' shift (dynamic: exponential, mu from
    `calculate_shift(image_seq_len, ...)` with the config's base/max shift and seq lens)."""
    c = _settings(scheduler_config, "FlowMatchEulerDiscreteScheduler", _FLOW_DEFAULTS, _FLOW_UNSUPPORTED)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)  # set_timesteps casts to float32
    if c["use_dynamic_shifting"]:
        if c["time_shift_type"] != "exponential":
            raise ConfigError(f"FlowMatchEulerDiscreteScheduler: time_shift_type={c['time_shift_type']!r} "
                              "is not supported; use \"exponential\".")
        mu = calculate_shift(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"],
                             c["base_shift"], c["max_shift"])
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    shift = c["shift"]
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_scheduler(scheduler_config: dict[str, Any], num_steps: int, image_seq_len: int) -> FlowMatchEuler:
    """The shared FlowMatchEuler (pure `step`) holding FluxPipeline's schedule."""
    n_train = _settings(scheduler_config, "FlowMatchEulerDiscreteScheduler", _FLOW_DEFAULTS,
                        _FLOW_UNSUPPORTED)["num_train_timesteps"]
    sig = torch.from_numpy(np.asarray(flux_sigmas(scheduler_config, num_steps, image_seq_len))).to(torch.float32)
    return FlowMatchEuler(num_steps, sig * n_train, torch.cat([sig, torch.zeros(1)]))


def guidance_vector(guidance_scale: float | None, batch: int, device=None) -> torch.Tensor | None:
    """(B,) float32 embedded guidance for guidance-distilled models; None for the others."""
    if guidance_scale is None:
        return None
    return torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """FluxPipeline's true CFG: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


@dataclass
class FluxConditioning:
    prompt_embeds: torch.Tensor  # (B, M, joint_attention_dim) T5 last hidden states
    pooled_prompt_embeds: torch.Tensor  # (B, pooled_projection_dim) CLIP pooled output
    text_ids: torch.Tensor  # (M, 3) zeros


def denoise_step(
    transformer,
    scheduler: FlowMatchEuler,
    latents: torch.Tensor,
    i: int,
    img_ids: torch.Tensor,
    cond: FluxConditioning,
    guidance: torch.Tensor | None = None,
    negative: FluxConditioning | None = None,
    true_cfg_scale: float = 1.0,
) -> torch.Tensor:
    """One FluxPipeline step on packed latents (B, N, 64): the transformer (twice with true CFG:
    a negative conditioning and true_cfg_scale > 1), then the Euler update in fp32.

    `transformer` takes FluxTransformer2DModel's forward arguments and returns the tensor.
    The timestep is scheduler.timesteps[i] in the latents' dtype, / 1000, as diffusers passes it.
    """
    t = scheduler.timesteps[i].expand(latents.shape[0]).to(latents.dtype) / 1000  # (B,)

    def predict(c: FluxConditioning) -> torch.Tensor:
        return transformer(
            hidden_states=latents, encoder_hidden_states=c.prompt_embeds, pooled_projections=c.pooled_prompt_embeds,
            timestep=t, img_ids=img_ids, txt_ids=c.text_ids, guidance=guidance,
        )

    v = predict(cond)  # (B, N, 64)
    if negative is not None and true_cfg_scale > 1:
        v = true_cfg(v, predict(negative), true_cfg_scale)
    return scheduler.step(latents, v, i)
