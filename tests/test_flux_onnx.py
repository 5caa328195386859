"""FLUX.1 on the export backends, on the CPU with tiny random configs (every weight non-zero):
`ldm-rt export` writes all four graphs, each graph equals its torch module within the tolerance
table (fp32, and fp16 where onnxruntime's CPU provider runs it), the onnxruntime backend draws
the torch backend's image, and `ldm-rt parity` covers every Flux graph and fails a perturbed one.

One export per case (schnell-like: no guidance input; dev-like: guidance embedder) serves the
module: exports of these configs take seconds each (one double + one single block, T5 of 2 layers).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from cli_helpers import invoke
from ldm_rt import parity
from ldm_rt.backends.onnxruntime_backend import OrtComponent
from ldm_rt.export.onnx_export import MANIFEST, export_model
from ldm_rt.export.specs import component_specs
from ldm_rt.model_dir import load_model_dir, save_model_dir
from ldm_rt.pipeline import Pipeline
from test_flux_family import DEV_LIKE, FLUX, PROMPT, SCHNELL_LIKE
from test_parity_cmd import scale_largest_weight

GRAPHS = ["text_encoder", "text_encoder_2", "transformer", "vae_decoder"]


def small(config):
    """The family tests' odd shapes (3 heads of 12, rope 4/4/4) with fewer blocks: the exporter's
    time grows with the graph, not with the weights."""
    return dataclasses.replace(
        config, transformer=dataclasses.replace(config.transformer, num_layers=1, num_single_layers=1),
        text_encoder_2=dataclasses.replace(config.text_encoder_2, num_layers=2))


CASES = {"dev": small(DEV_LIKE), "schnell": small(SCHNELL_LIKE)}
H, W = 48, 32  # pixels: latents 6 x 4, 3 x 2 tokens; non-square


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory, one_thread):
    """(case, model dir, export dir, the export command's output) for one case."""
    tmp = tmp_path_factory.mktemp(f"flux-{request.param}")
    root = save_model_dir(FLUX.random_components(CASES[request.param], seed=5), tmp / "model")
    out = tmp / "onnx"
    result = invoke("export", "--model-dir", root, "--out", out)  # no --model: every graph
    assert result.exit_code == 0, result.output
    return request.param, root, out, result.output


def test_export_writes_every_flux_graph(exported):
    case, root, out, output = exported
    manifest = json.loads((out / MANIFEST).read_text())
    assert list(manifest["components"]) == GRAPHS
    for i, name in enumerate(GRAPHS, 1):  # one progress line per graph, and one when it is written
        assert f"{name}: exporting ({i}/4, " in output and f"{name}: exported {out / name}.onnx" in output
        assert (out / f"{name}.onnx").is_file() and manifest["components"][name]["external_data"] is None
    # the geometry comes from the family: 1024 px default (128 latents), sides multiples of 16
    assert manifest["image"] == {"vae_scale_factor": 8, "patch_size": 1, "sample_size": 128, "size_multiple": 16}
    graph = onnx.load(str(out / "transformer.onnx")).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    expected = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids"]
    assert list(inputs) == expected + (["guidance"] if case == "dev" else [])
    assert isinstance(inputs["hidden_states"][1], str) and inputs["img_ids"] == [inputs["hidden_states"][1], 3]
    # RoPE is computed in the graph from the position ids, as the DiT's is from its grid
    ops = {n.op_type for n in graph.node} | {n.op_type for f in onnx.load(str(out / "transformer.onnx")).functions
                                             for n in f.node}
    assert {"Cos", "Sin"} <= ops
    t5 = onnx.load(str(out / "text_encoder_2.onnx")).graph
    assert t5.input[0].type.tensor_type.shape.dim[1].dim_param  # a dynamic text length (256 or 512 tokens)


@pytest.mark.parametrize("batch, h, w", [(2, 6, 4), (1, 4, 10)])
def test_each_graph_matches_its_torch_module_fp32(exported, batch, h, w):
    """Two latent sizes (6 and 10 tokens) and batches: the dynamic axes hold, every graph within
    the fp32 rows of the tolerance table."""
    _, root, out, _ = exported
    reference = load_model_dir(root)
    specs = component_specs(reference.config, "fp32")
    for i, (name, spec) in enumerate(specs.items()):
        graph = OrtComponent(out / f"{name}.onnx", spec, torch.device("cpu"), ["CPUExecutionProvider"])
        inputs = spec.sample_inputs(batch, h, w, seed=11 + i)
        with torch.no_grad():
            ref = spec.module(reference)(*inputs)
        refs = ref if isinstance(ref, tuple) else (ref,)
        for output, got, want in zip(spec.output_names, graph(*inputs), refs):
            result = parity.compare(got, want, spec.parity_key, "fp32")
            assert result.passed, (name, output, str(result))


def test_onnxruntime_image_equals_the_torch_image(exported):
    case, root, out, _ = exported
    kwargs = dict(steps=2, seed=3, height=H, width=W, guidance=3.5 if case == "dev" else 0.0)
    if case == "schnell":  # true CFG: the transformer graph runs a batch of 2 ([negative; prompt])
        kwargs.update(negative_prompt="a blurry photo", true_cfg_scale=2.0)
    ref = Pipeline(load_model_dir(root), backend="torch", dtype="fp32").generate(PROMPT, **kwargs).images[0]
    pipe = Pipeline(load_model_dir(root), backend="onnxruntime", dtype="fp32", onnx_dir=out)
    assert set(pipe.graphs) == set(GRAPHS)
    got = pipe.generate(PROMPT, **kwargs).images[0]
    db = parity.psnr(torch.from_numpy(np.array(got)), torch.from_numpy(np.array(ref)))
    print(f"{case}: onnxruntime fp32 vs torch fp32, {H}x{W}, 2 steps: PSNR {db:.1f} dB")
    assert db >= parity.IMAGE_PSNR_DB["fp32"]


@pytest.mark.parametrize("exported", ["dev"], indirect=True)  # one fp16 export (the larger graph) keeps CI cheap
def test_fp16_graphs_and_image(exported, tmp_path):
    """fp16 export (onnxruntime's CPU provider runs fp16): every graph within the fp16 rows against
    the fp32 module on the same rounded inputs, and the image within the fp16 PSNR bound."""
    case, root, _, _ = exported
    reference = load_model_dir(root)
    out = tmp_path / "onnx16"
    export_model(reference, out, dtype="fp16", log=lambda _: None)
    specs = component_specs(reference.config, "fp16")
    for i, (name, spec) in enumerate(specs.items()):
        graph = OrtComponent(out / f"{name}.onnx", spec, torch.device("cpu"), ["CPUExecutionProvider"])
        inputs = spec.sample_inputs(2, 6, 4, seed=21 + i)
        with torch.no_grad():
            ref = spec.module(reference)(*[x.float() if x.is_floating_point() else x for x in inputs])
        refs = ref if isinstance(ref, tuple) else (ref,)
        run_dtype = "fp32" if spec.outputs[0].dtype == torch.float32 else "fp16"  # the VAE stays fp32 (upcast)
        for output, got, want in zip(spec.output_names, graph(*inputs), refs):
            result = parity.compare(got.float(), want, spec.parity_key, run_dtype)
            assert result.passed, (name, output, str(result))
    kwargs = dict(steps=2, seed=3, height=H, width=W, guidance=3.5)
    ref = Pipeline(reference, backend="torch", dtype="fp32").generate(PROMPT, **kwargs).images[0]
    got = Pipeline(load_model_dir(root), backend="onnxruntime", dtype="fp16", onnx_dir=out).generate(
        PROMPT, **kwargs).images[0]
    db = parity.psnr(torch.from_numpy(np.array(got)), torch.from_numpy(np.array(ref)))
    print(f"onnxruntime fp16 vs torch fp32: PSNR {db:.1f} dB")
    assert db >= parity.IMAGE_PSNR_DB["fp16"]


def test_t5_fp16_graph_with_external_data_and_large_activations(tmp_path):
    """T5-XXL (9.5 GB in bf16) is over the 2 GB protobuf limit: its graph keeps the weights in
    `text_encoder_2.onnx.data` (here forced with a 0-byte threshold). FFN output weights scaled by
    1e5 push the fp16 stream past 65504 (tests/test_t5.py): the fp16 graph keeps transformers'
    clamp and fp32 `wo`, so its output stays finite and within the fp16 row."""
    components = FLUX.random_components(CASES["dev"], seed=7)
    with torch.no_grad():
        for block in components.text_encoder_2.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(1e5)
    manifest = export_model(components, tmp_path, ["text_encoder_2"], dtype="fp16", external_data_threshold=0,
                            log=lambda _: None)
    entry = manifest["components"]["text_encoder_2"]
    assert entry["external_data"] == "text_encoder_2.onnx.data" and (tmp_path / entry["external_data"]).is_file()
    model = onnx.load(str(tmp_path / entry["file"]), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert "encoder.embed_tokens.weight" in external and len(external) > 1, external  # the weights live in .data
    spec = component_specs(components.config, "fp16")["text_encoder_2"]
    graph = OrtComponent(tmp_path / entry["file"], spec, torch.device("cpu"), ["CPUExecutionProvider"])
    ids = spec.sample_inputs(2, 6, 4, seed=13)[0]
    (got,) = graph(ids)
    with torch.no_grad():
        want = components.text_encoder_2(ids)
    result = parity.compare(got.float(), want, "text_encoder", "fp16")
    assert result.finite and result.passed, str(result)


def _rows(output: str) -> dict[str, str]:
    return {line.split()[0]: line for line in output.splitlines() if line.split()[:1] and line.split()[0] in GRAPHS}


def test_parity_covers_every_flux_graph_and_fails_a_perturbed_one(exported, tmp_path):
    _, root, out, _ = exported
    copy = shutil.copytree(out, tmp_path / "onnx")
    args = ["parity", "--model-dir", root, "--backend", "onnxruntime", "--dtype", "fp32", "--device", "cpu",
            "--onnx-dir", copy, "--height", H, "--width", W]
    result = invoke(*args)
    print(result.output)
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert set(rows) == set(GRAPHS) and all(r.endswith("pass") for r in rows.values()), result.output
    assert "parity: pass (5 of 5 checks pass)" in result.output

    scale_largest_weight(copy / "text_encoder_2.onnx", 1.01)  # T5: a graph the DiT does not have
    result = invoke(*args)
    print(result.output)
    assert result.exit_code == 1, result.output
    rows = _rows(result.output)
    assert "FAIL" in rows["text_encoder_2"]
    assert all(rows[n].endswith("pass") for n in GRAPHS if n != "text_encoder_2")
    assert "parity: FAIL" in result.output


def test_text_encoder_device_is_for_the_reference_modules(exported, monkeypatch):
    """The graphs run on the pipeline's device: another text-encoder device is one InputError (on
    the torch backend the family places its reference encoders there, tests/test_flux_family.py)."""
    from ldm_rt.errors import InputError

    _, root, out, _ = exported
    Pipeline(load_model_dir(root), backend="onnxruntime", onnx_dir=out, device="cpu", text_encoder_device="cpu")
    # a second device without a second device here: any device other than the pipeline's
    monkeypatch.setattr(Pipeline, "_resolve_text_encoder_device", lambda self, value: torch.device("meta"))
    with pytest.raises(InputError, match="text_encoder_device meta applies where the reference text encoders run"):
        Pipeline(load_model_dir(root), backend="onnxruntime", onnx_dir=out, device="cpu", text_encoder_device="x")
