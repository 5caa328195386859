"""Reading and writing safetensors weights, strictly.

A missing or unexpected key, or a shape mismatch, ends in one `WeightsError` that names the
component, the keys and the shapes (as nanoGPT's `from_pretrained` asserts every key).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from ldm_rt.errors import ModelDirError, WeightsError

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


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints, streamed (diffusers/transformers `*.safetensors.index.json` layout)
# ---------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def weight_files(component_dir: Path, component: str, name: str = "diffusion_pytorch_model") -> dict[str, Path]:
    """Which file holds each tensor of a component: `<name>.safetensors`, or the shards its
    `<name>.safetensors.index.json` names (the index wins, as in diffusers). Every file must exist.

    Returns {key: file}; for a single file the keys come from its header. `name` is
    "diffusion_pytorch_model" for diffusers components, "model" for transformers ones.
    """
    import json

    component_dir = Path(component_dir)
    index, single = component_dir / f"{name}.safetensors.index.json", component_dir / f"{name}.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelDirError(f"{component}: {index} is not a readable safetensors index ({exc!r}).") from None
        files = {key: component_dir / shard for key, shard in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise ModelDirError(
                f"{component}: shard(s) {_listing(missing)} named in {index.name} are missing from {component_dir}; "
                "re-download the component."
            )
        return files
    if single.is_file():
        return {key: single for key in safetensors_header(single, component)}
    raise ModelDirError(f"{component}: {component_dir} holds neither {single.name} nor {index.name}.")


def safetensors_header(path: Path, component: str) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """{key: (dtype, shape, start, end)} with absolute byte offsets, read from the file's header.

    A file too short for its header or for the data the header describes (a truncated download)
    is a ModelDirError.
    """
    import json
    import struct

    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelDirError(f"{component}: {path} is not a readable safetensors file ({exc}); it may be truncated, re-download it.") from None
    base, out, end = 8 + n, {}, 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ModelDirError(f"{component}: {path} stores {key} as {info['dtype']}, a dtype ldm-rt does not read.")
        start, stop = info["data_offsets"]
        out[key] = (_ST_DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + stop)
        end = max(end, base + stop)
    if end > size:
        raise ModelDirError(
            f"{component}: {path} is truncated ({size} bytes, its header describes {end}); re-download it."
        )
    return out


@contextlib.contextmanager
def _skip_init():
    """`torch.nn.init`'s in-place fills as no-ops (the values are overwritten by the load). On the
    meta device they would run through torch._refs, whose first call imports torch._dynamo and
    with it triton: `ldm-rt run` on the torch backend must not import triton
    (tests/test_flux_family.py). transformers' `no_init_weights` does the same."""
    init = torch.nn.init
    saved = {n: getattr(init, n) for n in dir(init) if n.endswith("_") and not n.startswith("_")}
    try:
        for name in saved:
            setattr(init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def empty_module(factory, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """Build `factory()` with uninitialised parameters of `dtype` on `device`, without ever
    allocating an fp32 copy (built on the meta device, cast there, then materialised)."""
    with torch.device("meta"), _skip_init():
        module = factory()
    return module.to(dtype).to_empty(device=device)


@torch.no_grad()
def load_streaming(
    module: nn.Module,
    component_dir: Path,
    component: str,
    name: str = "diffusion_pytorch_model",
    key_map=None,
) -> None:
    """Fill `module`'s parameters and buffers from a (sharded) safetensors component, one tensor at
    a time, each cast to the parameter's dtype and device as it is copied in.

    Files are read with plain reads into a tensor of the stored dtype (or straight into the
    parameter when dtype and CPU device already match), never memory-mapped whole, so the host
    holds the module plus at most one tensor: peak RSS ~ module size (bench/load_rss.py).
    `key_map(file_key) -> module_key` renames keys (None: names already match). Keys and shapes
    must match exactly (WeightsError, as `load_strict`).
    """
    files = weight_files(component_dir, component, name)
    headers = {p: safetensors_header(p, component) for p in sorted(set(files.values()))}
    target = module.state_dict(keep_vars=True)
    located = {}
    for key, path in files.items():
        if key not in headers[path]:
            raise ModelDirError(f"{component}: the index puts {key} in {path.name}, which does not hold it; re-download the component.")
        located[key_map(key) if key_map else key] = (path, headers[path][key])
    # Tied parameters (T5's shared / encoder.embed_tokens) appear under several keys: one suffices.
    for key in [k for k in target if k not in located]:
        if any(target[other] is target[key] for other in located if other in target):
            del target[key]
    mismatched = [
        f"{k}: file {located[k][1][1]} vs model {tuple(target[k].shape)}"
        for k in sorted(set(located) & set(target))
        if located[k][1][1] != tuple(target[k].shape)
    ]
    problems = key_problems(located, target)
    if mismatched:
        problems.append(f"shape mismatches [{_listing(mismatched)}]")
    if problems:
        raise WeightsError(f"{component}: weights do not match the config: {'; '.join(problems)}.")
    for path in headers:
        with open(path, "rb") as f:
            for key, (p, (dtype, shape, start, stop)) in located.items():
                if p != path:
                    continue
                dst = target[key].data
                direct = dst.dtype == dtype and dst.device.type == "cpu" and dst.is_contiguous()
                buf = dst if direct else torch.empty(shape, dtype=dtype)
                f.seek(start)
                if stop > start and f.readinto(memoryview(buf.view(-1).view(torch.uint8).numpy())) != stop - start:
                    raise ModelDirError(f"{component}: {path} ended while reading {key}; it is truncated, re-download it.")
                if not direct:
                    dst.copy_(buf)
                    del buf


def write_sharded(
    out_dir: Path,
    tensors,
    name: str = "diffusion_pytorch_model",
    max_shard_bytes: int = 10 * 2**30,
    dtype: torch.dtype | None = torch.bfloat16,
) -> list[Path]:
    """Write `tensors` ({key: tensor} or an iterable of (key, tensor)) as `<name>-0000i-of-0000n.
    safetensors` shards plus `<name>.safetensors.index.json`, the layout diffusers/transformers
    write; floating tensors cast to `dtype` (None keeps them) one at a time. Returns the shards."""
    import json

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, dict) else tensors
    # Each shard is written as soon as it is full (host memory: one shard), under a temporary
    # name until the shard count is known.
    temps, weight_map, current, current_bytes, total = [], {}, {}, 0, 0

    def flush():
        temp = out_dir / f"{name}.part{len(temps) + 1}.tmp"
        save_file(current, str(temp))
        temps.append((temp, list(current)))

    for key, t in items:
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if current and current_bytes + nbytes > max_shard_bytes:
            flush()
            current, current_bytes = {}, 0
        current[key] = t
        current_bytes += nbytes
        total += nbytes
    if current or not temps:
        flush()
    paths = []
    for i, (temp, keys) in enumerate(temps, 1):
        path = out_dir / f"{name}-{i:05d}-of-{len(temps):05d}.safetensors"
        temp.replace(path)
        weight_map.update({k: path.name for k in keys})
        paths.append(path)
    (out_dir / f"{name}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    return paths
