"""diffusers `DiTPipeline` directories and facebookresearch/DiT checkpoints -> `Components`
(the key maps and config readers are `ldm_rt/dit_checkpoints.py`), and `ldm-rt convert`."""

from __future__ import annotations

from pathlib import Path

from ldm_rt.components import Components
from ldm_rt.configs import DIT_DDIM_SCHEDULER, VAEConfig, read_json
from ldm_rt.dit_checkpoints import (
    DIFFUSERS_WEIGHTS,
    config_from_diffusers,
    config_from_original,
    from_diffusers,
    from_original,
    load_vae_dir,
    read_original_checkpoint,
)
from ldm_rt.errors import ModelDirError
from ldm_rt.families.dit_class import DIT_PIPELINE_DEFAULTS, check_compatible
from ldm_rt.weights import load_strict, read_safetensors


def load_dit_pipeline_dir(root: Path) -> Components:
    """A diffusers `DiTPipeline` directory -> `Components` (converted on load; no text encoder)."""
    from ldm_rt.models.dit import DiT

    for name in ("transformer", "vae", "scheduler"):
        if not (root / name).is_dir():
            raise ModelDirError(f"DiTPipeline directory {root} has no '{name}/' component folder.")
    config = config_from_diffusers(read_json(root / "transformer" / "config.json", "transformer config"))
    vae_config = VAEConfig.from_dict(read_json(root / "vae" / "config.json", "vae config"))
    check_compatible(config, vae_config)
    transformer = DiT(config)
    weights = read_safetensors(root / "transformer" / DIFFUSERS_WEIGHTS, "transformer")
    load_strict(transformer, from_diffusers(weights, config), "transformer")
    vae = load_vae_dir(root / "vae")
    scheduler = read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
    transformer.eval().requires_grad_(False)
    return Components(None, None, transformer, vae, scheduler, dict(DIT_PIPELINE_DEFAULTS), family="dit-class")


def convert_original(checkpoint: str | Path, vae_dir: str | Path, out: str | Path, num_heads: int | None = None,
                     overwrite: bool = False) -> Path:
    """`ldm-rt convert --from dit-original FILE --vae DIR --out DIR`: a standard ldm-rt model directory."""
    from ldm_rt.model_dir import prepare_out_dir, save_model_dir
    from ldm_rt.models.dit import DiT

    state_dict = read_original_checkpoint(checkpoint)
    config = config_from_original(state_dict, num_heads)
    vae = load_vae_dir(Path(vae_dir))
    check_compatible(config, vae.config)
    root = prepare_out_dir(out, overwrite)
    transformer = DiT(config)
    load_strict(transformer, from_original(state_dict, config), "transformer")
    transformer.eval().requires_grad_(False)
    components = Components(None, None, transformer, vae, dict(DIT_DDIM_SCHEDULER), dict(DIT_PIPELINE_DEFAULTS),
                            family="dit-class")
    return save_model_dir(components, root)


def convert_diffusers(model_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`ldm-rt convert --from dit-diffusers DIR --out DIR`: a DiTPipeline directory, rewritten in ldm-rt's layout."""
    from ldm_rt.model_dir import load_model_dir, prepare_out_dir, save_model_dir

    components = load_model_dir(model_dir)
    if not components.transformer.config.class_conditional:
        raise ModelDirError(f"{model_dir} is not a diffusers DiTPipeline directory.")
    return save_model_dir(components, prepare_out_dir(out, overwrite))
