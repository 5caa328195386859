"""Open an existing export directory (`--onnx-dir`): check that it holds what a caller needs.

An export directory is trusted only through its `manifest.json`: the graphs must be listed there,
present on disk, in the requested precision, and exported from the same configs and weights as
the model they are run against (`source_sha256`, the hash `export_model` writes). Each failure is
one sentence that names the directory and the command that fixes it.

The manifest hash covers what the graphs were made from, not the bytes of the .onnx files: a
graph edited after export still opens here, and only `ldm-rt parity` can tell that it computes
something else (tests/test_parity_cmd.py edits one weight to prove that it does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ldm_rt.errors import InputError, ModelDirError
from ldm_rt.export.onnx_export import MANIFEST, MANIFEST_FORMAT, source_hash
from ldm_rt.export.specs import COMPONENT_NAMES

# component -> the `ldm-rt export --model` value that writes it
EXPORT_NAME = {"text_encoder": "text-encoder", "transformer": "dit", "vae_decoder": "vae"}


def read_manifest(onnx_dir: Path, fix: str = "`ldm-rt export --model all --out DIR`") -> dict:
    """The manifest of the export directory `onnx_dir`, or a one-sentence `ModelDirError` that
    ends with `fix` (the export command that repairs it). Checks only that it is an ldm-rt
    manifest; what a caller needs of it, it checks itself."""
    if not onnx_dir.is_dir():
        raise ModelDirError(f"ONNX directory {onnx_dir} does not exist (or is not a directory); export into it "
                            f"with {fix}.")
    path = onnx_dir / MANIFEST
    if not path.is_file():
        raise ModelDirError(
            f"{onnx_dir} has no {MANIFEST}, so its graphs cannot be matched to a model; export with {fix}."
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{path} cannot be read as JSON ({exc}); re-export with {fix}.") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("components"), dict) or not manifest["components"]):
        raise ModelDirError(f"{path} is not an ldm-rt manifest (format {MANIFEST_FORMAT}, listing its "
                            f"components); re-export with {fix}.")
    return manifest


def open_onnx_dir(
    onnx_dir: str | Path,
    components,
    dtype: str,
    names: Iterable[str] = COMPONENT_NAMES,
    digests: dict[str, str] | None = None,
) -> dict:
    """The manifest of `onnx_dir` once every check passes; else a one-sentence `LdmRtError`.

    `components` is the model the graphs will be compared with or run for; `digests` (from
    `component_digests`) saves hashing its weights again.
    """
    onnx_dir = Path(onnx_dir).expanduser()
    fix = f"`ldm-rt export --model all --model-dir MODEL_DIR --dtype {dtype} --out {onnx_dir}`"
    manifest = read_manifest(onnx_dir, fix)
    path = onnx_dir / MANIFEST
    source = source_hash(components, digests)
    if manifest.get("source_sha256") != source:
        raise ModelDirError(
            f"{onnx_dir} was exported from another model or other weights (its manifest's source hash is "
            f"{str(manifest.get('source_sha256'))[:12]}, this model's is {source[:12]}); re-export it from this "
            f"model with {fix}."
        )
    if manifest.get("dtype") != dtype:
        raise InputError(
            f"{onnx_dir} holds {manifest.get('dtype')} graphs, not {dtype}; pass --dtype {manifest.get('dtype')}, "
            f"or export {dtype} graphs with {fix}."
        )
    for name in names:
        entry = manifest["components"].get(name)
        if not isinstance(entry, dict) or "file" not in entry:
            raise ModelDirError(
                f"{onnx_dir} has no {name} graph in its {MANIFEST}; export it with "
                f"`ldm-rt export --model {EXPORT_NAME.get(name, name)} --dtype {dtype} --out {onnx_dir}`."
            )
        for file in (entry["file"], entry.get("external_data")):
            if file and not (onnx_dir / file).is_file():
                raise ModelDirError(
                    f"{onnx_dir / file} is listed in {path} but missing; re-export it with "
                    f"`ldm-rt export --model {EXPORT_NAME.get(name, name)} --dtype {dtype} --out {onnx_dir}`."
                )
    return manifest
