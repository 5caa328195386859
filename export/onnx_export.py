"""ONNX export of the reference modules: one .onnx per component plus manifest.json.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript; the default since
torch 2.9, and the only one that still runs in torch 2.13). Dynamic axes come from the
component specs (`export/specs.py`) as `torch.export.Dim`s; a DiT latent axis is declared as
`patch_size * Dim(...)` so torch.export proves every exported size is patchifiable.

Files are cached by content (STYLE.md principle 7): each component's manifest entry carries a
sha256 of its config, weights, the export options and the exporter versions; a re-export with
the same key reuses the file (one line says so), a different key rebuilds it (one line says why).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ldm_rt import __version__, ops
from ldm_rt.errors import InputError, LdmRtError, require
from ldm_rt.export.specs import COMPONENT_NAMES, ComponentSpec, component_specs
from ldm_rt.model_dir import writable_dir

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
EXPORTER = "torch.onnx.export(dynamo=True)"
# protobuf cannot serialise a message over 2 GiB; bigger graphs keep their weights in <file>.data.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3
SUPPORTED_DTYPES = ("fp32", "fp16", "bf16")
# ONNX Conv takes bfloat16 only from opset 22 (Conv-22); below it a bf16 graph fails type checks.
BF16_MIN_OPSET = 22
# The dynamo exporter writes opset 18 and up natively; below 18 torch hands the graph to the onnx
# version converter, best effort. Measured (torch 2.13, onnxscript 0.7.2, onnx 1.23, tiny model):
# --opset 16/17 left the DiT at 18, --opset 5/13/14 left everything at 18 after an onnxscript
# traceback. So 18 is the lowest opset we promise; the highest is the installed onnx's.
MIN_OPSET = 18


def max_opset() -> int:
    import onnx

    return onnx.defs.onnx_opset_version()


def check_opset(opset: int | None) -> None:
    if opset is None:
        return
    high = max_opset()
    if not MIN_OPSET <= opset <= high:
        raise InputError(f"--opset {opset} is outside what the exporter writes: {MIN_OPSET} to {high} (the installed "
                         f"onnx's newest); leave --opset out for the exporter's default.")


@dataclass(frozen=True)
class StaticShape:
    """A fully static export: batch and image size in pixels."""

    batch: int
    height: int
    width: int


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sha256_module(h, module: nn.Module) -> None:
    h.update(json.dumps(module.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def component_digests(components) -> dict[str, str]:
    """sha256 of each component's config and weights. Hashing reads every weight (seconds for a
    2.7 GB DiT-XL/2), so callers compute this once and pass it on."""
    digests = {}
    for name, module in components.modules().items():
        h = hashlib.sha256()
        _sha256_module(h, module)
        digests[name] = h.hexdigest()
    return digests


def source_hash(components, digests: dict[str, str] | None = None) -> str:
    """sha256 of the three components' configs and weights: what an export is made from."""
    digests = digests or component_digests(components)
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def _versions() -> dict[str, str]:
    import onnx
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "ldm_rt": __version__}


def _component_key(digest: str, spec: ComponentSpec, options: dict) -> str:
    h = hashlib.sha256(digest.encode())
    h.update(json.dumps({"spec": _spec_dict(spec), "options": options, "format": MANIFEST_FORMAT},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def _spec_dict(spec: ComponentSpec) -> dict:
    def tensors(ts):
        return [{"name": t.name, "dtype": t.dtype_name, "dims": list(t.dims)} for t in ts]

    entry = {
        "inputs": tensors(spec.inputs),
        "outputs": tensors(spec.outputs),
        "dynamic_axes": {t.name: t.dynamic_axes for t in spec.inputs + spec.outputs if t.dynamic_axes},
        "multiple_of": dict(spec.multiple_of),
    }
    # TensorRT profile rules, where the spec declares them (absent: the manifest and the file
    # hashes of the graphs that declare none stay as they were)
    if spec.profile_dims or spec.profile_batch is not None:
        entry["profile"] = {"dims": {k: dict(v) for k, v in spec.profile_dims.items()},
                            "batch": None if spec.profile_batch is None else list(spec.profile_batch)}
    return entry


def _dynamic_shapes(spec: ComponentSpec, static: bool) -> tuple | None:
    """torch.export Dims for the spec's symbolic input dims (one Dim object per symbol)."""
    if static:
        return None
    from torch.export import Dim

    dims: dict[str, object] = {}
    for name in dict.fromkeys(d for t in spec.inputs for d in t.dims if isinstance(d, str)):
        k = spec.multiple_of.get(name, 1)
        dims[name] = k * Dim(f"{name}_div{k}", min=1, max=8192) if k > 1 else Dim(name, min=1, max=8192)
    return tuple({i: dims[d] for i, d in t.dynamic_axes.items()} or None for t in spec.inputs)


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's warnings and its 'torchvision is not installed' log lines."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _module_in(spec: ComponentSpec, parts) -> nn.Module:
    """The component's module in the spec's dtype; a cast works on a copy, never on `parts`."""
    module = spec.module(parts).eval()
    if any(p.dtype != spec.dtype for p in module.parameters() if p.is_floating_point()):
        module = copy.deepcopy(module)
        module = spec.cast(module, spec.dtype) if spec.cast is not None else module.to(spec.dtype)
    return module


def check_static(config, static: StaticShape) -> tuple[int, int]:
    """Image size in pixels -> latent size, or an InputError naming the multiple it must be (the
    family's `size_multiple`: VAE factor x patch size for a DiT, x 2 for FLUX.1's 2x2 packing)."""
    from ldm_rt import families

    f = config.vae.scale_factor
    multiple = families.for_config(config).size_multiple(config)
    if static.batch < 1:
        raise InputError(f"--batch {static.batch} must be >= 1.")
    p = config.transformer.patch_size
    why = f"VAE factor {f} x patch size {p}" if multiple == f * p else f"VAE factor {f} x {multiple // f} latents"
    for name, value in (("height", static.height), ("width", static.width)):
        if value < multiple or value % multiple:
            raise InputError(
                f"--{name} {value} is not a size this model can take: it must be a positive multiple of "
                f"{multiple} ({why})."
            )
    return static.height // f, static.width // f


def image_geometry(config) -> dict:
    """The manifest's image entry: what TensorRT profiles (export/tensorrt.py) turn pixel sizes into
    latent sizes with, asked of the model's family (a FLUX.1 transformer has no sample_size)."""
    from ldm_rt import families

    family = families.for_config(config)
    f = config.vae.scale_factor
    return {"vae_scale_factor": f, "patch_size": config.transformer.patch_size,
            "sample_size": family.default_size(config) // f,  # the default latent side
            "size_multiple": family.size_multiple(config)}  # image sides are multiples of this (pixels)


def read_manifest(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _initializer_bytes(program) -> int:
    total = 0
    for value in program.model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def export_model(
    model_dir_or_components,
    out_dir: str | Path,
    components: Iterable[str] | None = None,
    dtype: str = "fp32",
    opset: int | None = None,
    static: StaticShape | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    log: Callable[[str], None] = _log,
    digests: dict[str, str] | None = None,
) -> dict:
    """Export the chosen components (None: every graph the model's family declares, e.g. FLUX.1's
    text_encoder, text_encoder_2, transformer, vae_decoder) into `out_dir`; returns the manifest
    written there.

    `digests` (from `component_digests`) saves re-hashing the weights when the caller has them.
    """
    require("onnx", "export", "ONNX export")
    require("onnxscript", "export", "ONNX export")
    import onnx

    from ldm_rt.model_dir import load_model_dir

    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"--dtype {dtype} is not an export precision; use one of {', '.join(SUPPORTED_DTYPES)}.")
    check_opset(opset)
    if dtype == "bf16":
        if opset is not None and opset < BF16_MIN_OPSET:
            raise InputError(f"--opset {opset} cannot hold a bf16 graph (ONNX Conv takes bfloat16 from opset "
                             f"{BF16_MIN_OPSET}); use --opset {BF16_MIN_OPSET} or leave it out.")
        opset = BF16_MIN_OPSET if opset is None else opset
    names = None if components is None else list(dict.fromkeys(components))
    if names is not None and not names:
        raise InputError(f"no component to export; choose from {', '.join(COMPONENT_NAMES)}.")
    parts = (
        load_model_dir(model_dir_or_components)
        if isinstance(model_dir_or_components, (str, os.PathLike))
        else model_dir_or_components
    )
    out_dir = Path(out_dir).expanduser()
    specs = component_specs(parts.config, dtype)  # the graphs the model's family declares
    names = list(specs) if names is None else names
    unknown = [n for n in names if n not in specs and n not in COMPONENT_NAMES]
    if unknown:
        raise InputError(f"unknown component(s) {unknown}; choose from {', '.join(specs)}.")
    absent = [n for n in names if n not in specs]  # the text encoder of a class-conditional DiT
    names = [n for n in names if n in specs]
    if not names:
        raise InputError(f"this model has no {', '.join(absent)} graph; it exports {', '.join(specs)}.")
    if static is not None:
        latent_hw = check_static(parts.config, static)
        for name in names:  # a static graph fixes every dim from batch and image size: a text length is none
            fixed = [d for d, rule in specs[name].profile_dims.items() if "grid" not in rule]
            if fixed:
                raise InputError(f"--static cannot fix the {', '.join(fixed)} axis of {name} (no image size gives it); "
                                 "export this model without --static.")
    writable_dir(out_dir)

    versions = _versions()
    digests = digests or component_digests(parts)
    source = source_hash(parts, digests)
    options = {"dtype": dtype, "opset": opset, "static": None if static is None else static.__dict__,
               "exporter": EXPORTER, **versions}
    previous = read_manifest(out_dir) or {}
    entries: dict = {}
    if previous.get("format") == MANIFEST_FORMAT and previous.get("options") == options:
        entries = {n: e for n, e in previous.get("components", {}).items()
                   if n in specs and (out_dir / e["file"]).is_file()}
    elif previous.get("components"):
        log(f"{out_dir}: manifest was written with other export options or versions; starting a new one.")
    for name in [n for n in entries if n not in names]:  # listed, not exported now: still current?
        if entries[name].get("sha256") != _component_key(digests[specs[name].source_module], specs[name], options):
            log(f"{name}: dropped from the manifest, its config or weights changed; re-export it.")
            del entries[name]

    for index, name in enumerate(names, 1):
        spec = specs[name]
        module = _module_in(spec, parts)
        key = _component_key(digests[spec.source_module], spec, options)
        path = out_dir / f"{name}.onnx"
        old = entries.get(name)
        if old is not None and old.get("sha256") == key and path.is_file():
            log(f"{name}: reusing {path} (hash {key[:12]} unchanged)")
            continue
        if old is not None:
            log(f"{name}: re-exporting {path} (hash {old.get('sha256', '?')[:12]} -> {key[:12]})")
        # The export takes seconds (tiny) to minutes (DiT-XL/2) with no output of its own: say what runs.
        log(f"{name}: exporting ({index}/{len(names)}, {sum(p.numel() for p in module.parameters()) / 1e6:.1f} M "
            f"parameters, {dtype}) ...")
        start = time.perf_counter()
        if static is not None:
            h, w = latent_hw if spec.latent else (0, 0)
            args = spec.sample_inputs(static.batch, h, w)
        else:
            # An odd, non-square sample (batch 2, 3x2 patches) so no dynamic dim is specialised
            # to 1 or to another dim's size by torch.export.
            p = specs["transformer"].multiple_of.get("height", 1)
            args = spec.sample_inputs(2, 3 * p, 2 * p)
        # fp16/bf16: attention through the reference `ops.attention` (scores and softmax in fp32),
        # not SDPA, whose exported softmax runs in the input dtype; norms are fp32 in the modules.
        low = spec.dtype != torch.float32
        with _quiet(), torch.no_grad(), ops.use(attention=ops.attention) if low else contextlib.nullcontext():
            try:
                program = torch.onnx.export(
                    module, args, None, dynamo=True, input_names=spec.input_names,
                    output_names=spec.output_names, dynamic_shapes=_dynamic_shapes(spec, static is not None),
                    opset_version=opset, optimize=True, verbose=False, report=False,
                )
            except LdmRtError:
                raise
            except Exception as exc:  # the exporter's own errors are long; keep the first line
                raise LdmRtError(f"exporting {name} failed: {str(exc).strip().splitlines()[0]}") from exc
        external = _initializer_bytes(program) > external_data_threshold
        data_path = path.with_name(path.name + ".data")
        for stale in (path, data_path):
            stale.unlink(missing_ok=True)
        program.save(str(path), external_data=external)
        # The path form works for graphs with external data; full_check adds strict type and shape
        # inference, which catches ops the opset does not define for a dtype (bf16 Conv below opset 22).
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:
            raise LdmRtError(f"{path} fails onnx.checker: {str(exc).strip().splitlines()[0]}") from exc
        # The opset the file holds, read back: the manifest records what was written, not what was asked.
        opset_used = next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                          if o.domain in ("", "ai.onnx"))
        if opset is not None and opset_used != opset:
            path.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
            raise LdmRtError(f"exporting {name} at --opset {opset} wrote opset {opset_used} instead; leave --opset out "
                             f"or pick one from {MIN_OPSET} to {max_opset()}.")
        entries[name] = {
            "file": path.name,
            "external_data": data_path.name if external else None,
            "sha256": key,
            "opset": opset_used,
            "static": options["static"],  # None: dynamic axes as listed
            "parity_key": spec.parity_key,
            **_spec_dict(spec),
        }
        size = path.stat().st_size + (data_path.stat().st_size if external else 0)
        log(f"{name}: exported {path} ({size / 1e6:.1f} MB{', external data' if external else ''}) "
            f"in {time.perf_counter() - start:.1f} s")

    manifest = {
        "format": MANIFEST_FORMAT,
        "options": options,
        "exporter": EXPORTER,
        "versions": versions,
        "dtype": dtype,
        "opset": max((e["opset"] for e in entries.values()), default=None),  # as written (read back)
        "static": None if static is None else static.__dict__,
        "source_sha256": source,
        # Image geometry: TensorRT profiles (export/tensorrt.py) turn pixel sizes into latent sizes with it.
        "image": image_geometry(parts.config),
        "sha256": hashlib.sha256(json.dumps(
            {n: e["sha256"] for n, e in sorted(entries.items())}).encode()).hexdigest(),
        "components": dict(sorted(entries.items())),
    }
    if manifest != previous:
        (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
