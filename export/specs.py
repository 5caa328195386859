"""One export declaration per component (STYLE.md principle 6: declare export once).

A `ComponentSpec` names the module to export, its inputs (name, dtype, symbolic dims), its
outputs, and a sample-input factory. ONNX dynamic shapes, the manifest, the onnxruntime
backend's feeds and the parity inputs are all generated from it; nothing else repeats a shape.

Symbolic dims are strings ("batch", "height", "width"; an output may be "height*8": the input's
size times a factor); fixed dims are ints taken from the config. A symbolic latent dim of the DiT must be a multiple of the patch size: the spec
says so in `multiple_of`, and the exporter turns it into `patch_size * Dim(...)`.

Each model family declares its specs (`Family.export_specs`, e.g.
`ldm_rt/families/dit_text/specs.py`); this module holds the declaration types, the VAE
decoder's spec every family shares, and the precision casts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Union

import torch
from torch import nn

Dim = Union[int, str]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    dims: tuple[Dim, ...]

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # file stem and manifest key: text_encoder, transformer, vae_decoder
    parity_key: str  # row of parity.TOLERANCES
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    module: Callable[[object], nn.Module]  # Components -> the nn.Module to export
    sample: Callable[..., tuple[torch.Tensor, ...]]  # (batch, height, width, generator) -> inputs
    multiple_of: dict[str, int] = field(default_factory=dict)  # symbolic dim -> it must be k * this
    latent: bool = False  # takes latents: height/width are latent sizes and may be dynamic
    dtype: torch.dtype = torch.float32  # of the exported weights (the module is cast to it)
    source: str = ""  # the Components module the graph is made from (its weights hash); "": `name`
    # TensorRT profiles (export/tensorrt.py), written into the manifest when declared:
    # - `profile_dims`: symbolic dims other than batch/height/width, each {"grid": k} (the
    #   (height/k) * (width/k) tokens of a k x k patch grid of the latents, at each profile point)
    #   or {"min": a, "opt": b, "max": c} (sizes no image size gives: a text length);
    # - `profile_batch`: rows per image at (min, opt, max); None: (1, 2, 2) for the graphs a DiT
    #   runs on the CFG batch (`export.tensorrt.CFG_BATCHED`), else (1, 1, 1).
    profile_dims: dict[str, dict[str, int]] = field(default_factory=dict)
    profile_batch: tuple[int, int, int] | None = None
    # How the module (a copy) is cast to `dtype` for export; None: `module.to(dtype)`. T5 keeps its
    # FFN output projections fp32 in fp16, as transformers loads it (`models.t5.to_inference_dtype`).
    cast: Callable[[nn.Module, torch.dtype], nn.Module] | None = None

    @property
    def source_module(self) -> str:
        return self.source or self.name

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def sample_inputs(self, batch: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Fresh seeded random inputs (never zeros) at latent size height x width, in the spec's
        dtypes (drawn in fp32, then rounded: an fp16 graph and the fp32 reference see the same values)."""
        xs = self.sample(batch, height, width, torch.Generator("cpu").manual_seed(seed))
        return tuple(x.to(t.dtype) for t, x in zip(self.inputs, xs))

    def shapes(self, batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes for one batch/latent size (the shapes a TensorRT profile needs)."""
        return {name: tuple(x.shape) for name, x in zip(self.input_names, self.sample_inputs(batch, height, width))}


class VAEDecoder(nn.Module):
    """`vae.decode` as a module: raw latent (B, Cz, h, w) -> image (B, 3, h*f, w*f)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)


def component_specs(config, dtype: str = "fp32") -> dict[str, ComponentSpec]:
    """The export declarations for a `ModelConfig` (or `Components.config`) in one precision.

    fp16/bf16: weights and floating inputs/outputs in that dtype, except
    - `timestep` stays fp32: fp16 spacing is 0.5 between 512 and 1024, and the timestep
      embedding is computed in fp32 anyway (`models/dit.py`);
    - the VAE decoder stays fp32 in fp16 when its config says `force_upcast`, as the torch
      backend and diffusers decode (SD-VAE convolutions overflow fp16).
    Norm statistics and softmax are fp32 inside every graph: the reference modules compute them
    so (`ops.py`, `models/vae.py`), and the exporter keeps those casts.
    """
    from ldm_rt.precision import Precision

    specs = _fp32_specs(config)
    act = Precision.parse(dtype).dtype
    if act == torch.float32:
        return specs
    vae_act = torch.float32 if act == torch.float16 and config.vae.force_upcast else act

    def cast(spec: ComponentSpec, to: torch.dtype) -> ComponentSpec:
        def tensors(ts):
            return tuple(replace(t, dtype=to) if t.dtype == torch.float32 and t.name not in _FP32_ALWAYS else t
                         for t in ts)

        return replace(spec, inputs=tensors(spec.inputs), outputs=tensors(spec.outputs), dtype=to)

    return {name: cast(spec, vae_act if name == "vae_decoder" else act) for name, spec in specs.items()}


_FP32_ALWAYS = ("timestep",)  # inputs kept fp32 in every precision (see component_specs)


def _fp32_specs(config) -> dict[str, ComponentSpec]:
    """What the model's family declares (`Family.export_specs`): the export driver, the backends
    and parity iterate over these and never name a family."""
    from ldm_rt import families

    return families.for_config(config).export_specs(config)


def vae_decoder_spec(vae) -> ComponentSpec:
    f, f32 = vae.scale_factor, torch.float32

    def vae_sample(batch, height, width, g):
        return (torch.randn(batch, vae.latent_channels, height, width, generator=g),)

    return ComponentSpec(
        name="vae_decoder",
        parity_key="vae",
        inputs=(TensorSpec("latents", f32, ("batch", vae.latent_channels, "height", "width")),),
        outputs=(
            TensorSpec("image", f32, ("batch", vae.out_channels, f"height*{f}", f"width*{f}")),
        ),
        module=lambda c: VAEDecoder(c.vae),
        sample=vae_sample,
        source="vae",
        latent=True,
    )


# The text DiT's graphs, in export order (kept for callers that name them; the generic code asks
# `component_specs(config)` which graphs a model has).
COMPONENT_NAMES = ("text_encoder", "transformer", "vae_decoder")
