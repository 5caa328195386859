"""`ldm-rt parity`, fp16/bf16 export, and bad export directories (issue 6), on the tiny model.

One fp32 export (made by the first parity run, into a private cache) serves the perturbed-graph
and the bad --onnx-dir tests through copies; one fp16 export serves the fp16 checks.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from ldm_rt.backends.onnxruntime_backend import cache_dir
from ldm_rt.cli import main
from ldm_rt.configs import ModelConfig
from ldm_rt.errors import InputError
from ldm_rt.export.onnx_export import MANIFEST, StaticShape, check_static, export_model
from ldm_rt.export.specs import COMPONENT_NAMES, component_specs
from ldm_rt.model_dir import init_model, load_model_dir
from ldm_rt.parity_run import format_report, run_parity
from ldm_rt.pipeline import Pipeline

# Ops whose inputs must stay fp32 in an fp16/bf16 graph: softmax and norm statistics.
FP32_OPS = ("Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization", "ReduceMean")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def table(output: str) -> dict[str, str]:
    """'component output' -> its table row, from `ldm-rt parity` output."""
    rows = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in COMPONENT_NAMES:
            rows[f"{parts[0]} {parts[1]}"] = line
    return rows


def scale_largest_weight(path, factor: float) -> None:
    """Scale the largest fp32 initializer of an exported graph in place; the manifest (and its
    hash) stays as it was, so only parity can tell."""
    model = onnx.load(str(path))
    weight = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
                 key=lambda t: np.prod(t.dims))
    array = numpy_helper.to_array(weight)
    assert np.abs(array).max() > 0
    weight.CopyFrom(numpy_helper.from_array((array * factor).astype(array.dtype), weight.name))
    onnx.save(model, str(path))


def one_error_line(result, message: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], result.output


@pytest.fixture(scope="module")
def fp32_parity(tiny_model_dir, tmp_path_factory, one_thread):
    """`ldm-rt parity --backend onnxruntime` (fp32, CPU), exporting into a private cache."""
    cache = tmp_path_factory.mktemp("parity-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDM_RT_CACHE", str(cache))
        result = invoke("parity", "--model-dir", tiny_model_dir, "--backend", "onnxruntime", "--dtype", "fp32",
                        "--device", "cpu")
        export = cache_dir(load_model_dir(tiny_model_dir))
    return result, export


@pytest.fixture
def export_copy(fp32_parity, tmp_path):
    """A private copy of the fp32 export, to break."""
    _, export = fp32_parity
    return shutil.copytree(export, tmp_path / "onnx")


def test_parity_onnxruntime_fp32_passes(fp32_parity):
    result, export = fp32_parity
    print(result.output)
    assert result.exit_code == 0, result.output
    rows = table(result.output)
    assert set(rows) == {"text_encoder last_hidden_state", "text_encoder pooled", "transformer prediction",
                         "vae_decoder image"}
    for row in rows.values():
        assert row.split()[2] == "fp32" and row.endswith("pass"), row
    image = [line for line in result.output.splitlines() if line.startswith("image:")]
    assert len(image) == 1 and "(>= 40 dB) pass" in image[0]
    assert "parity: pass (5 of 5 checks pass)" in result.output
    assert (export / MANIFEST).is_file()


def test_perturbed_graph_fails(export_copy, tiny_model_dir, one_thread):
    args = ["parity", "--model-dir", tiny_model_dir, "--backend", "onnxruntime", "--dtype", "fp32",
            "--device", "cpu", "--onnx-dir", export_copy]
    result = invoke(*args)
    assert result.exit_code == 0, result.output  # the copy itself passes through --onnx-dir

    scale_largest_weight(export_copy / "transformer.onnx", 1.01)
    result = invoke(*args)
    print(result.output)
    assert result.exit_code == 1, result.output
    rows = table(result.output)
    assert "FAIL" in rows["transformer prediction"]
    assert rows["text_encoder pooled"].endswith("pass") and rows["vae_decoder image"].endswith("pass")
    assert "parity: FAIL" in result.output

    # NaN in one VAE weight: its row and the image fail as NaN/Inf, never pass.
    path = export_copy / "vae_decoder.onnx"
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(path))
    result = invoke(*args)
    print(result.output)
    assert result.exit_code == 1, result.output
    assert table(result.output)["vae_decoder image"].endswith("FAIL NaN/Inf")
    assert "PSNR NaN/Inf" in result.output and "parity: FAIL (2 of 5 checks pass)" in result.output


def test_polygraphy_verdicts(export_copy, tiny_model_dir, one_thread):
    """The polygraphy comparison `parity --backend tensorrt` uses, wired in on onnxruntime here."""
    pytest.importorskip("polygraphy")
    kwargs = dict(backend="onnxruntime", dtype="fp32", device="cpu", onnx_dir=export_copy, polygraphy=True)
    report = run_parity(tiny_model_dir, **kwargs)
    assert report.passed and all(row.polygraphy is True for row in report.rows)
    scale_largest_weight(export_copy / "transformer.onnx", 1.01)
    report = run_parity(tiny_model_dir, **kwargs)
    verdicts = {row.component: row.polygraphy for row in report.rows}
    assert verdicts == {"text_encoder": True, "transformer": False, "vae_decoder": True}
    assert "polygraphy FAIL" in "\n".join(format_report(report)) and not report.passed


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("dir missing", "does not exist"),
        ("manifest missing", "has no manifest.json"),
        ("manifest not json", "cannot be read as JSON"),
        ("file missing", "transformer.onnx is listed in"),
        ("component missing", "has no vae_decoder graph"),
        ("other dtype", "holds fp32 graphs, not fp16"),
    ],
)
def test_bad_onnx_dir_is_one_line(export_copy, tiny_model_dir, breakage, message):
    dtype = "fp32"
    if breakage == "dir missing":
        shutil.rmtree(export_copy)
    elif breakage == "manifest missing":
        (export_copy / MANIFEST).unlink()
    elif breakage == "manifest not json":
        (export_copy / MANIFEST).write_text("{ not json")
    elif breakage == "file missing":
        (export_copy / "transformer.onnx").unlink()
    elif breakage == "component missing":
        manifest = json.loads((export_copy / MANIFEST).read_text())
        del manifest["components"]["vae_decoder"]
        (export_copy / MANIFEST).write_text(json.dumps(manifest))
    elif breakage == "other dtype":
        dtype = "fp16"
    result = invoke("parity", "--model-dir", tiny_model_dir, "--backend", "onnxruntime", "--dtype", dtype,
                    "--device", "cpu", "--onnx-dir", export_copy)
    one_error_line(result, message)


def test_manifest_from_another_model_is_refused(export_copy, tmp_path):
    other = init_model(tmp_path / "other", "tiny", seed=1)  # same config, other weights
    result = invoke("parity", "--model-dir", other, "--backend", "onnxruntime", "--dtype", "fp32",
                    "--device", "cpu", "--onnx-dir", export_copy)
    one_error_line(result, "was exported from another model or other weights")


def test_onnx_dir_with_a_backend_that_takes_none(export_copy, tiny_model_dir):
    result = invoke("parity", "--model-dir", tiny_model_dir, "--backend", "torch", "--onnx-dir", export_copy)
    one_error_line(result, "onnx_dir applies to backend onnxruntime")


def test_unavailable_backend_is_one_line(tiny_model_dir):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        result = invoke("parity", "--model-dir", tiny_model_dir, "--backend", "tensorrt", "--device", "cpu")
        one_error_line(result, "tensorrt")
    if not torch.cuda.is_available():
        result = invoke("parity", "--model-dir", tiny_model_dir, "--backend", "onnxruntime", "--device", "cuda")
        one_error_line(result, "no CUDA GPU")


# -- fp16 / bf16 export ------------------------------------------------------------------------


def _graph_types(path) -> tuple[Counter, Counter]:
    """(op, dtype of its first input) counts and initializer dtype counts of an ONNX file."""
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    name = onnx.TensorProto.DataType.Name
    ops = Counter((n.op_type, name(types.get(n.input[0], 0))) for n in graph.node if n.input)
    return ops, Counter(name(t.data_type) for t in graph.initializer)


def _check_low_precision_graph(path, onnx_type: str) -> None:
    ops, weights = _graph_types(path)
    for (op, dtype), count in ops.items():
        if op in FP32_OPS:
            assert dtype == "FLOAT", f"{path.name}: {count} {op} node(s) compute in {dtype}, not fp32"
    assert any(op in FP32_OPS for op, _ in ops), path.name
    assert any(op in ("MatMul", "Conv", "Gemm") and dtype == onnx_type for op, dtype in ops), (path.name, ops)
    assert weights[onnx_type] > weights["FLOAT"], (path.name, weights)  # the weights are in the low dtype


@pytest.fixture(scope="module")
def fp16_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with `force_upcast: false`, so the VAE decoder is exported in fp16 too."""
    path = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("fp16-model") / "tiny")
    config = json.loads((path / "vae" / "config.json").read_text())
    config["force_upcast"] = False
    (path / "vae" / "config.json").write_text(json.dumps(config))
    return path


def test_parity_onnxruntime_fp16(fp16_model_dir, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("LDM_RT_CACHE", str(tmp_path))
    result = invoke("parity", "--model-dir", fp16_model_dir, "--backend", "onnxruntime", "--dtype", "fp16",
                    "--device", "cpu")
    print(result.output)
    assert result.exit_code == 0, result.output
    rows = table(result.output)
    assert len(rows) == 4 and all(r.split()[2] == "fp16" and r.endswith("pass") for r in rows.values()), rows
    assert "(>= 30 dB) pass" in result.output

    export = cache_dir(load_model_dir(fp16_model_dir), "fp16")
    manifest = json.loads((export / MANIFEST).read_text())
    assert manifest["dtype"] == "fp16"
    for name, entry in manifest["components"].items():
        onnx.checker.check_model(str(export / entry["file"]), full_check=True)
        for t in entry["inputs"] + entry["outputs"]:
            expected = {"input_ids": "int64", "text_mask": "bool", "timestep": "float32"}.get(t["name"], "float16")
            assert t["dtype"] == expected, (name, t)
        _check_low_precision_graph(export / entry["file"], "FLOAT16")


def test_fp16_specs_keep_an_upcast_vae_in_fp32(tiny_model_dir):
    config = load_model_dir(tiny_model_dir).config
    assert config.vae.force_upcast
    specs = component_specs(config, "fp16")
    assert specs["transformer"].dtype == torch.float16 and specs["vae_decoder"].dtype == torch.float32
    assert [t.dtype for t in specs["vae_decoder"].inputs] == [torch.float32]
    assert component_specs(config, "bf16")["vae_decoder"].dtype == torch.bfloat16  # no upcast for bf16


def test_bf16_export_is_a_valid_bf16_graph(tiny_model_dir, tmp_path, one_thread):
    """onnxruntime cannot run bf16 graphs (no kernels): checked here are the export, onnx.checker's
    full type check, the manifest and graph dtypes, and that softmax/norms stay fp32."""
    components = load_model_dir(tiny_model_dir)
    manifest = export_model(components, tmp_path, ["transformer", "vae_decoder"], dtype="bf16", log=lambda s: None)
    assert manifest["dtype"] == "bf16" and manifest["opset"] >= 22
    for name in ("transformer", "vae_decoder"):
        entry = manifest["components"][name]
        path = tmp_path / entry["file"]
        onnx.checker.check_model(str(path), full_check=True)
        for t in entry["inputs"] + entry["outputs"]:
            expected = {"text_mask": "bool", "timestep": "float32"}.get(t["name"], "bfloat16")
            assert t["dtype"] == expected, (name, t)
        graph = onnx.load(str(path)).graph
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
        _check_low_precision_graph(path, "BFLOAT16")
    # the caller's modules are untouched by the bf16 export
    assert all(p.dtype == torch.float32 for p in components.transformer.parameters())


def test_onnxruntime_backend_refuses_bf16(tiny_model_dir):
    with pytest.raises(InputError, match="cannot run bf16 graphs"):
        Pipeline.from_pretrained(tiny_model_dir, backend="onnxruntime", device="cpu", dtype="bf16")


# -- export bad input --------------------------------------------------------------------------


def test_bf16_with_an_old_opset_is_refused(tiny_model_dir, tmp_path):
    result = invoke("export", "--model", "vae", "--model-dir", tiny_model_dir, "--out", tmp_path,
                    "--dtype", "bf16", "--opset", 20)
    one_error_line(result, "--opset 20 cannot hold a bf16 graph")


def test_static_size_the_model_cannot_take(tiny_model_dir, tmp_path):
    # tiny: VAE factor 2 x patch 2 = 4; 30 is not a multiple
    result = invoke("export", "--model", "dit", "--model-dir", tiny_model_dir, "--out", tmp_path / "out",
                    "--static", "--height", 30)
    one_error_line(result, "--height 30 is not a size this model can take")
    assert not (tmp_path / "out" / "transformer.onnx").exists()
    # an SD-VAE-shaped model (factor 8, patch 2): the config alone decides, no weights needed
    with pytest.raises(InputError, match=r"multiple of 16 \(VAE factor 8 x patch size 2\)"):
        check_static(ModelConfig.from_name("dit-s-2"), StaticShape(1, 30, 256))


def test_unwritable_output_directory(tiny_model_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() == 0:  # root writes through mode bits; sysfs refuses new files even to root
            if not os.path.isdir("/sys"):
                pytest.skip("running as root, and no /sys to stand for a directory root cannot write")
            locked = "/sys"
        result = invoke("export", "--model", "vae", "--model-dir", tiny_model_dir, "--out", locked)
        one_error_line(result, "is not writable")
    finally:
        (tmp_path / "locked").chmod(0o700)
