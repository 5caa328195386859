"""One export declaration per component (STYLE.md principle 6: declare export once).

A `ComponentSpec` names the module to export, its inputs (name, dtype, symbolic dims), its
outputs, and a sample-input factory. ONNX dynamic shapes, the manifest, the onnxruntime
backend's feeds and the parity inputs are all generated from it; nothing else repeats a shape.

Symbolic dims are strings ("batch", "height", "width"; an output may be "height*8": the input's
size times a factor); fixed dims are ints taken from the config. A symbolic latent dim of the DiT must be a multiple of the patch size: the spec
says so in `multiple_of`, and the exporter turns it into `patch_size * Dim(...)`.

The text encoder's sequence axis is static (= `max_position_embeddings`, 77 for CLIP): the
tokenizer always pads to that length, and the learned position table has exactly that many
rows, so a dynamic axis would buy nothing.
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


def _text_mask(batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """(B, M) bool, True = attend: a random prefix length per row, at least one real token."""
    lengths = torch.randint(1, seq + 1, (batch,), generator=generator)
    return torch.arange(seq)[None, :] < lengths[:, None]


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
    if config.transformer.class_conditional:
        return _class_conditional_specs(config)
    te, dit, vae = config.text_encoder, config.transformer, config.vae
    seq, p, f = te.max_position_embeddings, dit.patch_size, vae.scale_factor

    def text_encoder_sample(batch, height, width, g):
        ids = torch.randint(0, te.vocab_size, (batch, seq), generator=g)
        eos = torch.randint(1, seq, (batch,), generator=g)  # one EOS per row, at a random place
        ids[torch.arange(batch), eos] = te.eos_token_id
        ids[:, 0] = te.bos_token_id
        return (ids,)

    def transformer_sample(batch, height, width, g):
        return (
            torch.randn(batch, dit.in_channels, height, width, generator=g),
            torch.rand(batch, generator=g) * 1000,  # the scheduler's timestep range
            torch.randn(batch, seq, dit.context_dim, generator=g),
            _text_mask(batch, seq, g),
            torch.randn(batch, dit.pooled_dim, generator=g),
        )

    f32 = torch.float32
    return {
        "text_encoder": ComponentSpec(
            name="text_encoder",
            parity_key="text_encoder",
            inputs=(TensorSpec("input_ids", torch.int64, ("batch", seq)),),
            outputs=(
                TensorSpec("last_hidden_state", f32, ("batch", seq, te.hidden_size)),
                TensorSpec("pooled", f32, ("batch", te.hidden_size)),
            ),
            module=lambda c: c.text_encoder,
            sample=text_encoder_sample,
        ),
        "transformer": ComponentSpec(
            name="transformer",
            parity_key="transformer",
            inputs=(
                TensorSpec("latents", f32, ("batch", dit.in_channels, "height", "width")),
                TensorSpec("timestep", f32, ("batch",)),
                TensorSpec("text_states", f32, ("batch", seq, dit.context_dim)),
                TensorSpec("text_mask", torch.bool, ("batch", seq)),
                TensorSpec("pooled", f32, ("batch", dit.pooled_dim)),
            ),
            outputs=(TensorSpec("prediction", f32, ("batch", dit.output_channels, "height", "width")),),
            module=lambda c: c.transformer,
            sample=transformer_sample,
            multiple_of={"height": p, "width": p},
            latent=True,
        ),
        "vae_decoder": _vae_decoder_spec(vae),
    }


def _vae_decoder_spec(vae) -> ComponentSpec:
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
        latent=True,
    )


class ClassConditionalDiT(nn.Module):
    """A class-conditional DiT as a module with positional inputs (latents, timestep, class_labels)."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.dit(latents, timestep, class_labels=class_labels)


def _class_conditional_specs(config) -> dict[str, ComponentSpec]:
    """A class-conditional DiT (ImageNet DiT, issue 8): no text encoder; the transformer's
    conditioning input is `class_labels` [batch] int64 (num_classes = the null class of CFG)."""
    dit, f32 = config.transformer, torch.float32

    def transformer_sample(batch, height, width, g):
        return (
            torch.randn(batch, dit.in_channels, height, width, generator=g),
            torch.rand(batch, generator=g) * 1000,  # the scheduler's timestep range
            torch.randint(0, dit.num_classes + 1, (batch,), generator=g),  # the null class included
        )

    transformer = ComponentSpec(
        name="transformer",
        parity_key="transformer",
        inputs=(
            TensorSpec("latents", f32, ("batch", dit.in_channels, "height", "width")),
            TensorSpec("timestep", f32, ("batch",)),
            TensorSpec("class_labels", torch.int64, ("batch",)),
        ),
        outputs=(TensorSpec("prediction", f32, ("batch", dit.output_channels, "height", "width")),),
        module=lambda c: ClassConditionalDiT(c.transformer),
        sample=transformer_sample,
        multiple_of={"height": dit.patch_size, "width": dit.patch_size},
        latent=True,
    )
    return {"transformer": transformer, "vae_decoder": _vae_decoder_spec(config.vae)}


COMPONENT_NAMES = ("text_encoder", "transformer", "vae_decoder")
