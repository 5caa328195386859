"""The `torch` backend: the reference modules themselves, eager, on CPU or CUDA."""

from __future__ import annotations

import torch

from ldm_rt.backends import Runtime
from ldm_rt.precision import Precision


def load(components, device: torch.device, precision: Precision) -> Runtime:
    dtype = precision.dtype
    vae_dtype = torch.float32 if precision is Precision.FP16 and components.vae.config.force_upcast else dtype
    return Runtime(
        text_encoder=None if components.text_encoder is None else components.text_encoder.to(device=device, dtype=dtype),
        transformer=components.transformer.to(device=device, dtype=dtype),
        vae=components.vae.to(device=device, dtype=vae_dtype),
        vae_dtype=vae_dtype,
    )
