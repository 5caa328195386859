"""ONNX export and the onnxruntime backend on the tiny model.

One dynamic export (through the CLI, into the backend's cache directory) serves every parity
check: each component at two latent resolutions and batch 1 and 3, and the end-to-end image
against the torch backend at two image sizes.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from ldm_rt import parity
from ldm_rt.backends.onnxruntime_backend import OrtComponent, cache_dir
from ldm_rt.cli import main
from ldm_rt.errors import InputError
from ldm_rt.export.onnx_export import MANIFEST, export_model, source_hash
from ldm_rt.export.specs import COMPONENT_NAMES, component_specs
from ldm_rt.model_dir import load_model_dir
from ldm_rt.pipeline import Pipeline

# (batch, latent height, latent width): two resolutions, batch 1 and 3, from one export.
SHAPES = [(1, 8, 8), (3, 12, 6)]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory, one_thread):
    """`ldm-rt export --model all` into the onnxruntime backend's cache dir for the tiny model."""
    cache = tmp_path_factory.mktemp("ldm-rt-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDM_RT_CACHE", str(cache))
        components = load_model_dir(tiny_model_dir)
        out = cache_dir(components)
        result = invoke("export", "--model", "all", "--model-dir", tiny_model_dir, "--out", out)
        assert result.exit_code == 0, result.output
        yield components, out, cache


def test_cli_export_writes_checked_graphs(exported):
    components, out, _ = exported
    for name in COMPONENT_NAMES:
        path = out / f"{name}.onnx"
        assert path.is_file()
        onnx.checker.check_model(str(path))
    assert (out / MANIFEST).is_file()


def test_manifest_is_generated_from_the_specs(exported):
    components, out, _ = exported
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source_sha256"] == source_hash(components)
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["exporter"].startswith("torch.onnx.export")
    for name, spec in component_specs(components.config).items():
        entry = manifest["components"][name]
        assert [i["name"] for i in entry["inputs"]] == spec.input_names
        assert [o["name"] for o in entry["outputs"]] == spec.output_names
        assert [i["dtype"] for i in entry["inputs"]] == [t.dtype_name for t in spec.inputs]
        assert [i["dims"] for i in entry["inputs"]] == [list(t.dims) for t in spec.inputs]
        assert isinstance(entry["opset"], int) and entry["opset"] >= 17
        # the graph's own inputs carry the spec's names, dtypes and symbolic axes
        graph = onnx.load(str(out / entry["file"]), load_external_data=False).graph
        assert [i.name for i in graph.input] == spec.input_names
        for value, t in zip(graph.input, spec.inputs):
            dims = value.type.tensor_type.shape.dim
            assert len(dims) == len(t.dims)
            for d, declared in zip(dims, t.dims):
                assert (d.dim_value == declared) if isinstance(declared, int) else (d.dim_param != "")
    assert manifest["components"]["transformer"]["dynamic_axes"]["latents"] == {"0": "batch", "2": "height", "3": "width"}


@pytest.mark.parametrize("name", COMPONENT_NAMES)
def test_onnxruntime_matches_torch(exported, name):
    components, out, _ = exported
    spec = component_specs(components.config)[name]
    graph = OrtComponent(out / f"{name}.onnx", spec, torch.device("cpu"), ["CPUExecutionProvider"])
    module = spec.module(components)
    for seed, (batch, h, w) in enumerate(SHAPES):
        inputs = spec.sample_inputs(batch, h, w, seed=seed)
        with torch.no_grad():
            refs = module(*inputs)
        refs = refs if isinstance(refs, tuple) else (refs,)
        outs = graph(*inputs)
        for output, got, ref in zip(spec.output_names, outs, refs):
            result = parity.compare(got, ref, spec.parity_key, "fp32")
            print(f"{name}.{output} batch {batch} latent {h}x{w}: {result}")
            assert result.passed, f"{name}.{output} at batch {batch}, {h}x{w}: {result}"


def test_reexport_with_same_hash_reuses_files(exported):
    components, out, _ = exported
    files = [out / f"{n}.onnx" for n in COMPONENT_NAMES] + [out / MANIFEST]
    before = [p.stat().st_mtime_ns for p in files]
    lines = []
    export_model(components, out, log=lines.append)
    assert [p.stat().st_mtime_ns for p in files] == before
    assert len(lines) == 3 and all("reusing" in line for line in lines)


def test_external_data_above_threshold(tiny_model_dir, tmp_path, one_thread):
    components = load_model_dir(tiny_model_dir)
    manifest = export_model(components, tmp_path, ["vae_decoder"], external_data_threshold=1024, log=lambda s: None)
    entry = manifest["components"]["vae_decoder"]
    path, data = tmp_path / entry["file"], tmp_path / str(entry["external_data"])
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    onnx.checker.check_model(str(path))  # path form: resolves the external data
    spec = component_specs(components.config)["vae_decoder"]
    (latents,) = spec.sample_inputs(2, 6, 10, seed=5)
    got = OrtComponent(path, spec, torch.device("cpu"), ["CPUExecutionProvider"])(latents)[0]
    with torch.no_grad():
        ref = components.vae.decode(latents)
    assert parity.compare(got, ref, "vae", "fp32").passed

    # Changed weights: a stale graph is rebuilt with one line saying why, never reused; below
    # the (default) threshold it is a single file again and the old external data is gone.
    with torch.no_grad():
        components.vae.decoder.conv_out.bias.add_(0.5)
    lines = []
    manifest = export_model(components, tmp_path, ["vae_decoder"], log=lines.append)
    # a progress line before the (silent, minutes for DiT-XL/2) export of each component
    assert len(lines) == 3 and "re-exporting" in lines[0] and "exported" in lines[2]
    assert lines[1].startswith("vae_decoder: exporting (1/1, ") and "M parameters" in lines[1], lines
    assert manifest["components"]["vae_decoder"]["external_data"] is None and not data.exists()
    got = OrtComponent(path, spec, torch.device("cpu"), ["CPUExecutionProvider"])(latents)[0]
    with torch.no_grad():
        assert parity.compare(got, components.vae.decode(latents), "vae", "fp32").passed


def test_cli_static_export(tiny_model_dir, tmp_path, one_thread):
    result = invoke("export", "--model", "vae", "--model-dir", tiny_model_dir, "--out", tmp_path,
                    "--static", "--batch", 2, "--height", 12, "--width", 8)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["components"]["vae_decoder"]["static"] == {"batch": 2, "height": 12, "width": 8}
    graph = onnx.load(str(tmp_path / "vae_decoder.onnx")).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [2, 4, 6, 4]  # VAE factor 2
    components = load_model_dir(tiny_model_dir)
    spec = component_specs(components.config)["vae_decoder"]
    (latents,) = spec.sample_inputs(2, 6, 4, seed=9)
    got = OrtComponent(tmp_path / "vae_decoder.onnx", spec, torch.device("cpu"), ["CPUExecutionProvider"])(latents)[0]
    with torch.no_grad():
        assert parity.compare(got, components.vae.decode(latents), "vae", "fp32").passed


def test_pipeline_onnxruntime_matches_torch(exported, tiny_model_dir, monkeypatch, capfd):
    _, out, cache = exported
    monkeypatch.setenv("LDM_RT_CACHE", str(cache))
    ort_pipe = Pipeline.from_pretrained(tiny_model_dir, backend="onnxruntime", device="cpu", dtype="fp32")
    assert "CPUExecutionProvider" in capfd.readouterr().err
    torch_pipe = Pipeline.from_pretrained(tiny_model_dir, backend="torch", device="cpu", dtype="fp32")
    for height, width in [(16, 16), (24, 12)]:
        kwargs = dict(steps=2, guidance=3.0, seed=3, height=height, width=width)
        a = torch.from_numpy(np.array(ort_pipe.generate("a red circle", **kwargs).images[0]))
        b = torch.from_numpy(np.array(torch_pipe.generate("a red circle", **kwargs).images[0]))
        assert a.shape == (height, width, 3)
        assert len(torch.unique(b)) > 50  # a real image, not one saturated to 0/255 on both sides
        db = parity.psnr(a, b)
        print(f"end to end {height}x{width}: 8-bit image PSNR {db:.1f} dB")
        assert db >= parity.IMAGE_PSNR_DB["fp32"]
    # Before 8-bit rounding: the decoded float images of the last size, for the record.
    images = []
    for pipe in (ort_pipe, torch_pipe):
        states, mask, pooled = pipe.encode_prompt(["", "a red circle"])
        latents = torch.randn(pipe.latent_shape(1, 24, 12), generator=torch.Generator().manual_seed(3))
        images.append(pipe.decode(pipe.denoise(latents, states, mask, pooled, steps=2, guidance=3.0)))
    print(f"end to end 24x12, float image: {parity.compare(images[0], images[1], 'vae', 'fp32')}")


def test_onnxruntime_backend_rejects_other_dtypes_on_cpu(tiny_model_dir):
    with pytest.raises(InputError, match="fp32"):
        Pipeline.from_pretrained(tiny_model_dir, backend="onnxruntime", device="cpu", dtype="bf16")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model-dir", "{tmp}/missing"], "does not exist"),
        (["--out", "{tmp}/file/sub"], "cannot create output directory"),
        (["--static", "--height", 10, "--width", 16], "--height 10"),
        (["--static", "--batch", 0], "--batch 0"),
        (["--height", 16], "only apply with --static"),
        (["--dtype", "bf16", "--opset", 17], "--opset 17"),
        (["--opset", 99], "--opset 99 is outside what the exporter writes: 18 to"),
        (["--opset", 5], "--opset 5 is outside what the exporter writes: 18 to"),
    ],
)
def test_cli_export_bad_input_is_one_line(tiny_model_dir, tmp_path, args, message):
    (tmp_path / "file").write_text("not a directory")
    base = {"--model-dir": str(tiny_model_dir), "--out": str(tmp_path / "out")}
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    for flag in ("--model-dir", "--out"):
        if flag not in args:
            args += [flag, base[flag]]
    result = invoke("export", "--model", "vae", *args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not os.path.exists(tmp_path / "out" / "vae_decoder.onnx")


def test_manifest_records_the_opset_written(tiny_model_dir, tmp_path, monkeypatch, one_thread):
    """The opset is read back from the file: an exporter that writes another opset than asked
    (below 18 torch's version conversion is best effort, and left opset 18 at --opset 13) is an
    error, never a manifest that claims the asked one."""
    from ldm_rt.errors import LdmRtError
    from ldm_rt.export import onnx_export

    components = load_model_dir(tiny_model_dir)
    manifest = export_model(components, tmp_path / "a", ["vae_decoder"], opset=19, log=lambda s: None)
    written = onnx.load(str(tmp_path / "a" / "vae_decoder.onnx")).opset_import
    assert manifest["opset"] == manifest["components"]["vae_decoder"]["opset"] == 19
    assert [o.version for o in written if o.domain in ("", "ai.onnx")] == [19]
    monkeypatch.setattr(onnx_export, "MIN_OPSET", 13)
    with pytest.raises(LdmRtError, match="at --opset 13 wrote opset 18 instead"):
        export_model(components, tmp_path / "b", ["vae_decoder"], opset=13, log=lambda s: None)
    assert not (tmp_path / "b" / "vae_decoder.onnx").exists()
