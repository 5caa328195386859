"""FLUX.1 model directories in diffusers' `FluxPipeline` layout: load, save, presets, random models.

```
model_index.json     _class_name FluxPipeline, one [library, class] pair per component
transformer/         config.json + diffusion_pytorch_model[-0000i-of-0000n].safetensors (+ .index.json)
text_encoder/        CLIP-L (transformers CLIPTextModel): config.json + model.safetensors
text_encoder_2/      T5 encoder (transformers T5EncoderModel): config.json + model[-0000i-of-0000n].safetensors
tokenizer/           CLIP BPE: tokenizer.json, or vocab.json + merges.txt
tokenizer_2/         T5: tokenizer.json
vae/                 AutoencoderKL, 16 latent channels: config.json + diffusion_pytorch_model.safetensors
scheduler/           scheduler_config.json (FlowMatchEulerDiscreteScheduler)
```
Every component loads into modules built in its files' own dtype (bf16 for the hub checkpoints),
the two big ones (transformer ~24 GB, T5-XXL ~9.5 GB in bf16) streamed tensor by tensor
(`weights.load_streaming`): the host never holds an fp32 copy of the model; the backend casts to
the pipeline's dtype when it places the modules (bf16 -> fp32 is exact).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_rt.components import Components
from ldm_rt.configs import TextEncoderConfig, VAEConfig, read_json, write_json
from ldm_rt.errors import ModelDirError
from ldm_rt.families.flux.config import FLUX_SCHEDULER_DEV, FLUX_SCHEDULER_SCHNELL, FluxModelConfig

FLUX_PIPELINE = "FluxPipeline"
# model_index.json as diffusers' FluxPipeline.save_pretrained writes it.
INDEX_CLASSES: dict[str, list[str | None]] = {
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS = "diffusion_pytorch_model", "model"
# Shard sizes of the hub checkpoints (FLUX.1-dev: transformer 3 x <= 10 GB, text_encoder_2 2 x <= 5 GB).
TRANSFORMER_SHARD_BYTES, T5_SHARD_BYTES = 10 * 10**9, 5 * 10**9
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 128 latents x VAE factor 8 = 1024 px


def run_defaults(transformer_config) -> dict[str, Any]:
    """FluxPipeline's per-model settings (model cards): a guidance-distilled transformer (dev)
    samples 28 steps at embedded guidance 3.5 with 512 T5 tokens; one without (schnell) 4 steps,
    256 T5 tokens, and has no guidance input (0: nothing is guided). FLUX.1 Fill and Control: the
    `__call__` defaults of diffusers' FluxFillPipeline (50 steps, guidance 30) and FluxControlPipeline
    (28, 3.5), 512 T5 tokens."""
    from ldm_rt.families.flux.conditioning import condition_kind

    kind = condition_kind(transformer_config)
    if kind == "fill":
        return {"steps": 50, "guidance": 30.0, "max_sequence_length": 512}
    if kind == "control":
        return {"steps": 28, "guidance": 3.5, "max_sequence_length": 512}
    if transformer_config.guidance_embeds:
        return {"steps": 28, "guidance": 3.5, "max_sequence_length": 512}
    return {"steps": 4, "guidance": 0.0, "max_sequence_length": 256}


@dataclass
class FluxComponents(Components):
    """`Components` plus FLUX.1's second text encoder (T5) and its tokenizer."""

    text_encoder_2: nn.Module | None = None
    tokenizer_2: Any | None = None

    @property
    def config(self) -> FluxModelConfig:
        return FluxModelConfig(self.transformer.config, self.text_encoder.config, self.text_encoder_2.config,
                               self.vae.config, dict(self.scheduler_config))

    def modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                "transformer": self.transformer, "vae": self.vae}


# ---------------------------------------------------------------------------------------------- presets


def _presets() -> dict[str, FluxModelConfig]:
    from ldm_rt.configs import PRESETS
    from ldm_rt.families.flux.components import FLUX_CLIP, FLUX_T5, FLUX_VAE
    from ldm_rt.families.flux.transformer import FLUX_PRESETS
    from ldm_rt.models.t5 import T5_PRESETS

    # four blocks like FLUX.1's VAE, so sizes are multiples of 16 px as for the real models
    tiny_vae = dataclasses.replace(FLUX_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    tiny = FluxModelConfig(FLUX_PRESETS["flux-tiny"], PRESETS["tiny"].text_encoder, T5_PRESETS["t5-tiny"], tiny_vae,
                           dict(FLUX_SCHEDULER_DEV))
    latent = 4 * tiny_vae.latent_channels  # 64 packed latent channels
    dev = FluxModelConfig(FLUX_PRESETS["flux-dev"], FLUX_CLIP, FLUX_T5, FLUX_VAE, dict(FLUX_SCHEDULER_DEV))
    return {
        # tests and CPU demos: every component a few KB, the dev-like sampling (guidance, dynamic shift)
        "flux-tiny": tiny,
        # FLUX.1-Fill-dev / FLUX.1-Canny-dev channel layouts (conditioning.py) on the tiny model
        "flux-fill-tiny": dataclasses.replace(tiny, transformer=dataclasses.replace(
            tiny.transformer, in_channels=2 * latent + 4 * tiny_vae.scale_factor**2, out_channels=latent)),
        "flux-control-tiny": dataclasses.replace(tiny, transformer=dataclasses.replace(
            tiny.transformer, in_channels=2 * latent, out_channels=latent)),
        # black-forest-labs/FLUX.1-schnell and FLUX.1-dev shapes (random weights: ~17B parameters)
        "flux-schnell": FluxModelConfig(FLUX_PRESETS["flux-schnell"], FLUX_CLIP, FLUX_T5, FLUX_VAE,
                                        dict(FLUX_SCHEDULER_SCHNELL)),
        "flux-dev": dev,
        # black-forest-labs/FLUX.1-Fill-dev and FLUX.1-Canny-dev / Depth-dev transformer channels
        "flux-fill-dev": dataclasses.replace(dev, transformer=dataclasses.replace(
            dev.transformer, in_channels=2 * latent + 4 * FLUX_VAE.scale_factor**2, out_channels=latent)),
        "flux-control-dev": dataclasses.replace(dev, transformer=dataclasses.replace(
            dev.transformer, in_channels=2 * latent, out_channels=latent)),
    }


def check_compatible(config: FluxModelConfig) -> None:
    """The components must agree on the shapes that pass between them."""
    from ldm_rt.families.flux.conditioning import fill_mask_channels

    tr, te, t5, vae = config.transformer, config.text_encoder, config.text_encoder_2, config.vae
    problems = []
    if tr.joint_attention_dim != t5.d_model:
        problems.append(f"transformer joint_attention_dim {tr.joint_attention_dim} != text_encoder_2 d_model {t5.d_model}")
    if tr.pooled_projection_dim != te.hidden_size:
        problems.append(f"transformer pooled_projection_dim {tr.pooled_projection_dim} != text_encoder hidden_size "
                        f"{te.hidden_size}")
    latent = 4 * vae.latent_channels
    # in_channels: the latents (text-to-image), + the control image's latents (Control), + the masked
    # image's latents and the packed mask (Fill): conditioning.py
    takes = (latent, 2 * latent, 2 * latent + fill_mask_channels(vae.scale_factor))
    if tr.patch_size != 1 or tr.output_channels != latent or tr.in_channels not in takes:
        problems.append(f"transformer patch_size {tr.patch_size}, in_channels {tr.in_channels}, out_channels "
                        f"{tr.output_channels} do not take vae latent_channels {vae.latent_channels} packed in 2x2 "
                        f"patches (patch_size 1, out = {latent}, in = {' or '.join(map(str, takes))}: text-to-image, "
                        "Control, Fill)")
    if problems:
        raise ModelDirError("components do not fit together: " + "; ".join(problems) + ".")


def pipeline_class(transformer_config) -> str:
    """model_index.json's `_class_name` for this transformer: FluxPipeline, FluxFillPipeline or
    FluxControlPipeline (from its channels, `conditioning.condition_kind`)."""
    from ldm_rt.families.flux.conditioning import PIPELINE_CLASSES, condition_kind

    return PIPELINE_CLASSES[condition_kind(transformer_config)]


def check_pipeline_class(index: dict[str, Any], transformer_config) -> None:
    """model_index.json must name the pipeline its transformer's channels are for (a Fill transformer
    under FluxPipeline would sample without its conditioning)."""
    name, want = index.get("_class_name"), pipeline_class(transformer_config)
    if name != want:
        raise ModelDirError(f"model_index.json names {name} but the transformer (in_channels "
                            f"{transformer_config.in_channels}, out_channels {transformer_config.output_channels}) is "
                            f"a {want} model; fix _class_name or the transformer/ folder.")


# ---------------------------------------------------------------------------------------------- loading


def _stored_dtype(folder: Path, component: str, name: str) -> torch.dtype:
    """The floating dtype every tensor of a (sharded) component is stored in; fp32 when they differ."""
    from ldm_rt.weights import safetensors_header, weight_files

    files = sorted(set(weight_files(folder, component, name).values()))
    dtypes = {info[0] for path in files for info in safetensors_header(path, component).values()
              if info[0].is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _streamed(factory, folder: Path, component: str, name: str, dtype: torch.dtype | None = None) -> nn.Module:
    """`factory()` filled from its (sharded) safetensors files, in `dtype` (None: the files' own dtype),
    without an fp32 copy."""
    from ldm_rt.weights import empty_module, load_streaming

    module = empty_module(factory, dtype or _stored_dtype(folder, component, name))
    load_streaming(module, folder, component, name)
    return module.eval().requires_grad_(False)


def _clip(config: TextEncoderConfig, folder: Path) -> nn.Module:
    """CLIP from text_encoder/ in its files' dtype, streamed, with either key spelling
    (`models.text_encoder.text_encoder_state_dict_from_file`)."""
    from ldm_rt.models.text_encoder import _SUBMODULES, PREFIX, CLIPTextModel, load_text_encoder
    from ldm_rt.weights import empty_module, load_streaming, read_safetensors, weight_files

    module = empty_module(lambda: CLIPTextModel(config), _stored_dtype(folder, "text_encoder", TRANSFORMERS_WEIGHTS))
    files = weight_files(folder, "text_encoder", TRANSFORMERS_WEIGHTS)
    if any(k.endswith("embeddings.position_ids") for k in files):  # transformers < 4.31 stored this buffer
        load_text_encoder(module, {k: v for path in sorted(set(files.values()))
                                   for k, v in read_safetensors(path, "text_encoder").items()})
    else:
        load_streaming(module, folder, "text_encoder", TRANSFORMERS_WEIGHTS,
                       key_map=lambda k: PREFIX + k if k.startswith(_SUBMODULES) else k)
    return module


def load_flux_dir(root: Path, index: dict[str, Any], family: str) -> FluxComponents:
    from ldm_rt.families.flux.transformer import FluxConfig, FluxTransformer2DModel
    from ldm_rt.model_dir import component_dir
    from ldm_rt.models.t5 import T5Config, T5EncoderModel, T5Tokenizer
    from ldm_rt.models.vae import AutoencoderKL
    from ldm_rt.tokenizer import CLIPTokenizer

    dirs = {name: component_dir(root, name) for name in
            ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")}
    config = FluxModelConfig(
        transformer=FluxConfig.from_dict(read_json(dirs["transformer"] / "config.json", "transformer config")),
        text_encoder=TextEncoderConfig.from_dict(read_json(dirs["text_encoder"] / "config.json", "text_encoder config")),
        text_encoder_2=T5Config.from_dict(read_json(dirs["text_encoder_2"] / "config.json", "text_encoder_2 config")),
        vae=VAEConfig.from_dict(read_json(dirs["vae"] / "config.json", "vae config")),
        scheduler=read_json(dirs["scheduler"] / "scheduler_config.json", "scheduler config"),
    )
    check_compatible(config)  # on the configs, before any weights are read
    check_pipeline_class(index, config.transformer)
    defaults = {**run_defaults(config.transformer), **index.get("_ldm_rt_defaults", {})}

    te = config.text_encoder
    tokenizer = CLIPTokenizer.from_dir(dirs["tokenizer"], max_length=te.max_position_embeddings)
    tokenizer_2 = T5Tokenizer.from_file(dirs["tokenizer_2"] / "tokenizer.json", defaults["max_sequence_length"])
    for what, tok, vocab in (("tokenizer", tokenizer, te.vocab_size),
                             ("tokenizer_2", tokenizer_2, config.text_encoder_2.vocab_size)):
        if tok.vocab_size > vocab:
            raise ModelDirError(f"{what}/ produces ids up to {tok.vocab_size - 1} but its text encoder's vocab_size is "
                                f"{vocab}; the {what}/ folder does not belong to this model.")

    transformer = _streamed(lambda: FluxTransformer2DModel(config.transformer), dirs["transformer"], "transformer",
                            DIFFUSERS_WEIGHTS)
    text_encoder_2 = _streamed(lambda: T5EncoderModel(config.text_encoder_2), dirs["text_encoder_2"],
                               "text_encoder_2", TRANSFORMERS_WEIGHTS)
    text_encoder = _clip(te, dirs["text_encoder"])
    text_encoder.eval().requires_grad_(False)
    vae = _streamed(lambda: AutoencoderKL(config.vae), dirs["vae"], "vae", DIFFUSERS_WEIGHTS)
    return FluxComponents(text_encoder, tokenizer, transformer, vae, dict(config.scheduler), defaults, family=family,
                          text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


# ---------------------------------------------------------------------------------------------- saving


def save_flux_dir(components: FluxComponents, root: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write diffusers' FluxPipeline layout (the module docstring); `load_flux_dir` reads it back
    exactly, and diffusers' `FluxPipeline.from_pretrained` reads it too."""
    from ldm_rt import __version__
    from ldm_rt.weights import write_safetensors, write_sharded

    root = Path(root)
    config = components.config

    def floats(module: nn.Module, skip=()):
        for key, value in module.state_dict().items():
            if key not in skip:
                yield key, value.to(dtype) if value.is_floating_point() else value

    for name in ("transformer", "text_encoder", "text_encoder_2", "vae", "scheduler"):
        (root / name).mkdir(parents=True, exist_ok=True)
    write_json(root / "transformer" / "config.json", config.transformer.to_dict())
    write_sharded(root / "transformer", floats(components.transformer), DIFFUSERS_WEIGHTS, TRANSFORMER_SHARD_BYTES,
                  dtype)
    write_json(root / "text_encoder_2" / "config.json", config.text_encoder_2.to_dict())
    # encoder.embed_tokens is `shared` (tied): stored once, as transformers does
    write_sharded(root / "text_encoder_2", floats(components.text_encoder_2, skip=("encoder.embed_tokens.weight",)),
                  TRANSFORMERS_WEIGHTS, T5_SHARD_BYTES, dtype)
    write_json(root / "text_encoder" / "config.json", config.text_encoder.to_dict())
    write_safetensors(root / "text_encoder" / "model.safetensors", dict(floats(components.text_encoder)))
    components.tokenizer.save(root / "tokenizer")
    components.tokenizer_2.save(root / "tokenizer_2")
    write_json(root / "vae" / "config.json", config.vae.to_dict())
    write_safetensors(root / "vae" / f"{DIFFUSERS_WEIGHTS}.safetensors", dict(floats(components.vae)))
    write_json(root / "scheduler" / "scheduler_config.json", dict(components.scheduler_config))
    index: dict[str, Any] = {"_class_name": pipeline_class(config.transformer), "_ldm_rt_version": __version__, **INDEX_CLASSES}
    own = run_defaults(config.transformer)
    extra = {k: v for k, v in components.defaults.items() if own.get(k, object()) != v}
    if extra:  # diffusers ignores `_` keys of model_index.json
        index["_ldm_rt_defaults"] = extra
    write_json(root / "model_index.json", index)
    return root


# ---------------------------------------------------------------------------------------------- random models


def char_t5_tokenizer(max_length: int):
    """A valid T5-format (sentencepiece Unigram) tokenizer for random-weight models: `<pad>` 0,
    `</s>` 1, `<unk>` 2, then "▁" and single characters (a word is its characters), with the
    normalizer, pre-tokenizer and post-processor of the hub T5 tokenizer.json (less its
    precompiled charsmap)."""
    import string

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from ldm_rt.models.t5 import T5Tokenizer

    chars = [c for c in string.printable if not c.isspace()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -2.5) for c in string.ascii_letters + string.digits] + [(c, -3.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "</s>", "<unk>")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5Tokenizer(tok, max_length)


def random_flux_components(config: FluxModelConfig, seed: int, family: str) -> FluxComponents:
    from ldm_rt.families.flux.transformer import FluxTransformer2DModel
    from ldm_rt.model_dir import randomize_
    from ldm_rt.models.t5 import T5EncoderModel
    from ldm_rt.models.text_encoder import CLIPTextModel
    from ldm_rt.models.vae import AutoencoderKL
    from ldm_rt.tokenizer import CLIPTokenizer

    check_compatible(config)
    generator = torch.Generator("cpu").manual_seed(seed)
    modules = (CLIPTextModel(config.text_encoder), T5EncoderModel(config.text_encoder_2),
               FluxTransformer2DModel(config.transformer), AutoencoderKL(config.vae))
    for module in modules:
        randomize_(module, generator)
        module.eval().requires_grad_(False)
    te = config.text_encoder
    tokenizer = CLIPTokenizer.byte_level(te.bos_token_id, te.eos_token_id, te.pad_token_id,
                                         te.max_position_embeddings, vocab_size=te.vocab_size)
    defaults = run_defaults(config.transformer)
    return FluxComponents(modules[0], tokenizer, modules[2], modules[3], dict(config.scheduler), defaults,
                          family=family, text_encoder_2=modules[1],
                          tokenizer_2=char_t5_tokenizer(defaults["max_sequence_length"]))
