"""TensorRT engine build (TensorRT >= 10 Python API), installed as `ldm_rt.export.tensorrt`.

What lives here, and what of it needs libnvinfer:

- optimisation profiles (min/opt/max per input) made from the export manifest, i.e. from the
  component specs (`export/specs.py`), with user overrides: pure, tested on CPU;
- engine file names, the JSON metadata written next to each engine, and the staleness check
  that compares it with the running system: pure, tested on CPU;
- `build_engines`: rebuilds only missing or stale engines, with one line saying why. The
  decision is pure (tested with a stand-in builder); the default builder, `build_engine`, calls
  TensorRT;
- `build_engine`: Builder, network (strongly typed when asked), OnnxParser.parse_from_file,
  builder flags, workspace pool limit, timing cache, build_serialized_network. Written against
  the documented TensorRT 10 API and NOT run in this workplace: TensorRT cannot be installed here;
- `compare_with_polygraphy`: polygraphy's Comparator on engine outputs against reference
  outputs (for `ldm-rt parity --backend tensorrt`); needs polygraphy only, tested on CPU.

`tensorrt` and `polygraphy` are imported inside functions, never at module import.

Shape syntax for `--min/--opt/--max`: comma-separated `key=value` pairs, keys
`batch` (images per call), `height` and `width` (image pixels, as in `ldm-rt run`) and `size`
(height and width at once), e.g. `batch=2,height=512,width=768` or `size=256`. Keys left out
keep their defaults. The text encoder and the DiT run on the classifier-free-guidance batch
(unconditional + conditional halves, see `Pipeline.generate`), so their `opt` and `max` batch
is twice the image batch; `min` stays the image batch, so a run without guidance fits too.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from ldm_rt import __version__
from ldm_rt.errors import InputError, LdmRtError, MissingDependencyError, ModelDirError, require
from ldm_rt.export.onnx_dir import read_manifest
from ldm_rt.export.onnx_export import MANIFEST
from ldm_rt.model_dir import writable_dir

ENGINE_FORMAT = 1
MODES = ("fp32", "fp16", "bf16", "strongly-typed")
# Components called on the CFG batch [uncond; cond]: Pipeline.generate encodes uncond + cond
# prompts in one text-encoder call and Pipeline.denoise concatenates the latents for the DiT.
CFG_BATCHED = ("text_encoder", "transformer")
SHAPE_KEYS = ("batch", "height", "width", "size")
# Default profile: images per call 1 / 1 / 4; image side half / 1x / 2x the model's default.
DEFAULT_IMAGES = {"min": 1, "opt": 1, "max": 4}
DEFAULT_SIDE = {"min": 0.5, "opt": 1.0, "max": 2.0}
PROFILE_POINTS = ("min", "opt", "max")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- optimisation profiles ---------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """How image pixels map to latent sizes: pixels = latent * vae_scale_factor."""

    vae_scale_factor: int
    patch_size: int
    sample_size: int  # the model's default latent side

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x patch size)."""
        return self.vae_scale_factor * self.patch_size

    @property
    def default_pixels(self) -> int:
        return self.sample_size * self.vae_scale_factor

    @classmethod
    def from_config(cls, config) -> Geometry:
        return cls(config.vae.scale_factor, config.transformer.patch_size, config.transformer.sample_size)

    @classmethod
    def from_manifest(cls, manifest: dict, where: str = "the manifest") -> Geometry:
        image = manifest.get("image")
        if not isinstance(image, dict):
            raise ModelDirError(
                f"{where} has no image geometry (it predates TensorRT support); re-export with `ldm-rt export`."
            )
        try:
            return cls(int(image["vae_scale_factor"]), int(image["patch_size"]), int(image["sample_size"]))
        except (KeyError, TypeError, ValueError):
            raise ModelDirError(f"{where} has a malformed 'image' entry {image!r}; re-export it.") from None


@dataclass(frozen=True)
class Point:
    """One profile point in user terms: images per call and image size in pixels."""

    batch: int
    height: int
    width: int


def parse_shape(text: str | None, option: str = "--opt") -> dict[str, int]:
    """'batch=2,height=512,width=768' (or 'size=512') -> {'batch': 2, 'height': 512, 'width': 768}."""
    if text is None or not text.strip():
        return {}
    values: dict[str, int] = {}
    for part in text.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not key:
            raise InputError(f"{option} {text!r}: expected key=value pairs such as 'batch=2,height=512,width=512'.")
        if key not in SHAPE_KEYS:
            raise InputError(f"{option} {text!r}: unknown key {key!r}; use {', '.join(SHAPE_KEYS)}.")
        try:
            number = int(value)
        except ValueError:
            raise InputError(f"{option} {text!r}: {key}={value!r} is not a whole number.") from None
        if number < 1:
            raise InputError(f"{option} {text!r}: {key} must be >= 1, got {number}.")
        for k in (("height", "width") if key == "size" else (key,)):
            if k in values:
                raise InputError(f"{option} {text!r}: {k} is given twice.")
            values[k] = number
    return values


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def profile_points(
    geometry: Geometry, min: str | dict | None = None, opt: str | dict | None = None, max: str | dict | None = None
) -> dict[str, Point]:
    """The min/opt/max points: defaults, overridden by the user's values, checked.

    A default (not a value the user gave) widens to take in the user's values, so `--opt size=1024`
    alone works; two user values in the wrong order are an error.
    """
    given = {
        name: parse_shape(value, f"--{name}") if not isinstance(value, dict) else dict(value)
        for name, value in (("min", min), ("opt", opt), ("max", max))
    }
    for name, values in given.items():
        for key in ("height", "width"):
            if key in values and values[key] % geometry.multiple:
                raise InputError(
                    f"--{name} {key}={values[key]} is not a size this model can take: it must be a multiple of "
                    f"{geometry.multiple} (VAE factor {geometry.vae_scale_factor} x patch size {geometry.patch_size})."
                )
    points: dict[str, dict[str, int]] = {}
    for key in ("batch", "height", "width"):
        if key == "batch":
            values = dict(DEFAULT_IMAGES)
        else:
            values = {n: _round_to(geometry.default_pixels * f, geometry.multiple) for n, f in DEFAULT_SIDE.items()}
        for name in PROFILE_POINTS:
            if key in given[name]:
                values[name] = given[name][key]
        user = {n for n in PROFILE_POINTS if key in given[n]}
        # widen defaults around the user's values: min <= opt <= max
        if "opt" not in user:
            lo = values["min"] if "min" in user else None
            hi = values["max"] if "max" in user else None
            if lo is not None and values["opt"] < lo:
                values["opt"] = lo
            if hi is not None and values["opt"] > hi:
                values["opt"] = hi
        if "min" not in user:
            values["min"] = _min(values["min"], values["opt"])
        if "max" not in user:
            values["max"] = _max(values["max"], values["opt"])
        for lo, hi in (("min", "max"), ("min", "opt"), ("opt", "max")):
            if values[lo] > values[hi]:
                raise InputError(
                    f"{key}: --{lo} {values[lo]} is larger than --{hi} {values[hi]}; a profile needs min <= opt <= max."
                )
        for name in PROFILE_POINTS:
            points.setdefault(name, {})[key] = values[name]
    return {name: Point(**points[name]) for name in PROFILE_POINTS}


def _min(a: int, b: int) -> int:
    return a if a <= b else b


def _max(a: int, b: int) -> int:
    return a if a >= b else b


def _resolve(dim, env: Mapping[str, int]) -> int:
    """A manifest dim -> its size: an int, a symbol, or 'symbol*k'."""
    if isinstance(dim, int):
        return dim
    symbol, _, factor = str(dim).partition("*")
    if symbol not in env:
        raise ModelDirError(f"the manifest has a dim {dim!r} that no profile value gives; re-export it.")
    return env[symbol] * (int(factor) if factor else 1)


def component_profile(
    name: str, entry: dict, points: Mapping[str, Point], geometry: Geometry
) -> dict[str, dict[str, list[int]]]:
    """{input name: {'min': shape, 'opt': shape, 'max': shape}} for one manifest component entry."""
    profile: dict[str, dict[str, list[int]]] = {}
    for tensor in entry["inputs"]:
        shapes = {}
        for point_name, point in points.items():
            batch = point.batch
            if name in CFG_BATCHED and point_name != "min":
                batch *= 2
            env = {"batch": batch, "height": point.height // geometry.vae_scale_factor,
                   "width": point.width // geometry.vae_scale_factor}
            shapes[point_name] = [_resolve(d, env) for d in tensor["dims"]]
        profile[tensor["name"]] = shapes
    return profile


def manifest_profiles(
    manifest: dict,
    min: str | dict | None = None,
    opt: str | dict | None = None,
    max: str | dict | None = None,
    geometry: Geometry | None = None,
) -> dict[str, dict[str, dict[str, list[int]]]]:
    """{component: {input: {'min'|'opt'|'max': shape}}} for every component of an export manifest.

    A static export (`ldm-rt export --static`) has exactly one shape per input: its profile is
    min = opt = max at that shape, and overrides are an error.
    """
    geometry = geometry or Geometry.from_manifest(manifest)
    static = manifest.get("static")
    if static:
        if any(v for v in (min, opt, max)):
            raise InputError(
                f"this ONNX export is static (batch {static['batch']}, {static['height']}x{static['width']} px); "
                "--min/--opt/--max need a dynamic export (`ldm-rt export` without --static)."
            )
        point = Point(int(static["batch"]), int(static["height"]), int(static["width"]))
        # A static export ran every component at the same batch (no CFG doubling): see export_model.
        return {
            name: component_profile("static", entry, {p: point for p in PROFILE_POINTS}, geometry)
            for name, entry in manifest["components"].items()
        }
    points = profile_points(geometry, min, opt, max)
    return {name: component_profile(name, entry, points, geometry) for name, entry in manifest["components"].items()}


def shape_in_profile(profile: Mapping[str, Mapping[str, list[int]]], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """None when every input shape lies inside its min..max range, else one line naming the first that does not."""
    for name, shape in shapes.items():
        bounds = profile.get(name)
        if bounds is None:
            return f"input {name} is not in the engine's profile ({', '.join(profile)})"
        lo, hi = list(bounds["min"]), list(bounds["max"])
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return f"input {name} has shape {tuple(shape)}, outside the engine's profile {tuple(lo)}..{tuple(hi)}"
    return None


# -- engine files, metadata, staleness ---------------------------------------------------------


def engine_path(out_dir: str | Path, component: str, precision: str) -> Path:
    """<out_dir>/<component>.<precision>.engine, e.g. transformer.fp16.engine."""
    if precision not in MODES:
        raise InputError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(MODES)}.")
    return Path(out_dir) / f"{component}.{precision}.engine"


def metadata_path(engine: Path) -> Path:
    """The JSON written next to an engine: <engine>.json."""
    return engine.with_name(engine.name + ".json")


@dataclass(frozen=True)
class SystemFacts:
    """What an engine is tied to: the TensorRT version and the GPU (name and compute capability)."""

    tensorrt: str
    gpu: str
    compute_capability: str  # "9.0"


def import_tensorrt():
    """`import tensorrt`, or one sentence naming the extra."""
    return require("tensorrt", "tensorrt", "building and running TensorRT engines")


def current_system(device_index: int | None = None) -> SystemFacts:
    """The running system's facts (needs tensorrt and a CUDA GPU)."""
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise InputError("TensorRT engines are built and run on an NVIDIA GPU, and torch sees no CUDA GPU here.")
    index = torch.cuda.current_device() if device_index is None else device_index
    major, minor = torch.cuda.get_device_capability(index)
    return SystemFacts(trt.__version__, torch.cuda.get_device_name(index), f"{major}.{minor}")


@dataclass(frozen=True)
class EngineMeta:
    """The sidecar JSON of one engine: what it was built from, with what, and for which system."""

    component: str
    precision: str  # one of MODES
    tensorrt: str
    gpu: str
    compute_capability: str
    onnx_file: str
    onnx_sha256: str
    profiles: dict  # {input: {'min'|'opt'|'max': [dims]}}
    workspace_gb: float | None = None
    engine_bytes: int | None = None
    ldm_rt: str = __version__
    format: int = ENGINE_FORMAT
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> EngineMeta:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def write_metadata(engine: Path, meta: EngineMeta) -> Path:
    path = metadata_path(engine)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(meta.to_json())
    os.replace(tmp, path)
    return path


def read_metadata(engine: Path) -> EngineMeta | None:
    """The metadata next to `engine`, or None when it is missing, unreadable or of another format."""
    try:
        data = json.loads(metadata_path(engine).read_text())
        if not isinstance(data, dict) or data.get("format") != ENGINE_FORMAT:
            return None
        return EngineMeta.from_dict(data)
    except (OSError, ValueError, TypeError):
        return None


def _first_profile_difference(old: dict, new: dict) -> str:
    for name in sorted(set(old) | set(new)):
        if name not in old or name not in new:
            return f"input {name} {'added' if name in new else 'removed'}"
        for point in PROFILE_POINTS:
            a, b = old[name].get(point), new[name].get(point)
            if list(a or []) != list(b or []):
                return f"{name} {point} {tuple(a or ())} -> {tuple(b or ())}"
    return "none"


def compare_metadata(old: EngineMeta, new: EngineMeta) -> str | None:
    """None when an engine built as `old` serves the request `new`, else one line saying why not."""
    reasons = []
    built, this = [], []  # "built with TensorRT 10.3.0 for compute capability 8.0 (A100), this is ..."
    if old.tensorrt != new.tensorrt:
        built.append(f"with TensorRT {old.tensorrt}")
        this.append(f"TensorRT {new.tensorrt}")
    if old.compute_capability != new.compute_capability:
        built.append(f"for compute capability {old.compute_capability} ({old.gpu})")
        this.append(f"compute capability {new.compute_capability} ({new.gpu})")
    elif old.gpu != new.gpu:  # same architecture, another GPU model: tactics were timed on the other one
        built.append(f"on {old.gpu}")
        this.append(new.gpu)
    if built:
        reasons.append(f"built {' '.join(built)}, this is {' on '.join(this)}")
    if old.onnx_sha256 != new.onnx_sha256:
        reasons.append(f"{new.onnx_file} changed since the build (sha256 {old.onnx_sha256[:12]} -> {new.onnx_sha256[:12]})")
    if old.precision != new.precision:
        reasons.append(f"built as {old.precision}, {new.precision} is asked for")
    if old.profiles != new.profiles:
        reasons.append(f"other optimisation profiles asked for ({_first_profile_difference(old.profiles, new.profiles)})")
    if old.component != new.component:
        reasons.append(f"built for {old.component}, not {new.component}")
    return "; ".join(reasons) or None


def stale_reason(engine: Path, wanted: EngineMeta) -> str | None:
    """None when `engine` exists and was built for exactly `wanted`, else one line saying why not."""
    if not engine.is_file():
        return "no engine yet"
    old = read_metadata(engine)
    if old is None:
        return f"its metadata {metadata_path(engine).name} is missing or unreadable"
    size = engine.stat().st_size
    if old.engine_bytes is not None and old.engine_bytes != size:
        return f"the engine file ({size} bytes) is not the one its metadata describes ({old.engine_bytes} bytes)"
    return compare_metadata(old, wanted)


def onnx_sha256(onnx_file: Path, external_data: Path | None = None) -> str:
    """sha256 of the graph file and its external-data file (what the engine is built from)."""
    h = hashlib.sha256()
    for path in (onnx_file, external_data):
        if path is None:
            continue
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


# -- building ----------------------------------------------------------------------------------

Builder = Callable[..., None]  # (onnx_path, engine_path, *, precision, profiles, timing_cache, workspace_gb, log)


def build_engines(
    onnx_dir: str | Path,
    out_dir: str | Path | None = None,
    precision: str = "fp32",
    min: str | dict | None = None,
    opt: str | dict | None = None,
    max: str | dict | None = None,
    timing_cache: str | Path | None = None,
    workspace_gb: float | None = None,
    components: list[str] | None = None,
    *,
    geometry: Geometry | None = None,
    system: SystemFacts | None = None,
    builder: Builder | None = None,
    log: Callable[[str], None] = _log,
) -> dict[str, Path]:
    """Build one engine per exported component into `out_dir` (default: `onnx_dir`); reuse fresh ones.

    An engine is rebuilt only when it is missing or stale (other TensorRT version, GPU, ONNX
    file, precision or profiles), with one line saying why. `system` and `builder` default to
    the running system and `build_engine`; tests pass stand-ins. Returns {component: engine path}.
    """
    onnx_dir = Path(onnx_dir).expanduser()
    out_dir = Path(out_dir).expanduser() if out_dir is not None else onnx_dir
    if precision not in MODES:
        raise InputError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(MODES)}.")
    if workspace_gb is not None and not workspace_gb > 0:
        raise InputError(f"--workspace {workspace_gb} must be a positive number of GiB.")
    timing_cache = Path(timing_cache).expanduser() if timing_cache is not None else None
    if timing_cache is not None and timing_cache.exists() and not timing_cache.is_file():
        raise InputError(f"--timing-cache {timing_cache} is not a file; give a file path (it is created if missing).")
    manifest = read_manifest(onnx_dir, f"`ldm-rt export --model all --model-dir MODEL_DIR --out {onnx_dir}`")
    geometry = geometry or Geometry.from_manifest(manifest, str(onnx_dir / MANIFEST))
    profiles = manifest_profiles(manifest, min, opt, max, geometry)
    names = list(components) if components is not None else list(manifest["components"])
    missing = [n for n in names if n not in manifest["components"]]
    if missing:
        raise ModelDirError(
            f"{onnx_dir / MANIFEST} has no {', '.join(missing)} (it has {', '.join(manifest['components'])}); "
            "export it first."
        )
    graphs = {}
    for name in names:
        entry = manifest["components"][name]
        graph = onnx_dir / entry["file"]
        data = onnx_dir / entry["external_data"] if entry.get("external_data") else None
        for path in (graph, data):
            if path is not None and not path.is_file():
                raise ModelDirError(f"{onnx_dir / MANIFEST} lists {path.name}, which is missing; re-export into {onnx_dir}.")
        graphs[name] = (graph, data)
    system = system or current_system()
    writable_dir(out_dir)
    build = builder or build_engine

    engines: dict[str, Path] = {}
    for name in names:
        graph, data = graphs[name]
        engine = engine_path(out_dir, name, precision)
        wanted = EngineMeta(
            component=name, precision=precision, tensorrt=system.tensorrt, gpu=system.gpu,
            compute_capability=system.compute_capability, onnx_file=graph.name,
            onnx_sha256=onnx_sha256(graph, data), profiles=profiles[name], workspace_gb=workspace_gb,
        )
        reason = stale_reason(engine, wanted)
        if reason is None:
            log(f"{name}: reusing {engine} (TensorRT {system.tensorrt}, {system.gpu}, {precision})")
            engines[name] = engine
            continue
        log(f"{name}: {reason}; {'re' if engine.is_file() else ''}building {engine}")
        metadata_path(engine).unlink(missing_ok=True)  # a failed build leaves no engine that looks fresh
        tmp = engine.with_name(engine.name + ".tmp")
        tmp.unlink(missing_ok=True)
        build(graph, tmp, precision=precision, profiles=profiles[name], timing_cache=timing_cache,
              workspace_gb=workspace_gb, log=log)
        if not tmp.is_file():
            raise LdmRtError(f"building {engine} produced no engine file.")
        os.replace(tmp, engine)
        write_metadata(engine, EngineMeta(**{**asdict(wanted), "engine_bytes": engine.stat().st_size}))
        engines[name] = engine
    return engines


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    precision: str,
    profiles: dict,
    timing_cache: Path | None = None,
    workspace_gb: float | None = None,
    log: Callable[[str], None] = _log,
) -> None:
    """Build one engine with the TensorRT 10 Python API and write it to `engine_path`.

    Not run in this workplace (TensorRT cannot be installed here); each call is the one the
    TensorRT 10 Python API documents (see the README's TensorRT section).
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; STRONGLY_TYPED takes every tensor's type
    # from the ONNX graph (an fp16/bf16 export) instead of letting FP16/BF16 flags choose.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if precision == "strongly-typed" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # the path form also reads <file>.onnx.data
        errors = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise LdmRtError(f"TensorRT could not parse {onnx_path}: {errors[0] if errors else 'no reason given'}{more}")
    inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if inputs != sorted(profiles):
        raise ModelDirError(f"{onnx_path} takes inputs {inputs}, its manifest declares {sorted(profiles)}; re-export it.")

    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if precision in ("fp16", "bf16") and not hasattr(trt.BuilderFlag, precision.upper()):
        # TensorRT 11 dropped weak typing (BuilderFlag.FP16/BF16); only strongly typed networks remain.
        raise InputError(
            f"TensorRT {trt.__version__} has no {precision.upper()} builder flag; export with "
            f"`ldm-rt export --dtype {precision}` and build with --strongly-typed."
        )
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision == "fp32":
        # TF32 is on by default in TensorRT; its 10-bit mantissa would break the fp32 tolerance
        # (rel-L2 1e-5, ldm_rt/parity.py), so an fp32 engine computes in true fp32.
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        if cache is None or config.set_timing_cache(cache, ignore_mismatch=False) is False:
            log(f"timing cache {timing_cache} is not for this TensorRT version or GPU; starting a new one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LdmRtError(f"TensorRT could not build an engine from {onnx_path}; its log lines above say why.")
    with open(engine_path, "wb") as f:
        f.write(serialized)
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        with open(timing_cache, "wb") as f:
            f.write(memoryview(config.get_timing_cache().serialize()))


# -- polygraphy comparison ---------------------------------------------------------------------


@dataclass(frozen=True)
class PolygraphyRow:
    """One output of one component: polygraphy's max-abs verdict and the shared table's errors."""

    output: str
    polygraphy_passed: bool  # polygraphy Comparator, check_error_stat='max', atol = the table's max-abs
    comparison: object  # ldm_rt.parity.Comparison: rel-L2, max-abs, finite, tolerance

    @property
    def passed(self) -> bool:
        return self.polygraphy_passed and self.comparison.passed


def compare_with_polygraphy(
    outputs: Mapping[str, object], reference: Mapping[str, object], component: str, dtype: str,
    runner: str = "tensorrt",
) -> list[PolygraphyRow]:
    """Compare engine outputs with reference outputs (torch tensors or arrays, by output name).

    polygraphy's `Comparator.compare_accuracy` checks each output's max-abs error against the
    tolerance table's max-abs bound (`ldm_rt.parity.TOLERANCES[(component, dtype)]`); the
    table's rel-L2 bound and the NaN/Inf rule are checked by `ldm_rt.parity.compare`. A row
    passes when both do. `component` is the parity key (text_encoder, transformer, vae).
    """
    try:
        from polygraphy.comparator import Comparator, RunResults
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise MissingDependencyError(
            "the polygraphy comparison needs the 'polygraphy' package, which is not installed: "
            "pip install 'ldm-rt[tensorrt]'"
        ) from None
    import torch

    from ldm_rt import parity

    try:
        from polygraphy.comparator import SimpleCompareFunc  # polygraphy >= 0.50
    except ImportError:  # older polygraphy: the same function behind CompareFunc.simple
        from polygraphy.comparator import CompareFunc

        SimpleCompareFunc = CompareFunc.simple
    tolerance = parity.TOLERANCES[(component, dtype)]
    if set(outputs) != set(reference):
        raise InputError(f"{runner} outputs {sorted(outputs)} do not match the reference outputs {sorted(reference)}.")
    rows = []
    for name in reference:
        out = torch.as_tensor(outputs[name]).detach().float().cpu()
        ref = torch.as_tensor(reference[name]).detach().float().cpu()
        if out.shape != ref.shape:
            raise InputError(f"{component} output {name}: {runner} shape {tuple(out.shape)} != reference {tuple(ref.shape)}.")
        results = RunResults()
        results.add([{name: out.numpy()}], runner_name=runner)
        results.add([{name: ref.numpy()}], runner_name="reference")
        func = SimpleCompareFunc(check_error_stat="max", atol=tolerance.max_abs, rtol=0.0)
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            verdict = bool(Comparator.compare_accuracy(results, compare_func=func))
        rows.append(PolygraphyRow(name, verdict, parity.compare(out, ref, component, dtype)))
    return rows
