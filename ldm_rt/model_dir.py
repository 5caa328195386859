"""Model directories in the diffusers layout, and `init-model`.

```
model_index.json            component classes
text_encoder/config.json + model.safetensors              (transformers CLIPTextModel)
tokenizer/                  tokenizer.json, or vocab.json + merges.txt (CLIP)
transformer/config.json + diffusion_pytorch_model.safetensors   (ldm-rt DiT)
vae/config.json + diffusion_pytorch_model.safetensors           (diffusers AutoencoderKL)
scheduler/scheduler_config.json
```
Loading is strict: a missing component, file or key is a one-sentence error naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm_rt import __version__
from ldm_rt.configs import DiTConfig, ModelConfig, TextEncoderConfig, VAEConfig, read_json, write_json
from ldm_rt.errors import InputError, ModelDirError
from ldm_rt.models.dit import DiT
from ldm_rt.models.text_encoder import CLIPTextModel, load_text_encoder
from ldm_rt.models.vae import AutoencoderKL
from ldm_rt.tokenizer import CLIPTokenizer
from ldm_rt.weights import load_strict, read_safetensors, write_safetensors

TEXT_ENCODER_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
COMPONENTS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")


@dataclass
class Components:
    """Everything a pipeline needs, as reference modules on the CPU in fp32.

    A class-conditional DiT (ImageNet DiT) has no text encoder and no tokenizer (both None).
    """

    text_encoder: CLIPTextModel | None
    tokenizer: CLIPTokenizer | None
    transformer: DiT
    vae: AutoencoderKL
    scheduler_config: dict[str, Any]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # run defaults (steps, guidance, size)

    @property
    def config(self) -> ModelConfig:
        te = None if self.text_encoder is None else self.text_encoder.config
        return ModelConfig(te, self.transformer.config, self.vae.config, dict(self.scheduler_config))


def _component_dir(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_dir():
        raise ModelDirError(f"model directory {root} has no '{name}/' component folder.")
    return path


def load_model_dir(path: str | Path) -> Components:
    """Read a model directory into reference modules (CPU, fp32)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelDirError(f"model directory {root} does not exist.")
    if not (root / "model_index.json").is_file():
        raise ModelDirError(
            f"{root} is not a model directory (no model_index.json); create one with `ldm-rt init-model`."
        )
    index = read_json(root / "model_index.json", "model_index.json")
    if index.get("_class_name") == "DiTPipeline":  # diffusers' class-conditional DiT, converted on load
        from ldm_rt.dit_checkpoints import load_dit_pipeline_dir

        return load_dit_pipeline_dir(root, index)

    tr_dir = _component_dir(root, "transformer")
    vae_dir = _component_dir(root, "vae")
    dit_config = DiTConfig.from_dict(read_json(tr_dir / "config.json", "transformer config"))
    vae_config = VAEConfig.from_dict(read_json(vae_dir / "config.json", "vae config"))
    if dit_config.class_conditional:  # class labels, no text: no text_encoder/ or tokenizer/
        return _load_class_model_dir(root, index, tr_dir, dit_config, vae_config)
    te_dir = _component_dir(root, "text_encoder")
    te_config = TextEncoderConfig.from_dict(read_json(te_dir / "config.json", "text_encoder config"))
    # Checked on the config files, before any weights are read: a config edited to a size that
    # does not fit the other components is reported as that (ModelDirError naming both values),
    # not as the weight-shape mismatch it also causes (which used to be raised first).
    check_compatible(te_config, dit_config, vae_config)

    text_encoder = CLIPTextModel(te_config)
    load_text_encoder(text_encoder, read_safetensors(te_dir / TEXT_ENCODER_WEIGHTS, "text_encoder"))

    tokenizer = CLIPTokenizer.from_dir(_component_dir(root, "tokenizer"), max_length=te_config.max_position_embeddings)
    if tokenizer.vocab_size > te_config.vocab_size:
        raise ModelDirError(
            f"the tokenizer produces ids up to {tokenizer.vocab_size - 1} but the text encoder's vocab_size "
            f"is {te_config.vocab_size}; the tokenizer/ folder does not belong to this text encoder."
        )

    transformer = DiT(dit_config)
    load_strict(transformer, read_safetensors(tr_dir / DIFFUSERS_WEIGHTS, "transformer"), "transformer")

    vae = AutoencoderKL(vae_config)
    load_strict(vae, read_safetensors(vae_dir / DIFFUSERS_WEIGHTS, "vae"), "vae")

    scheduler_config = read_json(_component_dir(root, "scheduler") / "scheduler_config.json", "scheduler config")
    for module in (text_encoder, transformer, vae):
        module.eval().requires_grad_(False)
    return Components(text_encoder, tokenizer, transformer, vae, scheduler_config, dict(index.get("_ldm_rt_defaults", {})))


def _load_class_model_dir(root: Path, index: dict, tr_dir: Path, dit_config: DiTConfig,
                          vae_config: VAEConfig) -> Components:
    check_compatible(None, dit_config, vae_config)
    transformer = DiT(dit_config)
    load_strict(transformer, read_safetensors(tr_dir / DIFFUSERS_WEIGHTS, "transformer"), "transformer")
    vae = AutoencoderKL(vae_config)
    load_strict(vae, read_safetensors(root / "vae" / DIFFUSERS_WEIGHTS, "vae"), "vae")
    scheduler_config = read_json(_component_dir(root, "scheduler") / "scheduler_config.json", "scheduler config")
    for module in (transformer, vae):
        module.eval().requires_grad_(False)
    return Components(None, None, transformer, vae, scheduler_config, dict(index.get("_ldm_rt_defaults", {})))


def check_compatible(te: TextEncoderConfig | None, dit: DiTConfig, vae: VAEConfig) -> None:
    """The components must agree on the shapes that pass between them (te None: a class model)."""
    if te is None or dit.class_conditional:
        problems = []
        if te is not None or not dit.class_conditional:
            problems.append("a class-conditional transformer (num_classes set) goes without a text encoder, "
                            "a text-conditioned one needs one")
        if dit.in_channels != vae.latent_channels:
            problems.append(f"transformer in_channels {dit.in_channels} != vae latent_channels {vae.latent_channels}")
        if problems:
            raise ModelDirError("components do not fit together: " + "; ".join(problems) + ".")
        return  # out_channels is in_channels or 2 x (learned sigma): DiTConfig checks it
    problems = []
    if dit.context_dim != te.hidden_size:
        problems.append(f"transformer context_dim {dit.context_dim} != text_encoder hidden_size {te.hidden_size}")
    if dit.pooled_dim != te.hidden_size:
        problems.append(f"transformer pooled_dim {dit.pooled_dim} != text_encoder hidden_size {te.hidden_size}")
    if dit.in_channels != vae.latent_channels:
        problems.append(f"transformer in_channels {dit.in_channels} != vae latent_channels {vae.latent_channels}")
    # The prediction is added to the latents by the scheduler step: an out_channels other than the
    # latent channels (e.g. DiT's learned-sigma 2*C) used to load and then fail mid-denoising with a
    # broadcasting traceback.
    if dit.output_channels != vae.latent_channels:
        problems.append(
            f"transformer out_channels {dit.output_channels} != vae latent_channels {vae.latent_channels}"
        )
    if problems:
        raise ModelDirError("components do not fit together: " + "; ".join(problems) + ".")


def save_model_dir(components: Components, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `components` as a model directory; `load_model_dir` reads it back exactly."""
    root = Path(path).expanduser()
    text = components.text_encoder is not None
    for name in COMPONENTS if text else ("transformer", "vae", "scheduler"):
        (root / name).mkdir(parents=True, exist_ok=True)

    def tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + k: v.to(dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}

    if text:
        write_json(root / "text_encoder" / "config.json", components.text_encoder.config.to_dict())
        write_safetensors(root / "text_encoder" / TEXT_ENCODER_WEIGHTS, tensors(components.text_encoder))
        components.tokenizer.save(root / "tokenizer")
    write_json(root / "transformer" / "config.json", components.transformer.config.to_dict())
    write_safetensors(root / "transformer" / DIFFUSERS_WEIGHTS, tensors(components.transformer))
    write_json(root / "vae" / "config.json", components.vae.config.to_dict())
    write_safetensors(root / "vae" / DIFFUSERS_WEIGHTS, tensors(components.vae))
    write_json(root / "scheduler" / "scheduler_config.json", dict(components.scheduler_config))
    index = {
        "_class_name": "LdmRtPipeline",
        "_ldm_rt_version": __version__,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "transformer": ["ldm_rt", "DiT"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", components.scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")],
    }
    if not text:  # a class-conditional DiT: ImageNet class names or indices instead of prompts
        index["text_encoder"] = index["tokenizer"] = None
    if components.defaults:
        index["_ldm_rt_defaults"] = dict(components.defaults)
    write_json(root / "model_index.json", index)
    return root


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter with seeded, non-zero random values (unlike a training init).

    adaLN-Zero and final layers are NOT zeroed, so parity checks on such a model exercise every
    weight. Matrices: uniform(+-1/sqrt(fan_in)) as PyTorch's default; norm scales 1 + 0.1 N(0,1);
    biases and embeddings 0.02 N(0,1).
    """
    for name, p in module.named_parameters():
        if p.ndim >= 2 and "embedding" not in name:
            bound = 1.0 / (p[0].numel() ** 0.5)  # fan_in = in_features * kernel area
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
        elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm / GroupNorm / RMSNorm scales
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
        else:
            p.copy_(0.02 * torch.randn(p.shape, generator=generator))
        if (p == 0).all():  # cannot happen with continuous draws; guard the promise anyway
            raise AssertionError(f"init left {name} all zero")


def random_components(config: ModelConfig, seed: int = 0) -> Components:
    """Reference modules for `config` with seeded non-zero random weights and a byte-level tokenizer."""
    generator = torch.Generator("cpu").manual_seed(seed)
    if config.text_encoder is None:  # class-conditional: no text encoder, no tokenizer
        transformer, vae = DiT(config.transformer), AutoencoderKL(config.vae)
        for module in (transformer, vae):
            randomize_(module, generator)
            module.eval().requires_grad_(False)
        return Components(None, None, transformer, vae, dict(config.scheduler))
    text_encoder = CLIPTextModel(config.text_encoder)
    transformer = DiT(config.transformer)
    vae = AutoencoderKL(config.vae)
    for module in (text_encoder, transformer, vae):
        randomize_(module, generator)
        module.eval().requires_grad_(False)
    te = config.text_encoder
    tokenizer = CLIPTokenizer.byte_level(
        te.bos_token_id, te.eos_token_id, te.pad_token_id, te.max_position_embeddings, vocab_size=te.vocab_size
    )
    return Components(text_encoder, tokenizer, transformer, vae, dict(config.scheduler))


def init_model(
    path: str | Path, preset: str, seed: int = 0, dtype: torch.dtype = torch.float32, overwrite: bool = False
) -> Path:
    """`ldm-rt init-model`: a complete model directory for `preset` with seeded random weights.

    An existing non-empty directory is refused, unless `overwrite` is set and it is a model
    directory (has model_index.json): then it is replaced.
    """
    from ldm_rt.seeds import check_seed

    seed = check_seed(seed)
    config = ModelConfig.from_name(preset)
    root = writable_dir(prepare_out_dir(path, overwrite))  # fail before the (slow, for big presets) weights
    components = random_components(config, seed)
    return save_model_dir(components, root, dtype=dtype)


DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"


def writable_dir(path: str | Path) -> Path:
    """Create output directory `path` if needed and prove it writable with a real write, not
    os.access (root passes os.access on directories it still cannot write, such as /sys)."""
    import tempfile

    out_dir = Path(path).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory {out_dir}: {exc.strerror or exc}.") from None
    if not out_dir.is_dir():
        raise InputError(f"output path {out_dir} exists and is not a directory; give a directory.")
    try:
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError:
        raise InputError(f"output directory {out_dir} is not writable; choose another directory.") from None
    return out_dir


def prepare_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    """An output model directory: new or empty; an existing model directory only with `overwrite`
    (then it is removed first); anything else is refused."""
    import shutil

    root = Path(path).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        if not overwrite:
            raise ModelDirError(f"{root} already exists and is not empty; choose a new directory or pass --overwrite.")
        if not (root / "model_index.json").is_file():
            raise ModelDirError(f"{root} is not a model directory (no model_index.json); refusing to overwrite it.")
        shutil.rmtree(root)
    return root


def default_model_dir() -> Path:
    """The built-in demo model shipped inside the package (`ldm_rt/demo/model`)."""
    path = DEMO_MODEL_DIR
    if not (path / "model_index.json").is_file():
        raise ModelDirError(
            "no --model-dir given and this install has no built-in demo model; create one with "
            "`ldm-rt init-model DIR --preset tiny` and pass --model-dir DIR."
        )
    return path
