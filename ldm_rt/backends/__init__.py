"""Backends: one interface, several implementations.

A backend turns reference `Components` into three callables with the reference modules' call
signatures, so the pipeline never asks which backend it holds:

- text_encoder(input_ids) -> (last_hidden_state, pooled)
- transformer(latents, timestep, text_states, text_mask, pooled) -> prediction
- vae.decode(latents) -> image in [-1, 1]

`graphs`: one callable per export spec the model's family declares (`Family.export_specs`), by
the spec's name, taking the spec's inputs in its order and returning its outputs (a list in the
spec's order), for a family whose encoding goes beyond these three (FLUX.1's second text encoder,
T5). A backend that runs exported graphs (onnxruntime, tensorrt) fills it with every graph; one
that runs the reference modules (torch, triton) leaves it empty, and the family calls its
reference modules itself (where it places them: `Pipeline(text_encoder_device=...)`).

and a `run_step(key, step, *tensors)` through which the pipeline runs each denoising step (the
DiT call, the CFG combination and the scheduler update, as one pure function `step`): eager by
default, replayed from a CUDA graph by the triton backend. `key` names everything about `step`
that its tensor arguments do not (which function, its static settings), so a backend may cache
one capture per (key, input shapes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ldm_rt.errors import InputError, LdmRtError, require
from ldm_rt.precision import Precision

# name -> (module to import, extra that installs it); None: no optional dependency.
BACKENDS: dict[str, tuple[str, str] | None] = {
    "torch": None,
    "triton": ("triton", "triton"),
    "onnxruntime": ("onnxruntime", "onnxruntime"),
    "tensorrt": ("tensorrt", "tensorrt"),
}


def eager_step(key: tuple, step: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """`Runtime.run_step` of every backend that does not capture steps: just the call."""
    return step(*tensors)


@dataclass
class Runtime:
    text_encoder: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    transformer: Callable[..., torch.Tensor]
    vae: Any  # has .decode(z)
    vae_dtype: torch.dtype  # what decode() takes: fp32 when the VAE config forces an upcast
    run_step: Callable[..., torch.Tensor] = eager_step
    graphs: dict[str, Callable[..., list[torch.Tensor]]] = field(default_factory=dict)  # spec name -> graph


# Backends that run exported graphs and so can take a user's export (`onnx_dir`).
ONNX_DIR_BACKENDS = ("onnxruntime",)


def check_backend(name: str, device: torch.device, precision: Precision) -> None:
    """Raise (MissingDependencyError, InputError) when backend `name` cannot run on `device` in
    `precision` here, from cheap checks only: no export, no copy of the model. `load_backend`
    starts with it; `ldm-rt bench` calls it before copying a model for a backend."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    dependency = BACKENDS[name]
    if dependency is not None:
        module, extra = dependency
        require(module, extra, f"the {name} backend")
    if name == "onnxruntime":
        from ldm_rt.backends.onnxruntime_backend import check

        check(device, precision)
    elif name == "triton":
        from ldm_rt.backends.triton_backend import check_device

        check_device(device, precision)
    elif name == "tensorrt":
        from ldm_rt.backends.tensorrt_backend import check

        check(device, precision)


def load_backend(name: str, components, device: torch.device, precision: Precision, onnx_dir=None) -> Runtime:
    """`onnx_dir`: run this export directory's graphs instead of exporting into the cache."""
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    if onnx_dir is not None and name not in ONNX_DIR_BACKENDS:
        raise InputError(f"onnx_dir applies to backend {' or '.join(ONNX_DIR_BACKENDS)}, not {name}.")
    check_backend(name, device, precision)
    if name == "torch":
        from ldm_rt.backends.torch_backend import load

        return load(components, device, precision)
    if name == "onnxruntime":
        from ldm_rt.backends.onnxruntime_backend import load

        return load(components, device, precision, onnx_dir=onnx_dir)
    if name == "triton":
        from ldm_rt.backends.triton_backend import load

        return load(components, device, precision)  # checks CUDA (or TRITON_INTERPRET=1 on the CPU)
    if name == "tensorrt":
        from ldm_rt.backends.tensorrt_backend import load

        return load(components, device, precision)  # checks CUDA first, then exports and builds
    raise LdmRtError(f"the {name} backend is not available in this version of ldm-rt yet; use backend torch.")
