"""Model directories: exact round trips, directories written by transformers/diffusers, the
non-zero `init-model` weights, and components that do not fit together."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import transformers
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from safetensors.torch import load_file, save_file

from random_weights import randomize_ as _randomize_
from ldm_rt.configs import ModelConfig, TextEncoderConfig
from ldm_rt.errors import ModelDirError
from ldm_rt.model_dir import Components, init_model, load_model_dir, random_components, save_model_dir
from ldm_rt.models.dit import DiT
from ldm_rt.models.text_encoder import CLIPTextModel
from ldm_rt.weights import read_safetensors

TINY = ModelConfig.from_name("tiny")
FP32_ATOL = 1e-5  # max-abs of our modules against the library modules on the same weights
PROMPTS = [
    "a red circle", "", "Two   BLUE squares, 3 triangles!", "ünïcödé and emoji 🐱", "long prompt " * 20,
]


def _modules(c: Components) -> dict[str, torch.nn.Module]:
    return {"text_encoder": c.text_encoder, "transformer": c.transformer, "vae": c.vae}


# ------------------------------------------------------------------------------ 1. round trip


def test_save_load_round_trip_is_exact(tmp_path):
    original = random_components(TINY, seed=3)
    loaded = load_model_dir(save_model_dir(original, tmp_path / "m"))

    for name, module in _modules(original).items():
        ours, theirs = module.state_dict(), _modules(loaded)[name].state_dict()
        assert list(ours) == list(theirs), name
        for key, value in ours.items():
            assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), f"{name}.{key}"
    assert loaded.config == original.config  # all three component configs and the scheduler dict
    assert loaded.scheduler_config == original.scheduler_config == TINY.scheduler
    assert loaded.defaults == original.defaults
    a, b = original.tokenizer(PROMPTS), loaded.tokenizer(PROMPTS)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    assert a.truncated == b.truncated == [False, False, False, False, True]
    assert loaded.tokenizer.max_length == original.tokenizer.max_length


def test_fp16_save_loads_into_fp32_modules_with_fp16_rounded_values(tmp_path):
    original = random_components(TINY, seed=4)
    root = save_model_dir(original, tmp_path / "m", dtype=torch.float16)
    stored = read_safetensors(root / "transformer" / "diffusion_pytorch_model.safetensors", "transformer")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    loaded = load_model_dir(root)

    rounded_anything = False
    for name, module in _modules(original).items():
        theirs = _modules(loaded)[name].state_dict()
        for key, value in module.state_dict().items():
            expected = value.to(torch.float16).to(torch.float32)
            assert theirs[key].dtype == torch.float32, f"{name}.{key}"
            assert torch.equal(theirs[key], expected), f"{name}.{key}"
            rounded_anything |= not torch.equal(expected, value)
    assert rounded_anything  # the fp16 file really did round the random weights


# ------------------------------------------------------------------------------ 2. library-written dirs


def test_directory_written_by_transformers_and_diffusers_loads_as_is(tmp_path):
    """text_encoder/ from transformers' CLIPTextModel.save_pretrained, vae/ from diffusers'
    AutoencoderKL.save_pretrained; our modules give the library modules' outputs."""
    root = save_model_dir(random_components(TINY, seed=0), tmp_path / "m")
    te = TINY.text_encoder
    hf_config = transformers.CLIPTextConfig(
        **{k: v for k, v in te.to_dict().items() if k not in ("architectures", "model_type")}
    )
    hf_te = transformers.CLIPTextModel(hf_config).eval()
    _randomize_(hf_te, seed=10)
    vae_kwargs = {k: v for k, v in TINY.vae.to_dict().items() if not k.startswith("_")}
    hf_vae = DiffusersAutoencoderKL(**vae_kwargs).eval()
    _randomize_(hf_vae, seed=11)
    # matching tiny configs: what the DiT reads from the text encoder and writes for the VAE
    assert hf_te.config.hidden_size == TINY.transformer.context_dim == TINY.transformer.pooled_dim
    assert hf_vae.config.latent_channels == TINY.transformer.in_channels
    for name, model in (("text_encoder", hf_te), ("vae", hf_vae)):
        shutil.rmtree(root / name)
        model.save_pretrained(root / name)
    # transformers 5.x writes the keys without the `text_model.` prefix our module uses
    te_keys = read_safetensors(root / "text_encoder" / "model.safetensors", "text_encoder")
    assert not any(k.startswith("text_model.") for k in te_keys)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model_dir(root)
    assert not [w for w in caught if "unknown config key" in str(w.message)]

    ids = loaded.tokenizer(PROMPTS).input_ids  # (5, 32)
    with torch.no_grad():
        hidden, pooled = loaded.text_encoder(ids)
        ref = hf_te(input_ids=ids)
    assert (hidden - ref.last_hidden_state).abs().max().item() <= FP32_ATOL
    assert (pooled - ref.pooler_output).abs().max().item() <= FP32_ATOL

    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, TINY.vae.latent_channels, 5, 7, generator=g)  # odd latent sizes, batch 3
    image = torch.randn(2, 3, 12, 10, generator=g)
    with torch.no_grad():
        assert (loaded.vae.decode(z) - hf_vae.decode(z).sample).abs().max().item() <= FP32_ATOL
        mean, logvar = loaded.vae.encode(image)
        dist = hf_vae.encode(image).latent_dist
    assert (mean - dist.mean).abs().max().item() <= FP32_ATOL
    assert (logvar - dist.logvar).abs().max().item() <= FP32_ATOL


# ------------------------------------------------------------------------------ 3. init-model weights


def test_init_model_weights_are_all_non_zero(tiny_model_dir):
    loaded = load_model_dir(tiny_model_dir)
    for name, module in _modules(loaded).items():
        for key, p in module.named_parameters():
            assert not (p == 0).all(), f"{name}.{key} is all zeros"
    dit = loaded.transformer
    zero_init = [dit.final_layer.adaLN_modulation[-1], dit.final_layer.linear]
    zero_init += [m for b in dit.blocks for m in (b.adaLN_modulation[-1], b.cross_attn.proj)]
    for layer in zero_init:
        assert (layer.weight != 0).all() and (layer.bias != 0).all()

    # Contrast: the training init zeroes exactly these layers, so the checks above can fail.
    trained = DiT(TINY.transformer)
    trained.initialize_weights()
    zeroed = [trained.final_layer.adaLN_modulation[-1], trained.final_layer.linear]
    zeroed += [m for b in trained.blocks for m in (b.adaLN_modulation[-1], b.cross_attn.proj)]
    for layer in zeroed:
        assert (layer.weight == 0).all() and (layer.bias == 0).all()


def test_init_model_is_seeded(tmp_path):
    a = load_model_dir(init_model(tmp_path / "a", "tiny", seed=5))
    b = load_model_dir(init_model(tmp_path / "b", "tiny", seed=5))
    c = load_model_dir(init_model(tmp_path / "c", "tiny", seed=6))
    for name in ("text_encoder", "transformer", "vae"):
        sa, sb, sc = (_modules(x)[name].state_dict() for x in (a, b, c))
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"seed 5 twice: {name}.{key} differs"
            assert not torch.equal(sa[key], sc[key]), f"seeds 5 and 6: {name}.{key} is the same"


# ------------------------------------------------------------------------------ 4. components that do not fit


def _mismatched(**changes) -> Components:
    """Tiny components, each consistent with its own config, but `changes` applied to one of them."""
    import dataclasses

    te = dataclasses.replace(TINY.text_encoder, **changes.get("text_encoder", {}))
    dit = dataclasses.replace(TINY.transformer, **changes.get("transformer", {}))
    vae = dataclasses.replace(TINY.vae, **changes.get("vae", {}))
    return random_components(ModelConfig(te, dit, vae, dict(TINY.scheduler)), seed=0)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"text_encoder": {"hidden_size": 48}},
         ["transformer context_dim 32 != text_encoder hidden_size 48",
          "transformer pooled_dim 32 != text_encoder hidden_size 48"]),
        ({"transformer": {"pooled_dim": 40}}, ["transformer pooled_dim 40 != text_encoder hidden_size 32"]),
        ({"vae": {"latent_channels": 8}},
         ["transformer in_channels 4 != vae latent_channels 8",
          "transformer out_channels 4 != vae latent_channels 8"]),
        ({"transformer": {"out_channels": 8}}, ["transformer out_channels 8 != vae latent_channels 4"]),
    ],
    ids=["text-width", "pooled-dim", "latent-channels", "dit-out-channels"],
)
def test_components_that_do_not_fit_name_both_values(tmp_path, changes, expected):
    root = save_model_dir(_mismatched(**changes), tmp_path / "m")
    with pytest.raises(ModelDirError, match="do not fit together") as info:
        load_model_dir(root)
    for part in expected:
        assert part in str(info.value)


def test_config_file_edited_to_a_misfit_is_a_model_dir_error(tiny_model_dir, tmp_path):
    """Only transformer/config.json says context_dim 48 (its weights still hold 32): the misfit of
    the config files is what gets reported, naming both values."""
    root = shutil.copytree(tiny_model_dir, tmp_path / "m")
    path = root / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["context_dim"] = 48
    path.write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="transformer context_dim 48 != text_encoder hidden_size 32"):
        load_model_dir(root)


def test_text_encoder_config_round_trips_through_transformers():
    """The text_encoder/config.json we write is one transformers reads to the same model shape."""
    te = TINY.text_encoder
    hf = transformers.CLIPTextConfig(
        **{k: v for k, v in te.to_dict().items() if k not in ("architectures", "model_type")}
    )
    assert TextEncoderConfig.from_dict(hf.to_dict()) == te
    ours = CLIPTextModel(te)
    theirs = transformers.CLIPTextModel(hf)
    assert {"text_model." + k: v.shape for k, v in theirs.state_dict().items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }


def test_tokenizer_larger_than_text_encoder_vocab_is_refused(tiny_model_dir, tmp_path):
    """A tokenizer with ids past the embedding table fails at load, not as an IndexError mid-run."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config_path = model / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["vocab_size"] = 600  # the tiny tokenizer's specials sit at ids 998/999
    config_path.write_text(json.dumps(config))
    weights = model / "text_encoder" / "model.safetensors"
    sd = load_file(str(weights))
    key = next(k for k in sd if k.endswith("token_embedding.weight"))
    sd[key] = sd[key][:600].clone()
    save_file(sd, str(weights))
    with pytest.raises(ModelDirError, match="ids up to 999 but the text encoder's vocab_size is 600"):
        load_model_dir(model)
