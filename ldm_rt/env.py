"""What this machine can run: `ldm-rt env`."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform

import torch

from ldm_rt import __version__


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_report() -> dict[str, str]:
    report = {
        "ldm-rt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        report["cuda (torch build)"] = str(torch.version.cuda)
    for dist in ("triton", "onnx", "onnxscript", "tensorrt", "polygraphy", "transformers", "diffusers", "matplotlib"):
        report[dist] = _version(dist) or "not installed"
    ort = _version("onnxruntime") or _version("onnxruntime-gpu")
    if ort:
        try:
            providers = importlib.import_module("onnxruntime").get_available_providers()
            report["onnxruntime"] = f"{ort} (providers: {', '.join(providers)})"
        except Exception as exc:  # a broken install should not break the report
            report["onnxruntime"] = f"{ort} (import failed: {exc})"
    else:
        report["onnxruntime"] = "not installed"
    return report
