"""Reading and writing safetensors weights, strictly.

A missing or unexpected key, or a shape mismatch, ends in one `WeightsError` that names the
component, the keys and the shapes (as nanoGPT's `from_pretrained` asserts every key).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm_rt.errors import WeightsError

_SHOW = 5  # keys listed in an error before "... and N more"


def _listing(items) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_SHOW])
    return shown + (f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def key_problems(keys, expected) -> list[str]:
    """What is wrong with a state dict's `keys` against the `expected` ones: the missing and the
    unexpected keys, each as one phrase listing a few of them (empty when they match)."""
    keys, expected = set(keys), set(expected)
    problems = []
    if expected - keys:
        problems.append(f"missing keys [{_listing(expected - keys)}]")
    if keys - expected:
        problems.append(f"unexpected keys [{_listing(keys - expected)}]")
    return problems


def read_safetensors(path: Path, component: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file on the CPU; a missing, truncated or corrupt file is a WeightsError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{component}: weights file {path} does not exist.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(
            f"{component}: {path} is not a readable safetensors file ({exc}); "
            "it may be truncated or corrupted, so re-download or re-save it."
        ) from None


def write_safetensors(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(path))


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], component: str) -> None:
    """Copy `state_dict` into `module`; every parameter and buffer key must match in name and shape.

    Non-persistent buffers are not expected in the file. Values are cast to the module's dtype.
    """
    expected = module.state_dict()
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    problems = key_problems(state_dict, expected)
    if mismatched:
        problems.append(f"shape mismatches [{_listing(mismatched)}]")
    if problems:
        raise WeightsError(
            f"{component}: weights do not match the config: {'; '.join(problems)}."
        )
    module.load_state_dict(state_dict, strict=True)
