"""The model-family seam: what one family of latent diffusion transformers declares.

A **family** is a folder, `ldm_rt/families/<name>/`, holding one `Family` object. It owns
everything that differs between model families; the generic code (the pipeline's sampling loop,
the backends, the export driver, parity, bench, the CLI) asks the family and never names one.
Adding a family means adding a folder and one `register()` line in `ldm_rt/families/__init__.py`
(or a `register()` call from the user's own module, as `tests/test_families.py` does): no
generic file changes.

What a family declares, and who asks:

| declaration | what it is | asked by |
| --- | --- | --- |
| `name`, `pipeline_classes` | `model_index.json` `_class_name`s it loads (diffusers' `DiffusionPipeline` convention) | `model_dir.load_model_dir` |
| `recognizes(index, root)` | finer recognition (two families sharing a class name) | `model_dir.load_model_dir` |
| `owns(config)` | whether a config (a preset, `Components.config`) is this family's | export specs, presets |
| `load(root, index)` / `save(...)` | read / write a model directory: components, key maps, checks | `model_dir` |
| `presets()`, `random_components(config, seed)` | `init-model` presets and seeded random models | `model_dir.init_model`, bench |
| `backends`, `places_text_encoders` | the backends it runs on (None: all); whether it honours `text_encoder_device` | `Pipeline.__init__` |
| `default_steps`, `default_guidance`, `default_size(config)` | run defaults when the directory's `_ldm_rt_defaults` has none | `Pipeline.generate` |
| `prompt_types` | what one prompt may be (text; class names or indices) | `Pipeline.generate` |
| `prepare(pipe, prompts, negative_prompt, num_images, options)` | cheap checks of a request, no model call; returns the family's request | `Pipeline.generate` |
| `encode(pipe, request, guidance)` | prompts -> the conditioning tensors of every step, in the step's batch layout | `Pipeline.generate` ("text_encoding" stage) |
| `latent_shape(config, batch, height, width)` | the noise drawn (diffusers' seeding draws exactly this shape), with the size checks | `Pipeline.generate` |
| `pack(config, noise)` / `unpack(config, latents, height, width)` | noise -> the transformer's token layout, and back before the VAE (identity for DiT; Flux packs 2x2 patches into 64-wide tokens) | `Pipeline.generate` |
| `check_size(config, batch, height, width, guidance, device)` | the size/memory limits of a request (`ldm_rt.limits`) | `Pipeline.generate`, serve |
| `scheduler(scheduler_config, steps, image_seq_len)` | the schedule (default: the config's scheduler class; Flux passes FluxPipeline's sigmas) | `Pipeline.denoise` |
| `size_multiple(config)` | what image sides must be multiples of (an input image's size is rounded down to it) | `Pipeline.generate` (image-to-image) |
| `encode_image(pipe, images, generator)` | pixels -> scaled VAE latents (B, C, h, w), before `pack` (default: `Pipeline.encode`, diffusers' `retrieve_latents` convention) | `Pipeline.generate` ("image_encoding" stage) |
| `mask_latents(config, mask, shape)` | a pixel mask -> the VAE latents' layout, before `pack` (default: nearest-neighbour to the latent size, as diffusers' inpaint pipelines) | `Pipeline.generate` (inpainting) |
| `condition_channels(config)` | extra channels the transformer takes, concatenated to the latents (0: none; the DiT's `condition_channels`, FLUX.1 Fill/Control's `in_channels` - 64) | `Pipeline.generate` |
| `condition_inputs(config)` | the image roles such a model requires, from `"image"`, `"mask_image"`, `"control_image"` (SR DiT: `("image",)`; Fill: `("image", "mask_image")`; Control: `("control_image",)`) | `Pipeline.generate` |
| `encode_condition(pipe, images, generator)` | `{role: pixels (B, 3 or 1, H, W) at the output size}` (images in [-1, 1], masks in {0, 1}) -> the conditioning in the packed latent layout (what `pack` gives, the channel axis holding the condition channels), appended to the step's conditioning tensors | `Pipeline.generate` ("condition_encoding" stage) |
| `condition_before_noise(config)` | True: `encode_condition` draws from the generator before the noise (FluxControlPipeline's order); False: after the start latents (FluxFillPipeline's) | `Pipeline.generate` |
| `image_seq_len(config, latents)` | image tokens, for a schedule that depends on them (dynamic shift) | `Pipeline.denoise` |
| `step(pipe, scheduler, guidance, options)` | the pure denoising-step function (`StepFunction`) | `Pipeline.step` |
| `export_specs(config)` | fp32 `ComponentSpec`s, one per exported graph, in export order | `export.specs.component_specs` |
| `sample_prompts(config, batch)` | prompts the model takes, for bench and parity | bench, parity |
| `diffusers_transformer(ours, place)` | diffusers' twin of the transformer, or why there is none | bench's `diffusers` baseline |
| `pipeline_methods(pipe)` | family helpers the pipeline exposes as attributes (`encode_prompt`, `denoise_class`) | `Pipeline.__init__` |

**The step function** is the flux `sampling.py` shape: a pure function of tensors,
`fn(latents, t, coefficients, guidance, *conditioning) -> latents`, with everything that is not
a tensor bound before (`functools.partial`) and listed in `static`, so that the backend's
`run_step` may capture it in one CUDA graph (triton) keyed by `(kind, static)`. `t` arrives
expanded to `batch_factor * B` (2 for a CFG batch), `guidance` as a 0-d fp32 tensor, the
scheduler's update is bound into `fn`. Latents stay fp32 between steps.

**Image-to-image and inpainting are generic** (`Pipeline.generate(image=..., strength=...,
mask_image=...)`): the pipeline encodes the image with `encode_image`, draws the noise after the
VAE's sample from the same generator (diffusers' order), noises the packed image latents to the
step `strength` selects (`scheduler.img2img_start`, `scheduler.add_noise`), runs the tail of the
schedule, and for a mask blends the known region back after every step in the packed layout
(`pack` of `mask_latents`). A family gets them by implementing `pack` (a permutation of the
latents) and, where its size rule is not a multiple of VAE factor x patch size, nothing else:
the default `size_multiple` asks `latent_shape`.

**Channel-concatenation conditioning is generic too** (issue 17): for a model whose
`condition_channels` > 0, `generate` requires the roles of `condition_inputs` (`image=`,
`mask_image=`, `control_image=`; one `error:` line names a missing one, and a role the model does
not take), preprocesses them at the output size (`image_input.preprocess`; the size defaults to
the first role's size times the directory's `upscale` default, 1 unless given), tiles them to the
batch and asks `encode_condition`; the result is appended to the conditioning tensors of every
step, in the latents' batch layout (B rows: a CFG step doubles it as it doubles the latents), and
the family's step function puts it on the latents' channel axis before the transformer (the DiT
families pass it as the transformer's `condition` input, which concatenates before patchify: the
exported graph's extra `condition` input). The roles are conditioning, so there is no inpaint
blend. `strength` defaults to 1.0; with an `image` role the start still goes through the
image-to-image path (encode `image`, then the noise, then `add_noise` at the start step: at
strength 1 that is the noise itself, as FluxFillPipeline's `prepare_latents`, which also encodes
the image), so `strength` < 1 starts from the image; a model without an `image` role starts from
noise and takes no `strength` < 1. With `latents=` given (strength 1), no start image is
encoded and only `encode_condition` draws from the generator.

**Seeding is generic**: the pipeline draws `torch.randn(latent_shape(...), generator=
torch.Generator("cpu").manual_seed(seed))` in fp32 on the CPU, as diffusers does, then
`pack`s it. So a family that samples like a diffusers pipeline gets the same noise.

## What the Flux family implements (`ldm_rt/families/flux/`)

- `pipeline_classes = ("FluxPipeline",)`; `load` reads `transformer/` and `text_encoder_2/` as
  sharded safetensors (`*.safetensors.index.json`, streamed in the files' dtype), `text_encoder/`
  + `tokenizer/` (CLIP: pooled output only), `tokenizer_2/` (T5, tokenizer.json); it returns
  `FluxComponents` (`text_encoder_2`, `tokenizer_2` fields) whose config is a `FluxModelConfig`
  (`owns` tests `isinstance(config, FluxModelConfig)`).
- `prepare`: true CFG only with a negative prompt and `true_cfg_scale` > 1; `encode` warns that
  `guidance` is ignored when the transformer has no guidance embedder (schnell), and returns
  T5 states (B, 256|512, 4096) + CLIP pooled (B, 768) + `txt_ids` zeros (L, 3), [negative; prompt]
  with true CFG. The text encoders run through the backend's graphs (`pipe.graphs`: onnxruntime,
  tensorrt), else from `pipe.components` on `pipe.text_encoder_device` (torch).
- `latent_shape`: (B, 16, H/8, W/8) with sizes multiples of 16; `pack`: diffusers'
  `_pack_latents` kept as a token grid (B, h/2, w/2, 64), so the step derives the `img_ids` from
  the shape (the conditioning is encoded before the size is known); `unpack` the inverse.
- `image_seq_len`: (h/2)(w/2) tokens; `scheduler`: FlowMatchEuler with FluxPipeline's sigmas
  (linspace(1, 1/steps)) and dynamic shift `mu` from the token count.
- `step`: `flux_step(transformer, update, latents, t, coefficients, guidance, txt, pooled, txt_ids)`,
  guidance fed to the guidance embedder (dev) instead of a CFG batch; `batch_factor = 1` (a true
  CFG batch is doubled inside, from the conditioning's batch).
- Defaults from the directory (`loading.run_defaults`): 4 steps / 256 tokens (schnell), 28 / 3.5 /
  512 (dev), size 1024; `max_sequence_length` (1..512) overrides the T5 length per call;
  `backends = ("torch", "triton", "onnxruntime", "tensorrt")`.
- `export_specs` (`specs.py`): text_encoder (CLIP pooled), text_encoder_2 (T5), transformer
  (dynamic tokens, RoPE in the graph), vae_decoder, with their TensorRT profile rules.
- image-to-image / inpainting (FluxImg2ImgPipeline / FluxInpaintPipeline): nothing beyond `pack`;
  `size_multiple` is 16 through the default (it probes `latent_shape`); the mask is interpolated
  to the latent size and packed like the latents (token grid), as diffusers does; proven equal to both pipelines
  (`tests/test_flux_img2img.py`).
- FLUX.1 Fill / Canny / Depth (`conditioning.py`; `pipeline_classes` FluxFillPipeline, FluxControlPipeline):
  the kind from the transformer's in_channels (384 / 128) vs out_channels (64); `condition_inputs`
  ("image", "mask_image") / ("control_image",); `encode_condition` the masked image's latents + the packed
  pixel mask / the control image's latents as a token grid (B, h/2, w/2, 320 | 64), which `flux_step`
  concatenates after the latents; `condition_before_noise` True for Control (FluxControlPipeline's order).

**Every graph a family declares runs on every backend that runs graphs.** `export_specs`
is the list: `ldm-rt export` writes each (the `--model all` default), the onnxruntime and
tensorrt backends hold one callable per spec in `Runtime.graphs` (`pipe.graphs[name]`, the
spec's inputs in, its outputs out), and `ldm-rt parity` compares each with its reference
module. A family whose encoding needs more than `pipe.text_encoder` (Flux: T5) calls
`pipe.graphs` where it holds the graph and its reference modules otherwise (torch, triton:
`graphs` is empty). A spec declares its TensorRT profile rules for dims that are not batch and
image size (`ComponentSpec.profile_dims`, `profile_batch`); the profile geometry (default side,
size multiple) comes from `default_size` and `size_multiple`.

Not yet generic: the three role callables (`pipe.text_encoder`, `pipe.transformer`,
`pipe.vae`) stay, with the DiT's call signatures, beside `graphs`; the triton backend swaps its
kernels into the transformer only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ldm_rt.errors import InputError


@dataclass(frozen=True)
class StepFunction:
    """A family's denoising step, ready for `Pipeline.step`.

    `fn(latents, t, coefficients, guidance, *conditioning) -> latents` is pure (no host sync);
    `static` names every non-tensor it holds (the step's cache key, with `kind`); `batch_factor`
    is how many transformer rows one latent row takes (2 with a CFG batch, so `t` is expanded to
    2B)."""

    kind: str
    fn: Callable[..., torch.Tensor]
    static: dict[str, Any] = field(default_factory=dict)
    batch_factor: int = 1


class Family:
    """One model family (see the module docstring for who asks what). Subclass and override;
    the defaults here are the DiT conventions that most families share."""

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()  # model_index.json `_class_name`s this family loads
    prompt_types: tuple[type, ...] = (str,)
    default_steps: int = 30
    default_guidance: float = 4.0
    backends: tuple[str, ...] | None = None  # the backends this family's models run on; None: every one
    places_text_encoders: bool = False  # True: `encode` puts its text encoders on `pipe.text_encoder_device`

    # -- recognition and loading ----------------------------------------------------------------

    def recognizes(self, index: dict[str, Any], root: Path) -> bool:
        """Whether the model directory `root` (its model_index.json is `index`) is this family's.
        Must not raise on a broken directory: `load` reports what is wrong."""
        return index.get("_class_name") in self.pipeline_classes

    def owns(self, config) -> bool:
        """Whether `config` (a preset or `Components.config`) is one of this family's models."""
        raise NotImplementedError

    def load(self, root: Path, index: dict[str, Any]):
        """The model directory -> `Components` (reference modules, CPU, fp32); strict."""
        raise NotImplementedError

    def save(self, components, root: Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write `components` so that `load` reads them back exactly."""
        raise NotImplementedError

    def presets(self) -> dict[str, Any]:
        """`init-model` preset name -> config."""
        return {}

    def random_components(self, config, seed: int = 0):
        """Reference modules for `config` with seeded non-zero random weights."""
        raise NotImplementedError

    # -- sampling ---------------------------------------------------------------------------------

    def default_size(self, config) -> int:
        """Image side in pixels when neither the call nor the directory's defaults give one."""
        return config.transformer.sample_size * config.vae.scale_factor

    def prepare(self, pipe, prompts: list, negative_prompt, num_images: int, options: dict[str, Any]):
        """Check one request (no model call) and return what `encode` needs. `options` holds the
        family-specific arguments of `generate` that were given (not None)."""
        raise NotImplementedError

    def encode(self, pipe, request, guidance: float) -> tuple[torch.Tensor, ...]:
        """The request -> the conditioning tensors every step takes, on `pipe.device`."""
        raise NotImplementedError

    def latent_shape(self, config, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The noise drawn for `batch` images of height x width pixels; InputError on a bad size."""
        f, p = config.vae.scale_factor, config.transformer.patch_size
        multiple = f * p
        for name, value in (("height", height), ("width", width)):
            if value < multiple or value % multiple:
                raise InputError(
                    f"{name} {value} must be a positive multiple of {multiple} "
                    f"(VAE factor {f} x patch size {p})."
                )
        return (batch, config.transformer.in_channels, height // f, width // f)

    def size_multiple(self, config) -> int:
        """The multiple image sides must have: the smallest multiple of the VAE factor that
        `latent_shape` takes (VAE factor x patch size for DiT; 16 for Flux's 2x2 packing)."""
        f = config.vae.scale_factor
        for k in range(1, 65):
            try:
                self.latent_shape(config, 1, k * f, k * f)
            except InputError:
                continue
            return k * f
        return f * getattr(config.transformer, "patch_size", 1)

    def encode_image(self, pipe, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f) fp32 on `pipe.device`,
        in the VAE's layout (before `pack`): `Pipeline.encode` (a sample of the latent distribution
        drawn from `generator`, then `(z - shift_factor) * scaling_factor`)."""
        return pipe.encode(images, generator)

    def mask_latents(self, config, mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """mask (B, 1, H, W) in {0, 1} (1 = repaint) -> (B, C, h, w) with `shape`'s (C, h, w), in the
        VAE latents' layout (before `pack`): `F.interpolate(mask, size=(h, w))` (nearest, diffusers'
        FluxInpaintPipeline / StableDiffusion3InpaintPipeline), the same on every channel."""
        m = torch.nn.functional.interpolate(mask, size=tuple(shape[-2:]))
        return m.expand(-1, shape[1], -1, -1).contiguous()

    def pack(self, config, noise: torch.Tensor) -> torch.Tensor:
        """Drawn noise -> the transformer's latent layout (identity: the DiT patchifies inside)."""
        return noise

    def unpack(self, config, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The transformer's layout -> (B, C, h, w) VAE latents (identity for DiT)."""
        return latents

    def check_size(self, config, batch: int, height: int, width: int, guidance: float, device: torch.device) -> None:
        """InputError when `batch` images of height x width cannot be made (too large a side, not enough
        memory), before any work; the DiT limits of `ldm_rt.limits` (CFG doubles the batch when g > 1)."""
        from ldm_rt.limits import check_size

        check_size(config, batch, height, width, guidance > 1.0, device)

    def scheduler(self, scheduler_config: dict[str, Any], steps: int, image_seq_len: int):
        """The pure scheduler for `steps` steps (`ldm_rt.schedulers`), from scheduler_config.json."""
        from ldm_rt.schedulers import scheduler_from_config

        return scheduler_from_config(scheduler_config, steps, image_seq_len=image_seq_len)

    # -- channel-concatenation conditioning (issue 17) --------------------------------------------

    def condition_before_noise(self, config) -> bool:
        """Whether `encode_condition` draws from the generator before the noise (FluxControlPipeline's
        order) or after the start latents (FluxFillPipeline's); per config, since one family (Flux)
        holds both."""
        return False

    def condition_channels(self, config) -> int:
        """Extra input channels the transformer takes, concatenated to the latents (0: none)."""
        return 0

    def condition_inputs(self, config) -> tuple[str, ...]:
        """The image roles a conditioned model requires, from "image", "mask_image", "control_image"."""
        return ()

    def encode_condition(self, pipe, images: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """{role: pixels (B, 3|1, H, W) at the output size} (images in [-1, 1], masks in {0, 1}) ->
        the conditioning (fp32, on `pipe.device`) in the packed latent layout: what `pack` gives for
        the latents, with the family's channel axis holding `condition_channels` channels."""
        raise NotImplementedError(f"the {self.name or type(self).__name__} family has no image conditioning")

    def image_seq_len(self, config, latents: torch.Tensor) -> int:
        """Image tokens the transformer sees for `latents` (a dynamic-shift schedule needs it)."""
        p = config.transformer.patch_size
        return (latents.shape[-2] // p) * (latents.shape[-1] // p)

    def step(self, pipe, scheduler, guidance: float, options: dict[str, Any]) -> StepFunction:
        raise NotImplementedError

    def sample_prompts(self, config, batch: int) -> list:
        """`batch` prompts this family's model takes (bench, parity)."""
        return ["a red circle"] * batch

    def diffusers_transformer(self, ours, place: Callable) -> Callable | str:
        """`ldm-rt bench`'s `diffusers` baseline: diffusers' implementation of `ours` holding its
        weights, with the backend call signature (`place` moves a diffusers module to ours' device
        and dtype); or a string saying why there is none."""
        return f"diffusers has no implementation of the {self.name} transformer"

    def pipeline_methods(self, pipe) -> dict[str, Callable]:
        """Family helpers that `pipe` exposes as attributes (kept for the families' own API)."""
        return {}

    # -- export -----------------------------------------------------------------------------------

    def export_specs(self, config) -> dict:
        """Component name -> fp32 `ldm_rt.export.specs.ComponentSpec`, in export order."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.name}>"
