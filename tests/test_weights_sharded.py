"""Sharded safetensors: the writer's layout, streamed loading into dtype/device, and bad dirs."""

import json

import pytest
import torch

from ldm_rt.errors import ModelDirError, WeightsError
from ldm_rt.families.flux.transformer import FluxConfig, FluxTransformer2DModel
from ldm_rt.models.t5 import T5Config, T5EncoderModel
from ldm_rt.weights import empty_module, load_streaming, weight_files, write_sharded
from random_weights import randomize_

CONFIG = FluxConfig(in_channels=12, num_layers=1, num_single_layers=1, attention_head_dim=24,
                    num_attention_heads=3, joint_attention_dim=20, pooled_projection_dim=18,
                    guidance_embeds=True, axes_dims_rope=(4, 10, 10))


def _written(tmp_path, dtype=torch.bfloat16):
    model = FluxTransformer2DModel(CONFIG)
    randomize_(model, 11)
    shards = write_sharded(tmp_path, model.state_dict(), max_shard_bytes=40_000, dtype=dtype)
    return model, shards


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_into_dtype(tmp_path, dtype):
    model, shards = _written(tmp_path)
    assert len(shards) >= 3
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert shards[0].name == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    loaded = empty_module(lambda: FluxTransformer2DModel(CONFIG), dtype)
    load_streaming(loaded, tmp_path, "transformer")
    for k, v in model.state_dict().items():
        got = loaded.state_dict()[k]
        assert got.dtype == dtype
        assert torch.equal(got, v.to(torch.bfloat16).to(dtype)), k


def test_matches_safetensors_and_diffusers_reads_it(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model, _ = _written(tmp_path, dtype=None)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    ref = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_single_file_and_t5_tied_embedding(tmp_path):
    from safetensors.torch import save_file

    config = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4)
    model = T5EncoderModel(config)
    randomize_(model, 12)
    sd = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    assert set(weight_files(tmp_path, "text_encoder_2", "model")) == set(sd)
    loaded = empty_module(lambda: T5EncoderModel(config), torch.float16)
    load_streaming(loaded, tmp_path, "text_encoder_2", name="model")
    assert torch.equal(loaded.encoder.embed_tokens.weight, model.shared.weight.half())


def test_missing_shard(tmp_path):
    _, shards = _written(tmp_path)
    shards[1].unlink()
    with pytest.raises(ModelDirError, match="missing") as e:
        load_streaming(FluxTransformer2DModel(CONFIG), tmp_path, "transformer")
    assert shards[1].name in str(e.value)


def test_index_names_a_file_that_does_not_hold_the_key(tmp_path):
    _, shards = _written(tmp_path)
    index_path = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(k for k, f in index["weight_map"].items() if f == shards[0].name)
    index["weight_map"][key] = shards[1].name
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelDirError, match="does not hold it"):
        load_streaming(FluxTransformer2DModel(CONFIG), tmp_path, "transformer")


@pytest.mark.parametrize("keep", [5, 0.6])
def test_truncated_shard(tmp_path, keep):
    _, shards = _written(tmp_path)
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ModelDirError, match="truncated"):
        load_streaming(FluxTransformer2DModel(CONFIG), tmp_path, "transformer")


def test_no_weights_and_bad_index(tmp_path):
    with pytest.raises(ModelDirError, match="holds neither"):
        weight_files(tmp_path, "transformer")
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="index"):
        weight_files(tmp_path, "transformer")


def test_wrong_config_is_a_weights_error(tmp_path):
    _written(tmp_path)
    other = FluxConfig(**{**CONFIG.__dict__, "guidance_embeds": False})
    with pytest.raises(WeightsError, match="unexpected keys"):
        load_streaming(FluxTransformer2DModel(other), tmp_path, "transformer")
