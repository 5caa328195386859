"""How large an image a model may be asked for, checked before any work is done.

Two limits, both from the model's config:

- **Side.** The DiT is trained on a `sample_size / patch_size` token grid per side (the model's
  default image side, `sample_size x VAE factor` pixels). Beyond `MAX_SIDE_FACTOR` times that
  side, positions lie far outside anything it saw (RoPE and sin-cos only extrapolate), and a
  step's attention costs tokens**2: `--height 100000` on the demo model (50,000 tokens) ran for
  3.5 min without finishing its first step (issue 19). 16x leaves room for real upscaled use
  (SD-class models are run at 2-4x their training size).
- **Memory.** An estimate of the largest stage's activations (the DiT's block activations for
  the CFG-doubled batch; the VAE decoder's full-resolution feature maps) against the memory the
  device has free. Attention is the torch backend's SDPA, which never holds the score matrix, so
  the estimate is linear in pixels; it is an estimate (within a small factor), meant to stop a
  size that cannot fit, not to predict the peak.
"""

from __future__ import annotations

import os

import torch

from ldm_rt.errors import InputError

MAX_SIDE_FACTOR = 16
FP32_BYTES = 4
# Tensors of one resolution alive at once in a VAE ResnetBlock (input, normed, conv out, residual).
VAE_MAPS_ALIVE = 4


def available_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (CUDA: cudaMemGetInfo; CPU: MemAvailable), None when unknown."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except Exception:  # a driver that cannot say: no check, rather than a false refusal
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def max_side(config) -> int:
    """The largest image side in pixels the model is run at: MAX_SIDE_FACTOR x its default side."""
    return MAX_SIDE_FACTOR * config.transformer.sample_size * config.vae.scale_factor


def estimate_bytes(config, batch: int, height: int, width: int, do_cfg: bool) -> dict[str, int]:
    """Rough activation bytes per stage for `batch` images of height x width pixels."""
    dit, vae = config.transformer, config.vae
    f = vae.scale_factor
    tokens = (height // f // dit.patch_size) * (width // f // dit.patch_size)
    dit_batch = batch * (2 if do_cfg else 1)
    # one block: residual stream, q/k/v/attention out (4 x hidden) and the MLP's hidden layer
    per_token = dit.hidden_size * (2 + 4 + int(dit.mlp_ratio))
    return {
        "DiT": dit_batch * tokens * per_token * FP32_BYTES,
        "VAE decoder": VAE_MAPS_ALIVE * batch * vae.block_out_channels[0] * height * width * FP32_BYTES,
    }


def check_size(config, batch: int, height: int, width: int, do_cfg: bool, device: torch.device) -> None:
    """InputError when height x width (x batch) is beyond the model's side limit or the memory free."""
    limit = max_side(config)
    default = config.transformer.sample_size * config.vae.scale_factor
    for name, value in (("height", height), ("width", width)):
        if value > limit:
            raise InputError(
                f"{name} {value} is larger than this model takes: at most {limit} pixels, {MAX_SIDE_FACTOR}x its "
                f"default side of {default}; ask for a smaller size."
            )
    free = available_memory(device)
    if free is None:
        return
    stage, need = max(estimate_bytes(config, batch, height, width, do_cfg).items(), key=lambda kv: kv[1])
    if need > free:
        raise InputError(
            f"{batch} image(s) of {height}x{width} would need about {need / 2**30:.1f} GiB for the {stage}, more than "
            f"the {free / 2**30:.1f} GiB free on {device}; ask for fewer images or a smaller size."
        )
