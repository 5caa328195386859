"""TensorRT engine build (TensorRT >= 10 Python API), installed as `ldm_rt.export.tensorrt`.

What lives here, and what of it needs libnvinfer:

- optimisation profiles (min/opt/max per input) made from the export manifest, i.e. from the
  component specs (`export/specs.py`), with user overrides: pure, tested on CPU;
- engine file names, the JSON metadata written next to each engine, and the staleness check
  that compares it with the running system: pure, tested on CPU;
- `build_engines`: rebuilds only missing or stale engines, with one line saying why. The
  decision is pure (tested with a stand-in builder); the default builder, `build_engine`, calls
  TensorRT;
- `build_plan`: how one graph is built, as pure code: always a strongly typed network (every
  tensor's type comes from the ONNX graph, so an fp16/bf16 engine is built from an
  `ldm-rt export --dtype fp16|bf16` graph, whose norm statistics and softmax are fp32 in the
  graph), no precision builder flags, and TF32 cleared for fp32 graphs. Tested on CPU for
  TensorRT 10- and 11-shaped modules;
- `build_engine`: Builder, network, OnnxParser.parse_from_file, the plan's flags, workspace pool
  limit, timing cache, build_serialized_network. Written against the TensorRT 10 and 11 Python
  APIs (every name it uses is in `TENSORRT_API`, checked against the real bindings of TensorRT
  10.13.3.9 and 11.4.0.106) and NOT run in this workplace: TensorRT cannot be installed here;
- `compare_with_polygraphy`: polygraphy's Comparator on engine outputs against reference
  outputs (for `ldm-rt parity --backend tensorrt`); needs polygraphy only, tested on CPU.

`tensorrt` and `polygraphy` are imported inside functions, never at module import.

Shape syntax for `--min/--opt/--max`: comma-separated `key=value` pairs, keys
`batch` (images per call), `height` and `width` (image pixels, as in `ldm-rt run`) and `size`
(height and width at once), e.g. `batch=2,height=512,width=768` or `size=256`. Keys left out
keep their defaults. The text encoder and the DiT run on the classifier-free-guidance batch
(unconditional + conditional halves, see `Pipeline.generate`), so their `opt` and `max` batch
is twice the image batch; `min` stays the image batch, so a run without guidance fits too.
A family declares other rules in its specs (`ComponentSpec.profile_dims` / `profile_batch`, in
the manifest's `profile` entries): FLUX.1's image tokens from the latent grid, its T5 text
length, one row per image (two at max). The geometry (default side, size multiple) is the
family's, written into the manifest's `image` entry by `ldm-rt export`.
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
# An engine's precision is its ONNX graph's: TensorRT 11 removed weak typing (BuilderFlag.FP16 and
# BF16 are gone; every network is strongly typed), and ldm-rt builds strongly typed on 10 too.
MODES = ("fp32", "fp16", "bf16")
# TensorRT releases the build and run code is written for (see `TENSORRT_API`).
TENSORRT_MAJORS = (10, 11)
# Every TensorRT name ldm-rt uses, by class ("" is the module). tests/test_tensorrt.py checks
# that the code names nothing outside this table, and, where the real Python bindings can be
# imported (`../shared/tools/trt-bindings.sh`), that each name exists in them; checked against
# tensorrt-cu12-bindings 10.13.3.9 and 11.4.0.106.
TENSORRT_API: dict[str, tuple[str, ...]] = {
    "": ("__version__", "Logger", "Builder", "NetworkDefinitionCreationFlag", "OnnxParser", "MemoryPoolType",
         "BuilderFlag", "Runtime", "TensorIOMode", "DataType", "INetworkDefinition", "ITensor",
         "IBuilderConfig", "IOptimizationProfile", "ITimingCache", "ICudaEngine", "IExecutionContext"),
    "Logger": ("WARNING",),
    "Builder": ("create_network", "create_builder_config", "create_optimization_profile",
                "build_serialized_network"),
    "NetworkDefinitionCreationFlag": ("STRONGLY_TYPED",),
    "INetworkDefinition": ("get_input", "num_inputs"),
    "ITensor": ("name",),
    "OnnxParser": ("parse_from_file", "get_error", "num_errors"),
    "IBuilderConfig": ("set_memory_pool_limit", "set_flag", "clear_flag", "add_optimization_profile",
                       "create_timing_cache", "set_timing_cache", "get_timing_cache"),
    "MemoryPoolType": ("WORKSPACE",),
    "BuilderFlag": ("TF32",),
    "IOptimizationProfile": ("set_shape",),
    "ITimingCache": ("serialize",),
    "Runtime": ("deserialize_cuda_engine",),
    "ICudaEngine": ("create_execution_context", "num_io_tensors", "get_tensor_name", "get_tensor_mode",
                    "get_tensor_dtype", "get_tensor_profile_shape"),
    "TensorIOMode": ("INPUT", "OUTPUT"),
    "IExecutionContext": ("set_input_shape", "set_tensor_address", "get_tensor_shape", "execute_async_v3"),
    "DataType": ("FLOAT", "HALF", "BF16", "INT64", "INT32", "INT8", "UINT8", "BOOL"),
}
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
    size_multiple: int | None = None  # pixels; None: VAE factor x patch size (FLUX.1: 16, its 2x2 packing)

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor x patch size for a DiT)."""
        return self.size_multiple or self.vae_scale_factor * self.patch_size

    @property
    def why_multiple(self) -> str:
        f, p = self.vae_scale_factor, self.patch_size
        return f"VAE factor {f} x patch size {p}" if self.multiple == f * p else f"VAE factor {f} x {self.multiple // f} latents"

    @property
    def default_pixels(self) -> int:
        return self.sample_size * self.vae_scale_factor

    @classmethod
    def from_config(cls, config) -> Geometry:
        """Asked of the model's family (its default size and size multiple), as `ldm-rt export`
        writes the manifest's image entry (`onnx_export.image_geometry`)."""
        from ldm_rt.export.onnx_export import image_geometry

        image = image_geometry(config)
        return cls(image["vae_scale_factor"], image["patch_size"], image["sample_size"], image["size_multiple"])

    @classmethod
    def from_manifest(cls, manifest: dict, where: str = "the manifest") -> Geometry:
        image = manifest.get("image")
        if not isinstance(image, dict):
            raise ModelDirError(
                f"{where} has no image geometry (it predates TensorRT support); re-export with `ldm-rt export`."
            )
        try:
            multiple = image.get("size_multiple")  # absent in manifests written before it: the DiT rule
            return cls(int(image["vae_scale_factor"]), int(image["patch_size"]), int(image["sample_size"]),
                       None if multiple is None else int(multiple))
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
                    f"{geometry.multiple} ({geometry.why_multiple})."
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


def _dim_env(entry: dict, point_name: str, point: Point, geometry: Geometry, rows: int, static: bool) -> dict[str, int]:
    """The sizes of one manifest entry's symbolic dims at one profile point: batch (images x
    `rows`), latent height/width, and the entry's declared dims (`ComponentSpec.profile_dims`)."""
    f = geometry.vae_scale_factor
    env = {"batch": point.batch * rows, "height": point.height // f, "width": point.width // f}
    for symbol, rule in (entry.get("profile") or {}).get("dims", {}).items():
        if "grid" in rule:  # tokens of a k x k patch grid of the latents
            k = int(rule["grid"])
            env[symbol] = (env["height"] // k) * (env["width"] // k)
        elif static:  # `export_model` refuses a static export of such a dim
            raise ModelDirError(f"the static manifest has a dim {symbol!r} no image size gives; re-export it.")
        else:
            env[symbol] = int(rule[point_name])
    return env


def _rows(name: str, entry: dict) -> dict[str, int]:
    """Rows per image at min/opt/max: the entry's `profile.batch`, else (1, 2, 2) for a DiT's
    CFG-batched graphs (`CFG_BATCHED`) and (1, 1, 1) for the others."""
    declared = (entry.get("profile") or {}).get("batch")
    rows = declared if declared is not None else ((1, 2, 2) if name in CFG_BATCHED else (1, 1, 1))
    return dict(zip(PROFILE_POINTS, (int(r) for r in rows)))


def component_profile(
    name: str, entry: dict, points: Mapping[str, Point], geometry: Geometry, static: bool = False
) -> dict[str, dict[str, list[int]]]:
    """{input name: {'min': shape, 'opt': shape, 'max': shape}} for one manifest component entry.
    `static`: every point is the export's one shape, one row per image (no CFG doubling)."""
    rows = dict.fromkeys(PROFILE_POINTS, 1) if static else _rows(name, entry)
    envs = {p: _dim_env(entry, p, point, geometry, rows[p], static) for p, point in points.items()}
    return {tensor["name"]: {p: [_resolve(d, envs[p]) for d in tensor["dims"]] for p in points}
            for tensor in entry["inputs"]}


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
            name: component_profile(name, entry, {p: point for p in PROFILE_POINTS}, geometry, static=True)
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
    precision: str | None = None,
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

    The engines' precision is the export's (`ldm-rt export --dtype`): networks are strongly typed,
    so `precision`, when given, must be that dtype (`check_precision`). An engine is rebuilt only when it is missing or stale (other TensorRT version, GPU, ONNX
    file, precision or profiles), with one line saying why. `system` and `builder` default to
    the running system and `build_engine`; tests pass stand-ins. Returns {component: engine path}.
    """
    onnx_dir = Path(onnx_dir).expanduser()
    out_dir = Path(out_dir).expanduser() if out_dir is not None else onnx_dir
    if precision is not None and precision not in MODES:
        raise InputError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(MODES)}.")
    if workspace_gb is not None and not workspace_gb > 0:
        raise InputError(f"--workspace {workspace_gb} must be a positive number of GiB.")
    timing_cache = Path(timing_cache).expanduser() if timing_cache is not None else None
    if timing_cache is not None and timing_cache.exists() and not timing_cache.is_file():
        raise InputError(f"--timing-cache {timing_cache} is not a file; give a file path (it is created if missing).")
    manifest = read_manifest(onnx_dir, f"`ldm-rt export --model all --model-dir MODEL_DIR --out {onnx_dir}`")
    geometry = geometry or Geometry.from_manifest(manifest, str(onnx_dir / MANIFEST))
    precision = check_precision(manifest, precision, onnx_dir)
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
        build(graph, tmp, precision=graph_dtype(manifest["components"][name], name), profiles=profiles[name],
              timing_cache=timing_cache, workspace_gb=workspace_gb, log=log)
        if not tmp.is_file():
            raise LdmRtError(f"building {engine} produced no engine file.")
        os.replace(tmp, engine)
        write_metadata(engine, EngineMeta(**{**asdict(wanted), "engine_bytes": engine.stat().st_size}))
        engines[name] = engine
    return engines


# ONNX tensor type names (`ldm_rt.export.specs.TensorSpec.dtype_name`) -> precision names.
_GRAPH_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def export_dtype(manifest: dict) -> str:
    """The precision an export was written in (`ldm-rt export --dtype`)."""
    dtype = manifest.get("dtype", "fp32")
    if dtype not in MODES:
        raise ModelDirError(f"the manifest's dtype {dtype!r} is not one of {', '.join(MODES)}; re-export it.")
    return dtype


def graph_dtype(entry: dict, name: str = "component") -> str:
    """The precision one exported graph computes in: the type of its floating outputs (an fp16
    export keeps a `force_upcast` VAE decoder in fp32, so this can differ from the export's)."""
    floats = {_GRAPH_DTYPES[t["dtype"]] for t in entry.get("outputs", []) if t.get("dtype") in _GRAPH_DTYPES}
    if len(floats) != 1:
        raise ModelDirError(f"the manifest entry of {name} does not give one floating output type "
                            f"({sorted(floats)}); re-export it.")
    return floats.pop()


def check_precision(manifest: dict, precision: str | None, onnx_dir: str | Path = "the ONNX directory") -> str:
    """The engines' precision: the export's dtype. Asking for another is an error that says how
    to get it, because a strongly typed network computes in its graph's own types."""
    dtype = export_dtype(manifest)
    if precision is not None and precision != dtype:
        raise InputError(
            f"{onnx_dir} holds a {dtype} export, and TensorRT engines take their precision from the graph "
            f"(strongly typed networks; TensorRT 11 has no FP16/BF16 builder flags): for {precision} engines, "
            f"export with `ldm-rt export --model all --dtype {precision} --out DIR` and build from DIR."
        )
    return dtype


def tensorrt_major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError):
        raise LdmRtError(f"cannot read the TensorRT version from {getattr(trt, '__version__', None)!r}.") from None


@dataclass(frozen=True)
class BuildPlan:
    """How one graph becomes an engine, decided without libnvinfer (`build_plan`)."""

    graph_dtype: str  # what the ONNX graph computes in: the engine's precision
    network_flags: int  # `Builder.create_network(flags)`
    set_flags: tuple[str, ...] = ()  # BuilderFlag names to set
    clear_flags: tuple[str, ...] = ()  # BuilderFlag names to clear


def build_plan(trt, graph_dtype: str) -> BuildPlan:
    """The strongly typed build of a `graph_dtype` graph with the `trt` module at hand.

    - The network is strongly typed: every tensor's type comes from the ONNX graph. TensorRT 10
      needs `NetworkDefinitionCreationFlag.STRONGLY_TYPED` for that; TensorRT 11 is strongly typed
      always and keeps the flag for compatibility, ignoring it. So the flag is passed on both.
    - No precision flag is set: TensorRT 11 has no FP16/BF16 flags, and TensorRT 10 refuses them
      on a strongly typed network.
    - fp32 graphs clear TF32, which TensorRT enables by default: its 10-bit mantissa inputs would
      break the fp32 tolerance (rel-L2 1e-5, ldm_rt/parity.py). fp16/bf16 graphs leave it as is
      (their fp32 parts are the norm statistics and softmax, not matmuls).
    """
    if graph_dtype not in MODES:
        raise InputError(f"unknown TensorRT precision {graph_dtype!r}; choose one of {', '.join(MODES)}.")
    major = tensorrt_major(trt)
    if major < min(TENSORRT_MAJORS) or not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        raise MissingDependencyError(
            f"TensorRT {trt.__version__} cannot build the strongly typed networks ldm-rt uses; it is written for "
            f"TensorRT {' and '.join(map(str, TENSORRT_MAJORS))}: pip install -U 'ldm-rt[tensorrt]'"
        )
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    clear = ("TF32",) if graph_dtype == "fp32" else ()
    return BuildPlan(graph_dtype=graph_dtype, network_flags=flags, clear_flags=clear)


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
    """Build one engine from the graph `onnx_path`, which computes in `precision`, and write it.

    Not run in this workplace (TensorRT cannot be installed here); every TensorRT name it uses is
    in `TENSORRT_API`, which a test checks against the real 10.x and 11.x Python bindings.
    """
    trt = import_tensorrt()
    plan = build_plan(trt, precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(plan.network_flags)
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
    for flag in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
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
        # polygraphy >= 0.53.4 (0.50.3, the release before it on PyPI, lacks it)
        from polygraphy.comparator import SimpleCompareFunc
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
