"""Published DiT checkpoints onto ldm-rt's DiT: key maps with strict checks, and loaders.

Two layouts hold the same class-conditional DiT (facebookresearch/DiT, e.g. DiT-XL/2):

- **original** (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`): a torch state dict whose names are
  ldm-rt's own (`x_embedder.proj`, `t_embedder.mlp.0/2`, `y_embedder.embedding_table`,
  `blocks.N.attn.qkv/proj`, `blocks.N.mlp.fc1/fc2`, `blocks.N.adaLN_modulation.1`,
  `final_layer.linear/adaLN_modulation.1`) plus the fixed `pos_embed` buffer, which is checked
  against the sin-cos table ldm-rt computes and then dropped.
- **diffusers** `DiTTransformer2DModel` (a `DiTPipeline` directory's `transformer/`; published
  configs say `Transformer2DModel`): separate `to_q/to_k/to_v` (fused here into `qkv`), and one
  copy of the timestep/label embedders in every block (`transformer_blocks.N.norm1.emb.*`; the
  final layer uses block 0's). ldm-rt keeps one embedder: the copies must be identical, as in
  every published checkpoint (diffusers' convert script copies the original's), or loading stops.

The conventions differ too (`DiTConfig` docs): diffusers' timestep frequencies divide by half - 1
and its MLP LayerNorm eps is its `norm_eps` (1e-5); `config_from_diffusers` sets both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ldm_rt.configs import DiTConfig, VAEConfig, read_json
from ldm_rt.errors import ConfigError, ModelDirError, WeightsError
from ldm_rt.weights import key_problems, load_strict, read_safetensors

DIFFUSERS_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
# DiT paper sizes: hidden -> heads (the head count is not in an original state dict).
_HEADS_BY_HIDDEN = {384: 6, 768: 12, 1024: 16, 1152: 16}


def _check_keys(state_dict: dict, expected: set[str], what: str) -> None:
    problems = key_problems(state_dict, expected)
    if problems:
        raise WeightsError(f"{what}: the state dict does not fit the config: {'; '.join(problems)}.")


def _require_class_model(config: DiTConfig, what: str) -> None:
    if not config.class_conditional or config.cross_attention or config.pos_embed != "sincos":
        raise ConfigError(f"{what}: only class-conditional DiTs with sin-cos positions and no cross-attention "
                          "have this layout.")


# ----------------------------------------------------------------------------- diffusers layout

# (ours, diffusers) for the per-block parameters that are a plain rename; {i} is the block.
_DIFFUSERS_BLOCK = [
    ("blocks.{i}.attn.proj", "transformer_blocks.{i}.attn1.to_out.0"),
    ("blocks.{i}.mlp.fc1", "transformer_blocks.{i}.ff.net.0.proj"),
    ("blocks.{i}.mlp.fc2", "transformer_blocks.{i}.ff.net.2"),
    ("blocks.{i}.adaLN_modulation.1", "transformer_blocks.{i}.norm1.linear"),
]
_DIFFUSERS_TOP = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("final_layer.adaLN_modulation.1", "proj_out_1"),
    ("final_layer.linear", "proj_out_2"),
]
# The embedders diffusers copies into every block: (ours, diffusers suffix after norm1.emb.).
_DIFFUSERS_EMBEDDERS = [
    ("t_embedder.mlp.0.weight", "timestep_embedder.linear_1.weight"),
    ("t_embedder.mlp.0.bias", "timestep_embedder.linear_1.bias"),
    ("t_embedder.mlp.2.weight", "timestep_embedder.linear_2.weight"),
    ("t_embedder.mlp.2.bias", "timestep_embedder.linear_2.bias"),
    ("y_embedder.embedding_table.weight", "class_embedder.embedding_table.weight"),
]


def _diffusers_pairs(config: DiTConfig) -> list[tuple[str, str]]:
    """(ours, diffusers) full key pairs for every plain rename."""
    pairs = [(f"{a}.{p}", f"{b}.{p}") for a, b in _DIFFUSERS_TOP for p in ("weight", "bias")]
    for i in range(config.depth):
        pairs += [(a.format(i=i) + f".{p}", b.format(i=i) + f".{p}") for a, b in _DIFFUSERS_BLOCK
                  for p in ("weight", "bias")]
    return pairs


def _diffusers_emb(i: int, suffix: str) -> str:
    return f"transformer_blocks.{i}.norm1.emb.{suffix}"


def diffusers_keys(config: DiTConfig) -> set[str]:
    keys = {b for _, b in _diffusers_pairs(config)}
    for i in range(config.depth):
        keys |= {_diffusers_emb(i, s) for _, s in _DIFFUSERS_EMBEDDERS}
        keys |= {f"transformer_blocks.{i}.attn1.to_{n}.{p}" for n in "qkv" for p in ("weight", "bias")}
    return keys


def from_diffusers(state_dict: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """diffusers DiTTransformer2DModel state dict -> ldm-rt DiT state dict (strict)."""
    _require_class_model(config, "diffusers DiT")
    _check_keys(state_dict, diffusers_keys(config), "transformer (diffusers DiTTransformer2DModel)")
    out = {ours: state_dict[theirs] for ours, theirs in _diffusers_pairs(config)}
    for ours, suffix in _DIFFUSERS_EMBEDDERS:
        first = state_dict[_diffusers_emb(0, suffix)]
        for i in range(1, config.depth):
            other = state_dict[_diffusers_emb(i, suffix)]
            if other.shape != first.shape or not torch.equal(other, first):
                raise WeightsError(
                    f"transformer (diffusers DiTTransformer2DModel): block {i}'s {_diffusers_emb(i, suffix)} differs "
                    f"from block 0's. ldm-rt keeps one timestep/label embedder, as the original DiT and every "
                    f"published DiT checkpoint do (diffusers' convert script copies it into each block); a "
                    f"checkpoint trained with untied per-block embedders cannot be loaded."
                )
        out[ours] = first
    for i in range(config.depth):
        for p in ("weight", "bias"):
            q, k, v = (state_dict[f"transformer_blocks.{i}.attn1.to_{n}.{p}"] for n in "qkv")
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([q, k, v], dim=0)  # rows [q; k; v], as timm's qkv
    return out


def to_diffusers(state_dict: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """ldm-rt DiT state dict -> diffusers DiTTransformer2DModel state dict (the inverse map)."""
    _require_class_model(config, "diffusers DiT")
    out = {theirs: state_dict[ours] for ours, theirs in _diffusers_pairs(config)}
    for i in range(config.depth):
        for ours, suffix in _DIFFUSERS_EMBEDDERS:
            out[_diffusers_emb(i, suffix)] = state_dict[ours].clone()
        for p in ("weight", "bias"):
            for n, part in zip("qkv", state_dict[f"blocks.{i}.attn.qkv.{p}"].chunk(3, dim=0)):
                out[f"transformer_blocks.{i}.attn1.to_{n}.{p}"] = part.clone()
    return out


# diffusers config keys and the value ldm-rt's DiT computes with; any other value is refused.
_DIFFUSERS_FIXED = {
    "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
    "norm_elementwise_affine": False, "cross_attention_dim": None, "num_vector_embeds": None,
    "only_cross_attention": False, "double_self_attention": False, "use_linear_projection": False,
    "attention_type": "default", "caption_channels": None,
}
# Keys that only matter for training, other model types, or nothing at inference here.
_DIFFUSERS_IGNORED = {"dropout", "norm_num_groups", "upcast_attention", "interpolation_scale"}
_DIFFUSERS_USED = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
                   "sample_size", "patch_size", "num_embeds_ada_norm", "norm_eps"}


def config_from_diffusers(data: dict[str, Any]) -> DiTConfig:
    """diffusers DiTTransformer2DModel (or legacy Transformer2DModel) config -> DiTConfig."""
    what = "transformer config (diffusers DiT)"
    name = data.get("_class_name", "DiTTransformer2DModel")
    if name not in DIFFUSERS_DIT_CLASSES:
        raise ConfigError(f"{what}: _class_name {name!r} is not one of {', '.join(DIFFUSERS_DIT_CLASSES)}.")
    for key, value in _DIFFUSERS_FIXED.items():
        if key in data and data[key] != value and not (key == "attention_type" and data[key] is None):
            raise ConfigError(f"{what}: {key}={data[key]!r} is not supported; ldm-rt's DiT computes {key}={value!r}.")
    if data.get("patch_size") is None or data.get("num_embeds_ada_norm") is None:
        raise ConfigError(f"{what}: patch_size and num_embeds_ada_norm must be set (a class-conditional DiT).")
    unknown = sorted(k for k in data if not k.startswith("_") and k not in _DIFFUSERS_FIXED
                     and k not in _DIFFUSERS_IGNORED and k not in _DIFFUSERS_USED)
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {unknown}.")
    heads, head_dim = int(data.get("num_attention_heads", 16)), int(data.get("attention_head_dim", 72))
    in_channels = int(data.get("in_channels", 4))
    try:
        return DiTConfig(
            sample_size=int(data.get("sample_size", 32)),
            in_channels=in_channels,
            out_channels=data.get("out_channels") or in_channels,
            patch_size=int(data["patch_size"]),
            hidden_size=heads * head_dim,
            depth=int(data.get("num_layers", 28)),
            num_heads=heads,
            num_classes=int(data["num_embeds_ada_norm"]),
            cross_attention=False,
            pos_embed="sincos",
            timestep_freq_shift=1,  # CombinedTimestepLabelEmbeddings: Timesteps(downscale_freq_shift=1)
            norm_eps=1e-6,  # AdaLayerNormZero's norm and norm_out are fixed at 1e-6
            mlp_norm_eps=float(data.get("norm_eps", 1e-5)),  # norm3, before the feed-forward
        )
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None



# ----------------------------------------------------------------------------- original layout


def original_keys(config: DiTConfig) -> set[str]:
    """The facebookresearch/DiT state dict keys: ldm-rt's own, plus the pos_embed buffer."""
    from ldm_rt.models.dit import DiT

    with torch.device("meta"):
        return set(DiT(config).state_dict()) | {"pos_embed"}


def from_original(state_dict: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """facebookresearch/DiT state dict -> ldm-rt DiT state dict; `pos_embed` must be the fixed
    sin-cos table of the training grid (it is a frozen buffer there, recomputed here)."""
    from ldm_rt.models.dit import sincos_pos_embed

    _require_class_model(config, "original DiT")
    _check_keys(state_dict, original_keys(config), "transformer (facebookresearch/DiT)")
    n = config.sample_size // config.patch_size
    expected = sincos_pos_embed(n, n, config.hidden_size, n)[None]  # (1, N, D)
    stored = state_dict["pos_embed"]
    if stored.shape != expected.shape:
        raise WeightsError(f"transformer (facebookresearch/DiT): pos_embed has shape {tuple(stored.shape)}, the "
                           f"config's {n}x{n} token grid needs {tuple(expected.shape)}.")
    diff = (stored.float() - expected).abs().max().item()
    if diff > 1e-5:
        raise WeightsError(f"transformer (facebookresearch/DiT): pos_embed is not DiT's fixed 2D sin-cos table "
                           f"(max difference {diff:.2e}); a learned position embedding is not supported.")
    return {k: v for k, v in state_dict.items() if k != "pos_embed"}


def to_original(state_dict: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """ldm-rt DiT state dict -> facebookresearch/DiT state dict (adds the pos_embed buffer)."""
    from ldm_rt.models.dit import sincos_pos_embed

    _require_class_model(config, "original DiT")
    n = config.sample_size // config.patch_size
    return {**state_dict, "pos_embed": sincos_pos_embed(n, n, config.hidden_size, n)[None]}


def config_from_original(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """Infer the DiTConfig of a facebookresearch/DiT state dict from its shapes.

    The head count is not in the weights: it is the DiT paper's for its width (S 6, B 12,
    L/XL 16) unless `num_heads` is given.
    """
    what = "transformer (facebookresearch/DiT)"
    for key in ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight"):
        if key not in state_dict:
            raise WeightsError(f"{what}: no {key!r} in the checkpoint; is this a facebookresearch/DiT state dict?")
    hidden, in_channels, p, _ = state_dict["x_embedder.proj.weight"].shape
    tokens = state_dict["pos_embed"].shape[1]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise WeightsError(f"{what}: pos_embed has {tokens} tokens, not a square grid.")
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    heads = num_heads or _HEADS_BY_HIDDEN.get(hidden)
    if heads is None:
        raise ConfigError(f"{what}: hidden size {hidden} is not a DiT paper size; give the number of attention heads (--num-heads).")
    try:
        return DiTConfig(
            sample_size=side * p, in_channels=in_channels,
            out_channels=state_dict["final_layer.linear.weight"].shape[0] // (p * p), patch_size=p,
            hidden_size=hidden, depth=depth, num_heads=heads,
            mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
            num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
            cross_attention=False, pos_embed="sincos",
        )
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def read_original_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A facebookresearch/DiT `.pt`: a plain state dict, or a training checkpoint whose "ema"
    (else "model") entry is one, as DiT's sample.py reads it. Loaded with weights_only=True."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist.")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        raise WeightsError(f"{path} is not a readable torch checkpoint ({str(exc).splitlines()[0]}).") from None
    if isinstance(data, dict) and "ema" in data:
        data = data["ema"]
    elif isinstance(data, dict) and "model" in data:
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in data.items()}


# ----------------------------------------------------------------------------- loaders


def load_vae_dir(vae_dir: Path):
    """A diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)."""
    from ldm_rt.models.vae import AutoencoderKL

    vae_dir = Path(vae_dir).expanduser()
    if (vae_dir / "vae" / "config.json").is_file():  # a whole model directory was given
        vae_dir = vae_dir / "vae"
    if not (vae_dir / "config.json").is_file():
        raise ModelDirError(f"{vae_dir} is not a diffusers AutoencoderKL folder (no config.json).")
    vae = AutoencoderKL(VAEConfig.from_dict(read_json(vae_dir / "config.json", "vae config")))
    load_strict(vae, read_safetensors(vae_dir / DIFFUSERS_WEIGHTS, "vae"), "vae")
    return vae.eval().requires_grad_(False)
