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

from pathlib import Path

import torch
from torch import nn

from ldm_rt import __version__
from ldm_rt.components import Components
from ldm_rt.configs import read_json, write_json
from ldm_rt.errors import InputError, ModelDirError
from ldm_rt.weights import load_strict, read_safetensors, write_safetensors

TEXT_ENCODER_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
COMPONENTS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")

__all__ = ["Components", "load_model_dir", "save_model_dir", "random_components", "init_model", "randomize_",
           "default_model_dir", "prepare_out_dir", "writable_dir"]


def component_dir(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_dir():
        raise ModelDirError(f"model directory {root} has no '{name}/' component folder.")
    return path


def load_module(module: nn.Module, folder: Path, what: str, weights: str = DIFFUSERS_WEIGHTS) -> nn.Module:
    """`module` with the weights of `folder/weights` (strict), in eval mode without gradients."""
    load_strict(module, read_safetensors(folder / weights, what), what)
    return module.eval().requires_grad_(False)


def load_model_dir(path: str | Path) -> Components:
    """Read a model directory into reference modules (CPU, fp32): the family recognised from its
    model_index.json (`ldm_rt.families.for_index`) loads it."""
    from ldm_rt import families

    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelDirError(f"model directory {root} does not exist.")
    if not (root / "model_index.json").is_file():
        raise ModelDirError(
            f"{root} is not a model directory (no model_index.json); create one with `ldm-rt init-model`."
        )
    index = read_json(root / "model_index.json", "model_index.json")
    family = families.for_index(index, root)
    components = family.load(root, index)
    components.family = family.name
    return components


def save_model_dir(components: Components, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `components` as a model directory (their family's layout); `load_model_dir` reads it
    back exactly."""
    from ldm_rt import families

    return families.for_components(components).save(components, Path(path).expanduser(), dtype)


def write_ldm_rt_layout(components: Components, root: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The `LdmRtPipeline` layout (this module's docstring) of the DiT families."""
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


def random_components(config, seed: int = 0) -> Components:
    """Reference modules for `config` with seeded non-zero random weights (its family's; a text
    model gets a byte-level tokenizer)."""
    from ldm_rt import families

    return families.for_config(config).random_components(config, seed)


def init_model(
    path: str | Path, preset: str, seed: int = 0, dtype: torch.dtype = torch.float32, overwrite: bool = False
) -> Path:
    """`ldm-rt init-model`: a complete model directory for `preset` with seeded random weights.

    An existing non-empty directory is refused, unless `overwrite` is set and it is a model
    directory (has model_index.json): then it is replaced.
    """
    from ldm_rt import families
    from ldm_rt.seeds import check_seed

    seed = check_seed(seed)
    family, config = families.preset(preset)
    root = writable_dir(prepare_out_dir(path, overwrite))  # fail before the (slow, for big presets) weights
    return family.save(family.random_components(config, seed), root, dtype)


DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"
DEMO_SR_MODEL_DIR = Path(__file__).parent / "demo" / "sr_model"  # the 2x super-resolution demo (issue 17)


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


def default_sr_model_dir() -> Path:
    """The built-in 2x super-resolution demo model (`ldm_rt/demo/sr_model`), what `ldm-rt upscale` uses."""
    if not (DEMO_SR_MODEL_DIR / "model_index.json").is_file():
        raise ModelDirError("no --model-dir given and this install has no built-in super-resolution model; train one "
                            "with `ldm-rt train-demo --config sr` (README, 'Super-resolution demo').")
    return DEMO_SR_MODEL_DIR


def default_model_dir() -> Path:
    """The built-in demo model shipped inside the package (`ldm_rt/demo/model`)."""
    path = DEMO_MODEL_DIR
    if not (path / "model_index.json").is_file():
        raise ModelDirError(
            "no --model-dir given and this install has no built-in demo model; create one with "
            "`ldm-rt init-model DIR --preset tiny` and pass --model-dir DIR."
        )
    return path
