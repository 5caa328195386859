"""The TensorRT path: every part that does not need libnvinfer, on CPU.

TensorRT cannot be installed in this workplace, so `build_engine` (the TensorRT builder calls)
and `TrtEngine` (execution) are not run here; the one GPU test at the end builds and runs real
engines where tensorrt and a CUDA GPU exist. `build_engines`' rebuild-only-what-is-stale logic is
tested with a stand-in builder that writes bytes: it proves the decisions, not the TensorRT calls.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cli_helpers import invoke as cli
from ldm_rt import parity
from ldm_rt.errors import InputError, LdmRtError, MissingDependencyError, ModelDirError
from ldm_rt.export.onnx_export import MANIFEST, MANIFEST_FORMAT, _spec_dict, export_model
from ldm_rt.export.specs import COMPONENT_NAMES, component_specs
from ldm_rt.export.tensorrt import (
    TENSORRT_API,
    BuildPlan,
    EngineMeta,
    Geometry,
    Point,
    SystemFacts,
    build_engine,
    build_engines,
    build_plan,
    check_precision,
    graph_dtype,
    compare_metadata,
    compare_with_polygraphy,
    engine_path,
    manifest_profiles,
    metadata_path,
    parse_shape,
    profile_points,
    read_metadata,
    shape_in_profile,
    stale_reason,
    write_metadata,
)
from ldm_rt.model_dir import load_model_dir
from ldm_rt.precision import Precision

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
A100 = SystemFacts("10.3.0", "NVIDIA A100-SXM4-80GB", "8.0")
H100 = SystemFacts("10.3.0", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def te_export(tiny, tmp_path_factory):
    """A real export of the tiny text encoder (the fastest component): a manifest as export writes it."""
    out = tmp_path_factory.mktemp("onnx")
    export_model(tiny, out, ["text_encoder"], log=lambda m: None)
    return out


def full_manifest(config, static=None, dtype="fp32") -> dict:
    """A manifest for all three components, with entries made by export's own `_spec_dict`."""
    specs = component_specs(config, dtype)
    return {
        "format": MANIFEST_FORMAT,
        "dtype": dtype,
        "static": static,
        "image": {"vae_scale_factor": config.vae.scale_factor, "patch_size": config.transformer.patch_size,
                  "sample_size": config.transformer.sample_size},
        "components": {n: {"file": f"{n}.onnx", "external_data": None, **_spec_dict(specs[n])} for n in COMPONENT_NAMES},
    }


def fake_onnx_dir(tmp_path: Path, config, dtype="fp32", name="onnx") -> Path:
    """A directory with a full manifest and distinct stand-in .onnx files (for the build logic only)."""
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / MANIFEST).write_text(json.dumps(full_manifest(config, dtype=dtype)))
    for component in COMPONENT_NAMES:
        (d / f"{component}.onnx").write_bytes(f"{dtype} graph of {component}".encode())
    return d


class FakeBuilder:
    """Stands in for `build_engine`: records each call and writes an engine-sized byte string."""

    def __init__(self, fail_on: str | None = None, write: bool = True):
        self.calls: list[tuple[str, str]] = []
        self.fail_on, self.write = fail_on, write

    def __call__(self, onnx_path, engine_path, *, precision, profiles, timing_cache, workspace_gb, log):
        component = onnx_path.stem
        self.calls.append((component, precision))
        if component == self.fail_on:
            raise LdmRtError(f"stand-in failure for {component}")
        if self.write:
            engine_path.write_bytes(f"engine {component} {precision} {sorted(profiles)}".encode())

    @property
    def built(self) -> list[str]:
        return [c for c, _ in self.calls]


def run_build(onnx_dir, system=H100, builder=None, **kwargs):
    lines: list[str] = []
    builder = builder or FakeBuilder()
    engines = build_engines(onnx_dir, system=system, builder=builder, log=lines.append, **kwargs)
    return engines, builder, lines


# -- shape syntax and profiles -----------------------------------------------------------------


def test_parse_shape_accepts_pairs_and_size():
    assert parse_shape("batch=2,height=512,width=768") == {"batch": 2, "height": 512, "width": 768}
    assert parse_shape(" size = 256 , batch=3 ") == {"height": 256, "width": 256, "batch": 3}
    assert parse_shape(None) == {} and parse_shape("") == {}


@pytest.mark.parametrize(
    "text,message",
    [
        ("batch", "expected key=value pairs"),
        ("=3", "expected key=value pairs"),
        ("depth=3", "unknown key 'depth'"),
        ("batch=two", "batch='two' is not a whole number"),
        ("height=0", "height must be >= 1"),
        ("batch=-1", "batch must be >= 1"),
        ("size=256,width=128", "width is given twice"),
        ("batch=1.5", "is not a whole number"),
    ],
)
def test_parse_shape_errors_name_the_option_and_value(text, message):
    with pytest.raises(InputError, match="--max") as err:
        parse_shape(text, "--max")
    assert message in str(err.value)


def test_default_points_follow_the_model_geometry():
    g = Geometry(vae_scale_factor=8, patch_size=2, sample_size=32)  # DiT-XL/2 at 256 px
    assert profile_points(g) == {"min": Point(1, 128, 128), "opt": Point(1, 256, 256), "max": Point(4, 512, 512)}


def test_overrides_replace_defaults_and_widen_the_others():
    g = Geometry(8, 2, 32)
    points = profile_points(g, opt="size=1024,batch=2")
    assert points["opt"] == Point(2, 1024, 1024)
    assert points["max"] == Point(4, 1024, 1024)  # widened from 512 to take in opt
    assert points["min"] == Point(1, 128, 128)
    points = profile_points(g, min="height=384", max="batch=8,width=768")
    assert points["min"] == Point(1, 384, 128) and points["opt"] == Point(1, 384, 256)
    assert points["max"] == Point(8, 512, 768)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"opt": "height=100"}, "--opt height=100 is not a size this model can take: it must be a multiple of 16"),
        ({"min": "size=512", "max": "size=256"}, "--min 512 is larger than --max 256"),
        ({"opt": "batch=4", "max": "batch=2"}, "--opt 4 is larger than --max 2"),
    ],
)
def test_bad_profiles_are_one_clear_error(kwargs, message):
    with pytest.raises(InputError) as err:
        profile_points(Geometry(8, 2, 32), **kwargs)
    assert message in str(err.value)


def test_profiles_from_a_real_export_manifest(te_export, tiny):
    manifest = json.loads((te_export / MANIFEST).read_text())
    assert Geometry.from_manifest(manifest) == Geometry.from_config(tiny.config)
    seq = tiny.config.text_encoder.max_position_embeddings
    profiles = manifest_profiles(manifest)
    assert list(profiles) == ["text_encoder"]
    # CFG doubles the text encoder's opt/max batch (uncond + cond prompts in one call).
    assert profiles["text_encoder"] == {"input_ids": {"min": [1, seq], "opt": [2, seq], "max": [8, seq]}}


def test_profiles_for_every_component_match_the_spec_sample_shapes(tiny):
    """Profile shapes (manifest dims resolved) equal the shapes of the spec's own sample inputs."""
    config = tiny.config
    f = config.vae.scale_factor
    profiles = manifest_profiles(full_manifest(config), max="batch=3,height=24,width=40")
    specs = component_specs(config)
    points = profile_points(Geometry.from_config(config), max="batch=3,height=24,width=40")
    for name in COMPONENT_NAMES:
        for point_name, point in points.items():
            batch = point.batch * (2 if name in ("text_encoder", "transformer") and point_name != "min" else 1)
            expected = specs[name].shapes(batch, point.height // f, point.width // f)
            got = {k: tuple(v[point_name]) for k, v in profiles[name].items()}
            assert got == expected, (name, point_name)
    assert profiles["transformer"]["latents"]["max"] == [6, config.transformer.in_channels, 12, 20]
    assert profiles["vae_decoder"]["latents"]["max"] == [3, config.vae.latent_channels, 12, 20]


def test_static_export_gives_one_shape_and_refuses_overrides(tiny):
    manifest = full_manifest(tiny.config, static={"batch": 2, "height": 24, "width": 16})
    profiles = manifest_profiles(manifest)
    latents = profiles["transformer"]["latents"]
    assert latents["min"] == latents["opt"] == latents["max"] == [2, tiny.config.transformer.in_channels, 12, 8]
    with pytest.raises(InputError, match="static"):
        manifest_profiles(manifest, opt="size=32")


def test_manifest_without_geometry_says_to_reexport(tiny):
    manifest = full_manifest(tiny.config)
    del manifest["image"]
    with pytest.raises(ModelDirError, match="re-export"):
        manifest_profiles(manifest)


def test_shape_in_profile():
    profile = {"latents": {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]}}
    assert shape_in_profile(profile, {"latents": (3, 4, 16, 6)}) is None
    assert "outside the engine's profile (1, 4, 4, 4)..(8, 4, 16, 16)" in shape_in_profile(profile, {"latents": (2, 4, 18, 8)})
    assert "outside" in shape_in_profile(profile, {"latents": (2, 4, 8)})
    assert "not in the engine's profile" in shape_in_profile(profile, {"timestep": (2,)})


# -- naming, metadata, staleness ---------------------------------------------------------------


def test_engine_names():
    assert engine_path("e", "transformer", "fp16") == Path("e/transformer.fp16.engine")
    assert engine_path("e", "vae_decoder", "bf16").name == "vae_decoder.bf16.engine"
    with pytest.raises(InputError, match="unknown TensorRT precision 'strongly-typed'"):
        engine_path("e", "transformer", "strongly-typed")  # every engine is strongly typed: not a mode
    assert metadata_path(Path("e/transformer.fp16.engine")) == Path("e/transformer.fp16.engine.json")
    with pytest.raises(InputError, match="unknown TensorRT precision 'int8'"):
        engine_path("e", "transformer", "int8")


def meta(system=A100, **changes) -> EngineMeta:
    base = dict(component="transformer", precision="fp16", tensorrt=system.tensorrt, gpu=system.gpu,
                compute_capability=system.compute_capability, onnx_file="transformer.onnx", onnx_sha256="a" * 64,
                profiles={"latents": {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 16, 16]}})
    return EngineMeta(**{**base, **changes})


def test_metadata_round_trip(tmp_path):
    engine = tmp_path / "transformer.fp16.engine"
    m = meta(workspace_gb=4.0, engine_bytes=123)
    path = write_metadata(engine, m)
    assert path == metadata_path(engine) and json.loads(path.read_text())["tensorrt"] == "10.3.0"
    assert read_metadata(engine) == m
    path.write_text("{not json")
    assert read_metadata(engine) is None
    path.write_text(json.dumps({**json.loads(m.to_json()), "format": 99}))
    assert read_metadata(engine) is None


def test_fresh_metadata_is_not_stale():
    assert compare_metadata(meta(), meta(workspace_gb=8.0)) is None  # the workspace limit is not a reason


@pytest.mark.parametrize(
    "wanted,reason",
    [
        (meta(tensorrt="10.8.0"), "built with TensorRT 10.3.0, this is TensorRT 10.8.0"),
        (meta(H100), "built for compute capability 8.0 (NVIDIA A100-SXM4-80GB), this is compute capability 9.0 "
                     "(NVIDIA H100 80GB HBM3)"),
        (meta(gpu="NVIDIA A100-PCIE-40GB"), "built on NVIDIA A100-SXM4-80GB, this is NVIDIA A100-PCIE-40GB"),
        (meta(onnx_sha256="b" * 64), "transformer.onnx changed since the build (sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb)"),
        (meta(precision="bf16"), "built as fp16, bf16 is asked for"),
        (meta(profiles={"latents": {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [8, 4, 32, 32]}}),
         "other optimisation profiles asked for (latents max (8, 4, 16, 16) -> (8, 4, 32, 32))"),
    ],
)
def test_stale_reasons(wanted, reason):
    assert compare_metadata(meta(), wanted) == reason


def test_version_and_gpu_change_read_as_one_sentence():
    wanted = meta(SystemFacts("10.8.0", "NVIDIA H100 80GB HBM3", "9.0"))
    assert compare_metadata(meta(), wanted) == (
        "built with TensorRT 10.3.0 for compute capability 8.0 (NVIDIA A100-SXM4-80GB), "
        "this is TensorRT 10.8.0 on compute capability 9.0 (NVIDIA H100 80GB HBM3)"
    )


def test_stale_reason_for_engine_files(tmp_path):
    engine = tmp_path / "transformer.fp16.engine"
    assert stale_reason(engine, meta()) == "no engine yet"
    engine.write_bytes(b"x" * 10)
    assert "metadata transformer.fp16.engine.json is missing" in stale_reason(engine, meta())
    write_metadata(engine, meta(engine_bytes=10))
    assert stale_reason(engine, meta()) is None
    engine.write_bytes(b"x" * 11)
    assert "not the one its metadata describes" in stale_reason(engine, meta())


# -- build_engines: rebuild only what is missing or stale (stand-in builder) --------------------


def test_build_engines_builds_missing_then_reuses(tmp_path, tiny):
    onnx_dir = fake_onnx_dir(tmp_path, tiny.config, dtype="fp16")
    engines, builder, lines = run_build(onnx_dir, precision="fp16")
    assert builder.built == list(COMPONENT_NAMES) and set(engines) == set(COMPONENT_NAMES)
    # each graph is built in its own type: the force_upcast VAE decoder of an fp16 export is fp32
    assert tiny.config.vae.force_upcast
    assert builder.calls == [("text_encoder", "fp16"), ("transformer", "fp16"), ("vae_decoder", "fp32")]
    assert all(line.endswith(f"no engine yet; building {engines[n]}") for n, line in zip(COMPONENT_NAMES, lines))
    for name, path in engines.items():
        assert path == onnx_dir / f"{name}.fp16.engine" and path.is_file()
        m = read_metadata(path)
        assert (m.tensorrt, m.gpu, m.compute_capability, m.precision) == ("10.3.0", H100.gpu, "9.0", "fp16")
        assert m.engine_bytes == path.stat().st_size and m.onnx_file == f"{name}.onnx"
    assert not list(onnx_dir.glob("*.tmp"))

    _, builder, lines = run_build(onnx_dir)  # no precision given: the export's
    assert builder.built == [] and all("reusing" in line for line in lines)


def test_build_engines_rebuilds_only_what_changed(tmp_path, tiny):
    onnx_dir = fake_onnx_dir(tmp_path, tiny.config)
    run_build(onnx_dir)
    (onnx_dir / "vae_decoder.onnx").write_bytes(b"re-exported vae")
    _, builder, lines = run_build(onnx_dir)
    assert builder.built == ["vae_decoder"]
    assert "vae_decoder.onnx changed since the build" in lines[2] and "rebuilding" in lines[2]

    _, builder, lines = run_build(onnx_dir, system=SystemFacts("10.8.0", H100.gpu, "9.0"))
    assert builder.built == list(COMPONENT_NAMES)
    assert all("built with TensorRT 10.3.0, this is TensorRT 10.8.0; rebuilding" in line for line in lines)

    _, builder, lines = run_build(onnx_dir, system=SystemFacts("10.8.0", A100.gpu, "8.0"))
    assert builder.built == list(COMPONENT_NAMES) and "compute capability 9.0" in lines[0]

    _, builder, _ = run_build(onnx_dir, system=SystemFacts("10.8.0", A100.gpu, "8.0"), max="batch=8")
    assert builder.built == list(COMPONENT_NAMES)  # every component's batch range changed

    _, builder, _ = run_build(onnx_dir, system=SystemFacts("10.8.0", A100.gpu, "8.0"), max="batch=8,size=40")
    assert builder.built == ["transformer", "vae_decoder"]  # the text encoder has no image size

    fake_onnx_dir(tmp_path, tiny.config, dtype="bf16")  # re-exported in bf16 into the same directory
    _, builder, _ = run_build(onnx_dir, system=SystemFacts("10.8.0", A100.gpu, "8.0"), precision="bf16",
                              components=["transformer"])
    assert builder.calls == [("transformer", "bf16")] and (onnx_dir / "transformer.bf16.engine").is_file()


def test_failed_build_leaves_nothing_that_looks_fresh(tmp_path, tiny):
    onnx_dir = fake_onnx_dir(tmp_path, tiny.config)
    run_build(onnx_dir)
    (onnx_dir / "transformer.onnx").write_bytes(b"changed")
    with pytest.raises(LdmRtError, match="stand-in failure"):
        run_build(onnx_dir, builder=FakeBuilder(fail_on="transformer"))
    assert not metadata_path(onnx_dir / "transformer.fp32.engine").exists()
    _, builder, lines = run_build(onnx_dir)
    assert builder.built == ["transformer"] and "metadata" in lines[1]
    with pytest.raises(LdmRtError, match="produced no engine file"):
        run_build(onnx_dir, system=A100, builder=FakeBuilder(write=False))


def test_engines_go_to_out_dir(tmp_path, tiny):
    onnx_dir = fake_onnx_dir(tmp_path, tiny.config)
    engines, _, _ = run_build(onnx_dir, out_dir=tmp_path / "engines" / "h100")
    assert {p.parent for p in engines.values()} == {tmp_path / "engines" / "h100"}


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"workspace_gb": 0}, InputError, "--workspace 0 must be a positive number of GiB"),
        ({"workspace_gb": -2.0}, InputError, "--workspace -2.0 must be"),
        ({"precision": "int8"}, InputError, "unknown TensorRT precision 'int8'"),
        ({"components": ["unet"]}, ModelDirError, "has no unet"),
        ({"opt": "batch=0"}, InputError, "--opt 'batch=0': batch must be >= 1"),
    ],
)
def test_build_engines_argument_errors(tmp_path, tiny, kwargs, error, message):
    onnx_dir = fake_onnx_dir(tmp_path, tiny.config)
    with pytest.raises(error) as err:
        run_build(onnx_dir, **kwargs)
    assert message in str(err.value)


def test_build_engines_onnx_dir_errors(tmp_path, tiny):
    with pytest.raises(ModelDirError, match="does not exist"):
        run_build(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="has no manifest.json, so its graphs cannot be matched"):
        run_build(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text('{"format": 1, "components": {}}')
    with pytest.raises(ModelDirError, match="is not an ldm-rt manifest"):
        run_build(tmp_path / "empty")
    onnx_dir = fake_onnx_dir(tmp_path, tiny.config)
    (onnx_dir / "transformer.onnx").unlink()
    with pytest.raises(ModelDirError, match="lists transformer.onnx, which is missing"):
        run_build(onnx_dir)
    (onnx_dir / "cache").mkdir()
    with pytest.raises(InputError, match="--timing-cache .* is not a file"):
        run_build(onnx_dir, timing_cache=onnx_dir / "cache")


# -- CLI ---------------------------------------------------------------------------------------




def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_build_engine_without_tensorrt_names_the_extra(te_export, tmp_path):
    line = one_error_line(cli("build-engine", "--onnx-dir", te_export, "--out", tmp_path / "e"))
    assert "pip install 'ldm-rt[tensorrt]'" in line
    assert not (tmp_path / "e").exists()  # nothing written before the check


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_run_with_tensorrt_backend_without_tensorrt_names_the_extra(tiny_model_dir):
    line = one_error_line(cli("run", "--model-dir", tiny_model_dir, "--prompt", "x", "--backend", "tensorrt"))
    assert "pip install 'ldm-rt[tensorrt]'" in line


@pytest.mark.parametrize(
    "args,message",
    [
        (["--fp16", "--bf16"], "--fp16 and --bf16 exclude each other"),
        (["--min", "batch=2", "--max", "batch=1"], "--min 2 is larger than --max 1"),
        (["--opt", "height=30"], "--opt height=30 is not a size this model can take"),
        (["--max", "depth=2"], "unknown key 'depth'"),
        (["--workspace", "0"], "--workspace 0.0 must be a positive number"),
    ],
)
def test_build_engine_argument_errors(te_export, args, message):
    assert message in one_error_line(cli("build-engine", "--onnx-dir", te_export, *args))


def test_build_engine_needs_an_export(tmp_path):
    assert "has no manifest.json" in one_error_line(cli("build-engine", "--onnx-dir", tmp_path))
    assert cli("build-engine").exit_code == 2  # --onnx-dir is required (click usage error)


def test_tensorrt_backend_refuses_the_cpu_before_importing_tensorrt(tiny):
    from ldm_rt.backends.tensorrt_backend import load
    from ldm_rt.precision import Precision

    with pytest.raises(InputError, match=r"runs on an NVIDIA GPU \(device cuda\), not on cpu"):
        load(tiny, torch.device("cpu"), Precision.FP32)


def test_trt_dtype_names_cover_every_spec_dtype(tiny):
    from types import SimpleNamespace

    from ldm_rt.backends.tensorrt_backend import TORCH_DTYPES, torch_dtype

    assert torch_dtype(SimpleNamespace(name="HALF")) is torch.float16
    assert torch_dtype(SimpleNamespace(name="BF16")) is torch.bfloat16
    with pytest.raises(LdmRtError, match="FP8"):
        torch_dtype(SimpleNamespace(name="FP8"))
    spec_dtypes = {t.dtype for s in component_specs(tiny.config).values() for t in s.inputs + s.outputs}
    assert spec_dtypes <= set(TORCH_DTYPES.values())


# -- polygraphy comparison hook ----------------------------------------------------------------


def test_polygraphy_comparison_judges_with_the_shared_table():
    pytest.importorskip("polygraphy", reason="polygraphy is in the test extra")
    g = torch.Generator().manual_seed(3)
    ref = {"prediction": torch.randn(3, 4, 12, 6, generator=g)}
    tol = parity.TOLERANCES[("transformer", "fp32")]

    close = {"prediction": ref["prediction"] + tol.max_abs / 10 * torch.randn(3, 4, 12, 6, generator=g).clamp(-1, 1)}
    (row,) = compare_with_polygraphy(close, ref, "transformer", "fp32")
    assert row.output == "prediction" and row.polygraphy_passed and row.passed

    spike = ref["prediction"].clone()
    spike[1, 2, 3, 4] += 3 * tol.max_abs  # one element over max-abs, rel-L2 still tiny
    (row,) = compare_with_polygraphy({"prediction": spike}, ref, "transformer", "fp32")
    assert not row.polygraphy_passed and not row.passed

    # Within max-abs everywhere, but a uniform shift that fails the rel-L2 bound.
    shifted = {"prediction": ref["prediction"] + tol.max_abs / 2}
    (row,) = compare_with_polygraphy(shifted, ref, "transformer", "fp32")
    assert row.polygraphy_passed and row.comparison.rel_l2 > tol.rel_l2 and not row.passed
    (row,) = compare_with_polygraphy(shifted, ref, "transformer", "fp16")  # the looser fp16 row accepts it
    assert row.passed

    nan = ref["prediction"].clone()
    nan[0, 0, 0, 0] = float("nan")
    (row,) = compare_with_polygraphy({"prediction": nan}, ref, "transformer", "fp32")
    assert not row.passed and not row.comparison.finite

    with pytest.raises(InputError, match="shape"):
        compare_with_polygraphy({"prediction": ref["prediction"][:2]}, ref, "transformer", "fp32")
    with pytest.raises(InputError, match="do not match the reference outputs"):
        compare_with_polygraphy({"image": ref["prediction"]}, ref, "transformer", "fp32")


def test_polygraphy_missing_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "polygraphy.comparator", None)  # makes the import fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'ldm-rt\[tensorrt\]'"):
        compare_with_polygraphy({}, {}, "transformer", "fp32")


# -- the strongly typed build plan (pure code, for TensorRT 10- and 11-shaped modules) ----------


def fake_trt(version: str):
    """The parts of a `tensorrt` module `build_plan` reads, shaped like the real bindings of that
    major version (11.4.0.106: STRONGLY_TYPED = 0 and no FP16/BF16 builder flags; 10.13.3.9:
    EXPLICIT_BATCH = 0, STRONGLY_TYPED = 1, FP16/BF16 flags present)."""
    if version.startswith("11."):
        network_flags = SimpleNamespace(STRONGLY_TYPED=0)
        builder_flags = SimpleNamespace(TF32=6, DEBUG=2)
    elif version.startswith("10."):
        network_flags = SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
        builder_flags = SimpleNamespace(FP16=0, TF32=6, BF16=17)
    else:  # 8.x: no strongly typed networks
        network_flags = SimpleNamespace(EXPLICIT_BATCH=0)
        builder_flags = SimpleNamespace(FP16=0, TF32=6)
    return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=network_flags, BuilderFlag=builder_flags)


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.106"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_build_plan_is_strongly_typed_with_no_precision_flags(version, dtype):
    trt = fake_trt(version)
    plan = build_plan(trt, dtype)
    assert plan == BuildPlan(
        graph_dtype=dtype,
        network_flags=1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED,
        set_flags=(),  # never FP16/BF16: gone in 11, refused on strongly typed networks in 10
        clear_flags=("TF32",) if dtype == "fp32" else (),  # fp32 engines compute in true fp32
    )


def test_build_plan_refuses_tensorrt_without_strong_typing_and_unknown_precisions():
    with pytest.raises(MissingDependencyError, match=r"TensorRT 8.6.1 cannot build the strongly typed .* TensorRT "
                                                     r"10 and 11: pip install -U 'ldm-rt\[tensorrt\]'"):
        build_plan(fake_trt("8.6.1"), "fp16")
    with pytest.raises(InputError, match="unknown TensorRT precision 'int8'"):
        build_plan(fake_trt("11.4.0.106"), "int8")


class RecordingTrt:
    """A `tensorrt` module stand-in that records what `build_engine` asks of the builder API."""

    def __init__(self, version: str, inputs):
        self.__version__ = version
        base = fake_trt(version)
        self.NetworkDefinitionCreationFlag, self.BuilderFlag = base.NetworkDefinitionCreationFlag, base.BuilderFlag
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
        self.calls: list[tuple] = []
        rec = self.calls

        class Logger:
            WARNING = "WARNING"

            def __init__(self, level):
                pass

        class Config:
            def set_memory_pool_limit(self, pool, size):
                rec.append(("pool", pool, size))

            def set_flag(self, flag):
                rec.append(("set_flag", flag))

            def clear_flag(self, flag):
                rec.append(("clear_flag", flag))

            def add_optimization_profile(self, profile):
                rec.append(("profile", dict(profile.shapes)))

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class Network:
            num_inputs = len(inputs)

            def get_input(self, i):
                return SimpleNamespace(name=inputs[i])

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"serialized engine"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                rec.append(("parse", Path(path).name))
                return True

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser


@pytest.mark.parametrize("version", ["10.13.3.9", "11.4.0.106"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_build_engine_follows_the_plan(monkeypatch, tmp_path, version, dtype):
    import ldm_rt.export.tensorrt as tensorrt_mod

    trt = RecordingTrt(version, ["latents"])
    monkeypatch.setattr(tensorrt_mod, "import_tensorrt", lambda: trt)
    profiles = {"latents": {"min": [1, 4, 4, 4], "opt": [2, 4, 8, 8], "max": [4, 4, 16, 16]}}
    build_engine(tmp_path / "transformer.onnx", tmp_path / "e.engine", precision=dtype, profiles=profiles,
                 workspace_gb=2)
    assert (tmp_path / "e.engine").read_bytes() == b"serialized engine"
    flags = [c for c in trt.calls if c[0] in ("set_flag", "clear_flag")]
    assert flags == ([("clear_flag", trt.BuilderFlag.TF32)] if dtype == "fp32" else [])
    assert ("create_network", 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) in trt.calls
    assert ("pool", "WORKSPACE", 2 * 2**30) in trt.calls
    assert ("profile", {"latents": ([1, 4, 4, 4], [2, 4, 8, 8], [4, 4, 16, 16])}) in trt.calls


def test_a_precision_other_than_the_exports_is_one_sentence_that_says_how(tmp_path, tiny):
    onnx_dir = fake_onnx_dir(tmp_path, tiny.config)  # an fp32 export
    builder = FakeBuilder()
    with pytest.raises(InputError) as err:
        run_build(onnx_dir, precision="fp16", builder=builder)
    message = str(err.value)
    assert f"{onnx_dir} holds a fp32 export" in message and "TensorRT 11 has no FP16/BF16 builder flags" in message
    assert "`ldm-rt export --model all --dtype fp16 --out DIR`" in message and "\n" not in message
    assert builder.calls == [] and not list(onnx_dir.glob("*.engine"))  # refused before any build


def test_check_precision_and_graph_dtype(tiny):
    assert check_precision({"dtype": "bf16"}, None) == "bf16"
    assert check_precision({}, None) == "fp32"  # manifests carry their dtype; an old one was fp32
    assert check_precision({"dtype": "fp16"}, "fp16") == "fp16"
    with pytest.raises(ModelDirError, match="dtype 'int8'"):
        check_precision({"dtype": "int8"}, None)
    manifest = full_manifest(tiny.config, dtype="fp16")
    dtypes = {n: graph_dtype(e, n) for n, e in manifest["components"].items()}
    assert dtypes == {"text_encoder": "fp16", "transformer": "fp16", "vae_decoder": "fp32"}  # force_upcast
    with pytest.raises(ModelDirError, match="does not give one floating output type"):
        graph_dtype({"outputs": [{"name": "ids", "dtype": "int64"}]}, "odd")


def test_cli_fp16_on_an_fp32_export_is_refused_before_tensorrt(te_export, tmp_path):
    line = one_error_line(cli("build-engine", "--onnx-dir", te_export, "--out", tmp_path / "e", "--fp16"))
    assert "holds a fp32 export" in line and "--dtype fp16" in line
    assert not (tmp_path / "e").exists()


def test_backend_exports_in_the_default_cuda_precision(monkeypatch, tiny):
    """The CUDA default (fp16) and bf16 reach the export as the graph dtype, and the engines are
    asked for that precision: strongly typed engines compute in their graph's types."""
    import ldm_rt.backends.tensorrt_backend as backend
    import ldm_rt.export.onnx_export as onnx_export
    import ldm_rt.export.tensorrt as tensorrt_mod

    seen = {}

    class Stop(Exception):
        pass

    def fake_export(components, out, names, dtype, digests):
        seen["export"], seen["out"] = dtype, out
        return {}

    def fake_build(onnx_dir, out_dir, precision, **kwargs):
        seen["build"] = precision
        raise Stop

    monkeypatch.setattr(backend, "check", lambda device, precision: H100)
    monkeypatch.setattr(onnx_export, "export_model", fake_export)
    monkeypatch.setattr(tensorrt_mod, "build_engines", fake_build)
    cuda_default = Precision.default_for(torch.device("cuda"))
    assert cuda_default is Precision.FP16
    outs = {}
    for precision in (cuda_default, Precision.BF16):
        with pytest.raises(Stop):
            backend.load(tiny, torch.device("cuda"), precision)
        assert seen["export"] == seen["build"] == precision.value
        outs[precision] = seen["out"]
    assert outs[Precision.FP16] != outs[Precision.BF16]  # one cache directory per graph precision


def test_backend_check_refuses_an_impossible_precision_before_any_export(monkeypatch):
    import ldm_rt.backends.tensorrt_backend as backend
    import ldm_rt.export.tensorrt as tensorrt_mod

    turing = SystemFacts("11.4.0.106", "Tesla T4", "7.5")
    assert backend.precision_problem(Precision.BF16, turing).startswith("bf16 engines need compute capability 8.0")
    assert backend.precision_problem(Precision.FP16, turing) is None
    assert backend.precision_problem(Precision.BF16, H100) is None
    monkeypatch.setattr(tensorrt_mod, "import_tensorrt", lambda: fake_trt("11.4.0.106"))
    monkeypatch.setattr(tensorrt_mod, "current_system", lambda index=None: turing)
    with pytest.raises(InputError, match="cannot build bf16 engines here: bf16 engines need compute capability"):
        backend.check(torch.device("cuda"), Precision.BF16)
    assert backend.check(torch.device("cuda"), Precision.FP16) == turing
    monkeypatch.setattr(tensorrt_mod, "import_tensorrt", lambda: fake_trt("8.6.1"))
    with pytest.raises(MissingDependencyError, match="TensorRT 8.6.1 cannot build the strongly typed"):
        backend.check(torch.device("cuda"), Precision.FP16)


# -- every TensorRT name the code uses exists in the real bindings ------------------------------

TRT_SOURCES = [Path(__file__).resolve().parents[1] / p
               for p in ("export/tensorrt.py", "ldm_rt/backends/tensorrt_backend.py")]


def _trt_attribute_chains(path: Path) -> set[tuple[str, ...]]:
    """Every `trt.A` and `trt.A.B` in a source file, as ('A',) and ('A', 'B')."""
    chains = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            parts = []
            inner = node
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "trt":
                chains.add(tuple(reversed(parts))[:2])
    return chains


def test_the_code_names_no_tensorrt_attribute_outside_the_declared_api():
    used = set().union(*(_trt_attribute_chains(p) for p in TRT_SOURCES))
    assert ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED") in used and ("BuilderFlag",) in used
    # build_engine looks the plan's flag names up on trt.BuilderFlag: they must be declared too
    for dtype in ("fp32", "fp16", "bf16"):
        plan = build_plan(fake_trt("11.4.0.106"), dtype)
        assert set(plan.set_flags + plan.clear_flags) <= set(TENSORRT_API["BuilderFlag"])
    for chain in used:
        assert chain[0] in TENSORRT_API[""], chain
        if len(chain) == 2:
            assert chain[1] in TENSORRT_API[chain[0]], chain
    # FP16/BF16 builder flags are gone in TensorRT 11: nothing may use them
    assert not any(c[-1] in ("FP16", "BF16") and c[0] == "BuilderFlag" for c in used)


def _real_bindings():
    for name in ("tensorrt", "tensorrt_bindings"):  # `../shared/tools/trt-bindings.sh` gives the latter
        try:
            return __import__(name)
        except Exception:  # ImportError, or an OSError from missing libnvinfer
            continue
    return None


def test_declared_tensorrt_api_exists_in_the_real_bindings():
    """Runs where TensorRT's Python bindings import (a GPU machine with TensorRT, or the bindings
    wheel with stub libraries: `eval "$(bash ../shared/tools/trt-bindings.sh 11.4.0.106)"`); checked
    so with 11.4.0.106 and 10.13.3.9."""
    trt = _real_bindings()
    if trt is None:
        pytest.skip("TensorRT's Python bindings are not importable here (see ../shared/tools/trt-bindings.sh)")
    missing = [f"{cls}.{name}" if cls else name for cls, names in TENSORRT_API.items() for name in names
               if not hasattr(getattr(trt, cls) if cls else trt, name)]
    assert not missing, (trt.__version__, missing)
    plan = build_plan(trt, "fp32")
    assert plan.network_flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert all(hasattr(trt.BuilderFlag, f) for f in plan.set_flags + plan.clear_flags)


# -- GPU: real engines (runs only where tensorrt and CUDA exist) --------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt is not installed (pip install 'ldm-rt[tensorrt]')")
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_engines_build_run_and_match_the_reference(tiny, tmp_path, dtype):
    from ldm_rt.backends.tensorrt_backend import TrtEngine

    onnx_dir = tmp_path / "onnx"
    export_model(tiny, onnx_dir, COMPONENT_NAMES, dtype=dtype, log=lambda m: None)
    engines = build_engines(onnx_dir, timing_cache=tmp_path / "timing.cache")  # the export's precision
    assert (tmp_path / "timing.cache").is_file()
    device = torch.device("cuda")
    specs, reference_specs = component_specs(tiny.config, dtype), component_specs(tiny.config)
    for name in COMPONENT_NAMES:
        spec = specs[name]
        engine = TrtEngine(engines[name], spec, device)
        for batch, h, w in [(1, 8, 8), (3, 12, 6)]:
            inputs = reference_specs[name].sample_inputs(batch, h, w, seed=batch)
            with torch.no_grad():
                ref = reference_specs[name].module(tiny).eval()(*inputs)  # the fp32 reference
            ref = ref if isinstance(ref, tuple) else (ref,)
            outs = engine(*[x.to(device) for x in inputs])
            graph = graph_dtype(json.loads((onnx_dir / MANIFEST).read_text())["components"][name], name)
            rows = compare_with_polygraphy(dict(zip(spec.output_names, outs)), dict(zip(spec.output_names, ref)),
                                           spec.parity_key, graph)
            assert all(r.passed for r in rows), (name, dtype, batch, h, w, rows)
    lines = []
    build_engines(onnx_dir, precision=dtype, log=lines.append)
    assert all("reusing" in line for line in lines)
