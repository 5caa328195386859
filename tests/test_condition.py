"""Channel-concatenation conditioning (issue 17) on the text DiT: the config option, the DiT's
`condition` input, the family seam hook, `generate(image=...)` for a conditioned model, its
export graph (an extra input) on onnxruntime and its kernels under the Triton interpreter,
against the torch reference; bad inputs are one error line."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import invoke
from ldm_rt.configs import PRESETS, DiTConfig
from ldm_rt.errors import InputError
from ldm_rt.model_dir import load_model_dir
from ldm_rt.models.dit import DiT
from ldm_rt.parity import compare
from ldm_rt.pipeline import Pipeline

CC = 4  # the tiny VAE's latent channels


def _conditioned_config():
    tiny = PRESETS["tiny"]
    return replace(tiny, transformer=replace(tiny.transformer, condition_channels=CC))


@pytest.fixture(scope="module")
def cond_dir(tmp_path_factory):
    """A tiny text DiT with 4 condition channels and an `upscale` 2 default (the SR demo's shape)."""
    from ldm_rt import families
    from ldm_rt.model_dir import save_model_dir

    config = _conditioned_config()
    components = families.for_config(config).random_components(config, seed=3)
    components.defaults = {"upscale": 2, "steps": 3, "guidance": 1.0}
    return save_model_dir(components, tmp_path_factory.mktemp("cond") / "tiny-cond")


@pytest.fixture(scope="module")
def pipe(cond_dir):
    return Pipeline.from_pretrained(cond_dir, device="cpu", dtype="fp32")


def _picture(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_default_config_is_unchanged_and_the_option_round_trips(tiny_model_dir):
    saved = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    assert "condition_channels" not in saved  # today's models: byte-identical configs
    assert DiTConfig.from_dict(saved).condition_channels == 0
    cond = _conditioned_config().transformer
    assert DiTConfig.from_dict(cond.to_dict()) == cond and cond.to_dict()["condition_channels"] == CC
    with pytest.raises(ValueError, match="condition_channels"):
        DiTConfig(condition_channels=-1)


def test_dit_concatenates_the_condition_before_patchify():
    """The conditioned DiT equals an unconditioned DiT of C + Cc input (and output) channels fed
    [latents; condition] by hand, whose final layer's rows for the first C channels are ours: so
    the condition is concatenated after the latents on the channel axis, before patchify, and the
    prediction keeps the latents' C channels."""
    torch.manual_seed(0)
    config = _conditioned_config().transformer
    c, p = config.in_channels, config.patch_size
    dit = DiT(config).eval()
    for param in dit.parameters():
        torch.nn.init.normal_(param, std=0.05)
    wide = DiT(replace(config, condition_channels=0, in_channels=c + CC, out_channels=c + CC)).eval()
    state = dict(dit.state_dict())
    for name in ("final_layer.linear.weight", "final_layer.linear.bias"):
        mine = state[name]  # rows ordered (p, p, C), channel fastest
        rows = torch.randn((p * p * (c + CC),) + mine.shape[1:]).view(p * p, c + CC, *mine.shape[1:])
        rows[:, :c] = mine.view(p * p, c, *mine.shape[1:])
        state[name] = rows.reshape(-1, *mine.shape[1:])
    wide.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    b, h, w = 3, 6, 10
    latents, condition = torch.randn(b, c, h, w, generator=g), torch.randn(b, CC, h, w, generator=g)
    t = torch.rand(b, generator=g) * 1000
    states, pooled = torch.randn(b, 32, 32, generator=g), torch.randn(b, 32, generator=g)
    mask = torch.rand(b, 32, generator=g) > 0.3
    mask[:, 0] = True
    with torch.no_grad():
        out = dit(latents, t, states, mask, pooled, condition=condition)
        ref = wide(torch.cat([latents, condition], 1), t, states, mask, pooled)[:, :c]
        other = dit(latents, t, states, mask, pooled, condition=condition.flip(0))
    assert out.shape == latents.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - other).abs().max() > 1e-3  # the condition reaches the prediction
    with pytest.raises(ValueError, match="takes a condition"):
        dit(latents, t, states, mask, pooled)
    with pytest.raises(ValueError, match="takes a condition"):
        dit(latents, t, states, mask, pooled, condition=condition[:, :2])
    plain = DiT(PRESETS["tiny"].transformer)
    with pytest.raises(ValueError, match="no condition channels"):
        plain(latents, t, states, mask, pooled, condition=condition)


def test_family_hook_declares_the_condition():
    from ldm_rt import families

    cond, plain = _conditioned_config(), PRESETS["tiny"]
    family = families.for_config(cond)
    assert family.condition_channels(cond) == CC and family.condition_inputs(cond) == ("image",)
    assert family.condition_channels(plain) == 0 and family.condition_inputs(plain) == ()
    assert families.for_config(PRESETS["tiny-class"]).condition_channels(PRESETS["tiny-class"]) == 0


def test_generate_conditions_every_step_on_the_encoded_image(pipe):
    """The pipeline's image equals a loop written out here: condition = VAE mean latents of the
    image resized to the output size, concatenated to the latents at every step."""
    from ldm_rt import call_args, image_input

    picture = _picture(0, 12, 20)
    result = pipe.generate("a red circle", image=picture, seed=7, output_type="latent")
    f = pipe.config.vae.scale_factor
    shape = (1, 4, 24 // f, 40 // f)
    assert result.images.shape == shape  # 2x the image (the `upscale` default): 24 x 40 px
    assert result.strength == 1.0 and "condition_encoding" in result.timings
    pixels = image_input.preprocess(picture, 24, 40)
    generator = torch.Generator("cpu").manual_seed(7)
    pipe.encode(pixels, generator)  # the start image's VAE sample comes first (FluxFillPipeline's order)
    noise = call_args.initial_latents(shape, 7, generator, None, pipe.device)
    with torch.no_grad():
        mean, _ = pipe.components.vae.encode(pixels)
    vae = pipe.config.vae
    condition = (mean - (vae.shift_factor or 0.0)) * vae.scaling_factor
    states, mask, pooled = pipe.encode_prompt(["a red circle"])
    scheduler = pipe.make_scheduler(noise, 3)
    latents = noise
    with torch.no_grad():
        for i in range(3):
            t = scheduler.timesteps[i].expand(1)
            v = pipe.components.transformer(latents, t, states, mask, pooled, condition=condition)
            latents = scheduler.update(latents, v, scheduler.coefficients(i))
    torch.testing.assert_close(result.images, latents, rtol=0, atol=1e-5)
    # another image: another result; strength < 1 starts from the image
    other = pipe.generate("a red circle", image=_picture(1, 12, 20), seed=7, output_type="latent").images
    assert (other - result.images).abs().max() > 1e-3
    half = pipe.generate("a red circle", image=picture, seed=7, strength=0.5, output_type="latent")
    assert half.strength == 0.5 and (half.images - result.images).abs().max() > 1e-3
    # latents= (strength 1) replaces the start: the condition alone is drawn
    given = pipe.generate("a red circle", image=picture, latents=noise, output_type="latent").images
    torch.testing.assert_close(given, latents, rtol=0, atol=1e-5)


def test_generate_with_cfg_doubles_the_condition(pipe):
    image = pipe.generate("a red circle", image=_picture(2, 8, 8), guidance=3.0, seed=1, height=20, width=12).images[0]
    assert image.size == (12, 20)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "conditioned on image"),
    (dict(image="IMG", mask_image="IMG"), "mask_image does not apply"),
    (dict(image="IMG", control_image="IMG"), "control_image does not apply"),
    (dict(image="IMG", strength=0.5, latents=torch.randn(1, 4, 8, 8)), "latents or strength"),
    (dict(image="TINY"), "too small"),
])
def test_conditioned_model_input_errors(pipe, kwargs, match):
    kwargs = {k: (_picture(0, 8, 8) if v == "IMG" else _picture(0, 1, 1) if v == "TINY" else v)
              for k, v in kwargs.items()}
    with pytest.raises(InputError, match=match):
        pipe.generate("a red circle", **kwargs)


def test_unconditioned_model_rejects_a_control_image(tiny_model_dir):
    plain = Pipeline.from_pretrained(tiny_model_dir, device="cpu")
    with pytest.raises(InputError, match="control_image applies to a model with condition channels"):
        plain.generate("a red circle", control_image=_picture(0, 8, 8), steps=1)


def _error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith("error: ")]


def test_cli_run_and_upscale(cond_dir, tiny_model_dir, tmp_path):
    _picture(4, 8, 12).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    result = invoke("run", "--model-dir", cond_dir, "--image", tmp_path / "in.png", "--seed", "2", "--out", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (24, 16) and "condition encoding" in result.output
    up = tmp_path / "up.png"
    result = invoke("upscale", tmp_path / "in.png", "-o", up, "--model-dir", cond_dir, "--seed", "2")
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(up)), np.asarray(Image.open(out).convert("RGB")))
    (tmp_path / "text.png").write_text("not a png")
    for args in (["run", "--model-dir", cond_dir, "--out", out],  # the image it needs is missing
                 ["run", "--model-dir", tiny_model_dir, "--prompt", "a", "--control-image", tmp_path / "in.png",
                  "--out", out],
                 ["upscale", tmp_path / "text.png", "-o", up],
                 ["upscale", tmp_path / "in.png", "-o", up, "--model-dir", tiny_model_dir]):
        result = invoke(*args)
        assert result.exit_code == 1 and len(_error_lines(result)) == 1, (args, result.output)
    # a model that draws from a prompt still needs one: click's usage error, as before
    result = invoke("run", "--model-dir", tiny_model_dir, "--image", tmp_path / "in.png", "--out", out)
    assert result.exit_code == 2 and "Missing option '--prompt'" in result.output


# -- export: the extra graph input on onnxruntime, the TensorRT profiles, triton kernels -----------

def test_export_specs_and_tensorrt_profiles_carry_the_condition():
    from ldm_rt.export.specs import component_specs
    from ldm_rt.export.tensorrt import Geometry, component_profile, profile_points

    config = _conditioned_config()
    spec = component_specs(config)["transformer"]
    assert spec.input_names[-1] == "condition"
    shapes = spec.shapes(3, 6, 10)
    assert shapes["condition"] == (3, CC, 6, 10) and shapes["latents"] == (3, 4, 6, 10)
    assert "condition" not in component_specs(PRESETS["tiny"])["transformer"].input_names
    geometry = Geometry.from_config(config)
    entry = {"inputs": [{"name": t.name, "dims": list(t.dims)} for t in spec.inputs]}
    profile = component_profile("transformer", entry, profile_points(geometry), geometry)
    assert profile["condition"]["opt"][1] == CC
    assert profile["condition"]["max"][0] == profile["latents"]["max"][0]
    assert profile["condition"]["max"][2:] == profile["latents"]["max"][2:]


@pytest.fixture(scope="module")
def exported(cond_dir, one_thread, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from ldm_rt.export.onnx_export import export_model

    out = tmp_path_factory.mktemp("cond-onnx")
    export_model(load_model_dir(cond_dir), out, components=("transformer",))
    return out


def test_onnxruntime_conditioned_transformer_matches_torch(cond_dir, exported):
    from ldm_rt.backends.onnxruntime_backend import OrtComponent, _Transformer
    from ldm_rt.export.specs import component_specs

    components = load_model_dir(cond_dir)
    spec = component_specs(components.config)["transformer"]
    manifest = json.loads((exported / "manifest.json").read_text())
    assert [t["name"] for t in manifest["components"]["transformer"]["inputs"]][-1] == "condition"
    graph = _Transformer(OrtComponent(exported / manifest["components"]["transformer"]["file"], spec,
                                      torch.device("cpu"), ["CPUExecutionProvider"]))
    inputs = spec.sample_inputs(3, 6, 10, seed=11)
    with torch.no_grad():
        ref = components.transformer(*inputs[:5], condition=inputs[5])
    out = graph(*inputs[:5], condition=inputs[5])  # the step's keyword call
    result = compare(out, ref, "transformer", "fp32")
    assert result.passed, str(result)


def test_pipeline_onnxruntime_conditioned_matches_torch(cond_dir, one_thread):
    pytest.importorskip("onnxruntime")
    kwargs = dict(image=_picture(5, 6, 10), seed=4, steps=2, guidance=2.0, output_type="pt")
    ref = Pipeline.from_pretrained(cond_dir, device="cpu")("a red circle", **kwargs)
    ort = Pipeline.from_pretrained(cond_dir, backend="onnxruntime", device="cpu")("a red circle", **kwargs)
    result = compare(ort, ref, "vae", "fp32")
    assert result.passed, str(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter path")
def test_triton_conditioned_transformer_matches_torch(cond_dir):
    from ldm_rt.backends import triton_backend
    from ldm_rt.export.specs import component_specs
    from ldm_rt.precision import Precision

    components = load_model_dir(cond_dir)
    inputs = component_specs(components.config)["transformer"].sample_inputs(3, 6, 10, seed=12)
    with torch.no_grad():
        ref = components.transformer(*inputs[:5], condition=inputs[5])
    runtime = triton_backend.load(load_model_dir(cond_dir), torch.device("cpu"), Precision.FP32)
    out = runtime.transformer(*inputs[:5], condition=inputs[5])
    result = compare(out, ref, "transformer", "fp32")
    assert result.passed, str(result)


def test_class_dit_takes_the_condition_too(tmp_path):
    """The class-conditional DiT family has the same hook: an image-conditioned class DiT samples
    (with CFG, the condition doubled), the condition changes the result, its graph has the input."""
    from ldm_rt import families
    from ldm_rt.export.specs import component_specs
    from ldm_rt.model_dir import save_model_dir

    tiny = PRESETS["tiny-class"]
    config = replace(tiny, transformer=replace(tiny.transformer, condition_channels=CC))
    family = families.for_config(config)
    assert family.condition_inputs(config) == ("image",)
    assert component_specs(config)["transformer"].input_names[-1] == "condition"
    root = save_model_dir(family.random_components(config, seed=1), tmp_path / "class-cond")
    pipe = Pipeline.from_pretrained(root, device="cpu")
    a = pipe.generate(207, image=_picture(0, 16, 16), steps=2, guidance=4.0, seed=0, output_type="latent").images
    b = pipe.generate(207, image=_picture(1, 16, 16), steps=2, guidance=4.0, seed=0, output_type="latent").images
    assert a.shape == (1, 4, 8, 8) and (a - b).abs().max() > 1e-4
    with pytest.raises(InputError, match="conditioned on image"):
        pipe.generate(207, steps=1)


@pytest.mark.parametrize("backend", ["onnxruntime", "triton"])
def test_parity_command_covers_the_conditioned_graph(cond_dir, backend, one_thread, monkeypatch, tmp_path):
    """`ldm-rt parity` on a conditioned model: the transformer row feeds the graph's `condition`
    input, and the end-to-end image is conditioned on a seeded random image."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
        monkeypatch.setenv("LDM_RT_CACHE", str(tmp_path / "cache"))
    elif torch.cuda.is_available():
        pytest.skip("the CPU interpreter path")
    from ldm_rt.parity_run import format_report, run_parity

    report = run_parity(cond_dir, backend=backend, device="cpu", dtype="fp32", steps=2)
    text = "\n".join(format_report(report))
    assert report.passed, text
    assert any(r.component == "transformer" for r in report.rows) and report.image is not None
    assert "conditioned on seeded random images (image)" in text


def test_bench_times_vae_encode_and_img2img_on_a_conditioned_model(cond_dir, tmp_path, one_thread):
    """`ldm-rt bench` on a model with condition channels: every stage runs (the DiT stages with the
    encoded condition), vae_encode and img2img included."""
    out = tmp_path / "bench"
    result = invoke("bench", "--model-dir", cond_dir, "--backends", "torch", "--resolutions", "16", "--iters", "2",
                    "--warmup", "1", "--steps", "2", "--out", out)
    assert result.exit_code == 0, result.output
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    for stage in ("denoise_step", "denoise_loop", "vae_encode", "end_to_end", "img2img"):
        assert run["stages"][stage]["median_ms"] > 0, (stage, run["stages"][stage])
