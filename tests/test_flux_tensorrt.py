"""TensorRT's pure parts for FLUX.1 on CPU (no libnvinfer here, see tests/test_tensorrt.py):
optimisation profiles for the Flux graphs' dynamic dims (image tokens from the image size, T5
text length, batch), the geometry taken from the family (a Flux transformer has no sample_size),
engine naming and the rebuild-only-what-is-stale decisions with a stand-in builder.
"""

from __future__ import annotations

import json

import pytest

from ldm_rt.errors import InputError
from ldm_rt.export.onnx_export import MANIFEST, MANIFEST_FORMAT, StaticShape, _spec_dict, export_model, image_geometry
from ldm_rt.export.specs import component_specs
from ldm_rt.export.tensorrt import Geometry, manifest_profiles, profile_points, shape_in_profile
from test_flux_family import DEV_LIKE, FLUX, SCHNELL_LIKE, TINY
from test_tensorrt import H100, run_build

GRAPHS = ["text_encoder", "text_encoder_2", "transformer", "vae_decoder"]


def flux_manifest(config, dtype="fp32") -> dict:
    """A manifest as `ldm-rt export` writes it for a Flux model (entries by export's own `_spec_dict`)."""
    specs = component_specs(config, dtype)
    return {"format": MANIFEST_FORMAT, "dtype": dtype, "static": None, "image": image_geometry(config),
            "components": {n: {"file": f"{n}.onnx", "external_data": None, **_spec_dict(specs[n])} for n in specs}}


def fake_flux_dir(tmp_path, config, name="onnx"):
    d = tmp_path / name
    d.mkdir()
    (d / MANIFEST).write_text(json.dumps(flux_manifest(config)))
    for component in GRAPHS:
        (d / f"{component}.onnx").write_bytes(f"graph of {component}".encode())
    return d


def test_geometry_comes_from_the_family():
    for config in (DEV_LIKE, SCHNELL_LIKE):
        assert config.transformer.patch_size == 1 and not hasattr(config.transformer, "sample_size")
        g = Geometry.from_config(config)
        assert (g.default_pixels, g.multiple) == (FLUX.default_size(config), 16) == (1024, 16)
        assert Geometry.from_manifest(flux_manifest(config)) == g
    # a manifest written before size_multiple: the DiT rule, VAE factor x patch size
    assert Geometry.from_manifest({"image": {"vae_scale_factor": 8, "patch_size": 2, "sample_size": 32}}).multiple == 16


@pytest.mark.parametrize("config, text", [(DEV_LIKE, 512), (SCHNELL_LIKE, 256)], ids=["dev", "schnell"])
def test_default_profiles_of_every_flux_graph(config, text):
    """Default points: 1 / 1 / 4 images of 512 / 1024 / 2048 px (half, one and two default sides);
    one row per image (embedded guidance), two at max for true CFG; image tokens (side / 16)^2;
    T5 text 1 / max_sequence_length / 512."""
    profiles = manifest_profiles(flux_manifest(config))
    assert list(profiles) == GRAPHS
    rows = {"min": 1, "opt": 1, "max": 8}
    tokens = {p: (side // 16) ** 2 for p, side in (("min", 512), ("opt", 1024), ("max", 2048))}
    texts = {"min": 1, "opt": text, "max": 512}
    tr = config.transformer
    want = {
        "hidden_states": {p: [rows[p], tokens[p], tr.in_channels] for p in rows},
        "encoder_hidden_states": {p: [rows[p], texts[p], tr.joint_attention_dim] for p in rows},
        "pooled_projections": {p: [rows[p], tr.pooled_projection_dim] for p in rows},
        "timestep": {p: [rows[p]] for p in rows},
        "img_ids": {p: [tokens[p], 3] for p in rows},
        "txt_ids": {p: [texts[p], 3] for p in rows},
    }
    if tr.guidance_embeds:
        want["guidance"] = {p: [rows[p]] for p in rows}
    assert profiles["transformer"] == want
    assert profiles["text_encoder_2"] == {"input_ids": {p: [rows[p], texts[p]] for p in rows}}
    clip = config.text_encoder.max_position_embeddings
    assert profiles["text_encoder"] == {"input_ids": {p: [rows[p], clip] for p in rows}}
    latent = {"min": 64, "opt": 128, "max": 256}
    assert profiles["vae_decoder"] == {"latents": {p: [{"min": 1, "opt": 1, "max": 4}[p], 16, latent[p], latent[p]]
                                                   for p in rows}}


def test_user_points_and_what_a_profile_admits():
    manifest = flux_manifest(DEV_LIKE)
    profiles = manifest_profiles(manifest, opt="batch=2,height=768,width=1360", max="size=1360")
    hidden = profiles["transformer"]["hidden_states"]
    assert hidden["opt"][:2] == [2, (768 // 16) * (1360 // 16)] and hidden["max"][:2] == [8, (1360 // 16) ** 2]
    # a 1024 x 1024 step with 512 T5 tokens fits; one larger than max does not
    tr = DEV_LIKE.transformer
    ok = {"hidden_states": (1, 4096, tr.in_channels), "encoder_hidden_states": (1, 512, tr.joint_attention_dim),
          "pooled_projections": (1, tr.pooled_projection_dim),
          "timestep": (1,), "img_ids": (4096, 3), "txt_ids": (512, 3), "guidance": (1,)}
    assert shape_in_profile(profiles["transformer"], ok) is None
    too_big = dict(ok, hidden_states=(1, 86 * 86, tr.in_channels), img_ids=(86 * 86, 3))
    assert "hidden_states" in shape_in_profile(profiles["transformer"], too_big)
    with pytest.raises(InputError, match=r"multiple of 16 \(VAE factor 8 x 2 latents\)"):
        profile_points(Geometry.from_manifest(manifest), opt="size=1000")


def test_static_flux_export_is_refused_before_any_work(tmp_path):
    components = FLUX.random_components(TINY, seed=0)
    with pytest.raises(InputError, match="--static cannot fix the text_tokens axis of text_encoder_2"):
        export_model(components, tmp_path / "out", static=StaticShape(1, 32, 32))
    assert not (tmp_path / "out" / "text_encoder.onnx").exists()


def test_engines_for_every_flux_graph_are_built_once_and_rebuilt_when_stale(tmp_path):
    onnx_dir = fake_flux_dir(tmp_path, DEV_LIKE)
    engines, builder, lines = run_build(onnx_dir)
    assert builder.built == GRAPHS
    assert {n: p.name for n, p in engines.items()} == {n: f"{n}.fp32.engine" for n in GRAPHS}
    meta = json.loads((onnx_dir / "text_encoder_2.fp32.engine.json").read_text())
    assert meta["profiles"]["input_ids"]["opt"] == [1, 512] and meta["tensorrt"] == H100.tensorrt

    _, builder, lines = run_build(onnx_dir)
    assert builder.built == [] and all("reusing" in line for line in lines)

    # another opt size: the graphs whose shapes follow the image are rebuilt, the text encoders are not
    _, builder, lines = run_build(onnx_dir, opt="size=768")
    assert builder.built == ["transformer", "vae_decoder"]
    assert any("transformer: other optimisation profiles" in line and "hidden_states opt" in line for line in lines)
