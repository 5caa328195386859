"""Compile every Triton kernel launch of the `triton` backend for Hopper (sm_90a), without a GPU.

    python bench/compile_kernels.py                      # DiT-XL/2 text and class presets, fp16 + bf16
    python bench/compile_kernels.py --grid               # + every kernel at widths past the presets', fp32 too
    python bench/compile_kernels.py --presets flux-dev --resolutions 512 1024   # FLUX.1's launches
    python bench/compile_kernels.py --out DIR            # also writes compile_kernels.json

The Triton interpreter (TRITON_INTERPRET=1, how CI runs the kernels) executes a kernel's Python
and never lowers it, so a kernel can pass every CPU parity test and still fail to compile for
a GPU: a tile too large for shared memory, a layout the backend rejects, register spills. This
script runs the real compiler instead. It records the launches the backend makes (a one-block
DiT at the preset's exact widths runs on the CPU under `ops.use` with the kernels swapped in;
each kernel's `kernel[grid](...)` is intercepted, so the launchers' own block sizes, warps,
stages and argument types are what gets compiled, with nothing copied from them), then
compiles each distinct launch with `triton.compile` for `GPUTarget("cuda", 90, 32)` and runs
the `ptxas -v` Triton uses (its wheel bundles one) on the PTX. Reported per launch: shared
memory (against the H100's 227 KiB per block), registers per thread, spill bytes, and the
global loads, stores and async copies in the PTX by width (`memory_ops`: 16-byte vectors or
element by element).

Exit status 1 when a launch cannot run on an H100 (a compile error, more shared memory than a
block has, more than 255 registers); spills are reported as warnings. `compile_s` is the time
of this call: near zero when Triton's on-disk cache already held the kernel.

What it cannot say: anything about speed, or whether the kernel gives the right numbers on the
GPU (the CPU parity tests and the `gpu` tests do that). The JIT's specialisation is mirrored
(integers equal to 1 become constants, pointers and integers divisible by 16 get the
divisibility hint), so the code compiled is the code the JIT would build for these arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch

HOPPER_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB, opt-in)
MAX_REGISTERS = 255  # per thread
TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8",
                   torch.int32: "i32", torch.int64: "i64"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the JIT would specialise it."""

    kernel: str  # "flash_attention._attention_kernel"
    signature: tuple[tuple[str, str], ...]  # (arg name, Triton type or "constexpr")
    constexprs: tuple[tuple[str, Any], ...]
    divisible_by_16: tuple[int, ...]  # argument indices with the divisibility hint
    num_warps: int
    num_stages: int

    def describe(self) -> dict[str, Any]:
        """The launch as JSON: label, kernel, pointer types, constants, warps, stages."""
        return dict(label=self.label(), kernel=self.kernel,
                    pointers={k: v for k, v in self.signature if v.startswith("*")},
                    constexprs={k: v for k, v in self.constexprs if not isinstance(v, int) or k.isupper()},
                    num_warps=self.num_warps, num_stages=self.num_stages)

    def label(self) -> str:
        types = dict(self.signature)
        dtype = types.get("x_ptr") or types.get("q_ptr") or "?"
        keep = ("HEAD_DIM", "BLOCK_D0", "BLOCK_D1", "BLOCK_M", "BLOCK_N", "BLOCK_D", "HAS_MASK", "ROPE", "GATED",
                "HAS_GATE", "BLOCK")
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs if k in keep)
        if "cos_ptr" in types and dict(self.constexprs).get("ROPE"):
            consts += f" cos={types['cos_ptr'].lstrip('*')}"
        return f"{self.kernel.split('.')[-1]} {dtype.lstrip('*')} {consts} warps={self.num_warps} stages={self.num_stages}"


def _kernels() -> dict[str, Any]:
    """The JIT functions of ldm_rt.kernels, by "module.name"."""
    from ldm_rt.kernels import adaln, flash_attention, rmsnorm, rope

    found = {"adaln._adaln_kernel": (adaln, "_adaln_kernel"),
             "flash_attention._attention_kernel": (flash_attention, "_attention_kernel"),
             "rope._rope_kernel": (rope, "_rope_kernel"),
             "rmsnorm._rms_norm_kernel": (rmsnorm, "_rms_norm_kernel")}
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set, so the kernels were built for the interpreter and cannot be "
                           "compiled: run this in a process without it.")
    return found


def _specialise(jit_fn, name: str, args: tuple, kwargs: dict) -> Launch:
    """Mirror the JIT's argument specialisation for one `kernel[grid](*args, **kwargs)` call."""
    kwargs = dict(kwargs)
    num_warps, num_stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
    names = jit_fn.arg_names
    values = dict(zip(names, args)) | kwargs
    signature, constexprs, divisible = [], {}, []
    for i, arg_name in enumerate(names):
        value = values[arg_name]
        if i in jit_fn.constexprs:
            signature.append((arg_name, "constexpr"))
            constexprs[arg_name] = value
        elif isinstance(value, torch.Tensor):
            signature.append((arg_name, "*" + TORCH_TO_TRITON[value.dtype]))
            if value.data_ptr() % 16 == 0:
                divisible.append(i)
        elif isinstance(value, bool):
            signature.append((arg_name, "i1"))
        elif isinstance(value, int):
            if value == 1:  # the JIT turns an integer 1 (a unit stride, say) into a constant
                signature.append((arg_name, "constexpr"))
                constexprs[arg_name] = 1
                continue
            signature.append((arg_name, "i32" if -2**31 <= value < 2**31 else "i64"))
            if value % 16 == 0:
                divisible.append(i)
        elif isinstance(value, float):
            signature.append((arg_name, "fp32"))
        else:
            raise TypeError(f"{name}: cannot type argument {arg_name}={value!r}")
    return Launch(name, tuple(signature), tuple(constexprs.items()), tuple(divisible), num_warps, num_stages)


@contextlib.contextmanager
def recording(launches: list[Launch]) -> Iterator[None]:
    """Within: every launch of an ldm_rt Triton kernel is recorded instead of run (so the
    launchers accept CPU tensors: nothing is launched)."""
    import ldm_rt.kernels

    patched = [(ldm_rt.kernels, "_check_device", ldm_rt.kernels._check_device)]
    ldm_rt.kernels._check_device = lambda t: None

    class Recorder:
        def __init__(self, name, jit_fn):
            self.name, self.jit_fn = name, jit_fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                found = _specialise(self.jit_fn, self.name, args, kwargs)
                if found not in launches:
                    launches.append(found)
            return launch

    try:
        for name, (module, attr) in _kernels().items():
            jit_fn = getattr(module, attr)
            patched.append((module, attr, jit_fn))
            setattr(module, attr, Recorder(name, jit_fn))
        yield
    finally:
        for module, attr, jit_fn in patched:
            setattr(module, attr, jit_fn)


def backend_launches(presets: list[str], resolutions: list[int], dtypes: list[str]) -> list[Launch]:
    """The kernel launches one CFG step of the triton backend makes for these presets (batch 2)."""
    from ldm_rt import ops
    from ldm_rt.backends.triton_backend import kernel_impls
    from ldm_rt.configs import ModelConfig
    from ldm_rt.models.dit import DiT

    launches: list[Launch] = []
    for preset in presets:
        if preset.startswith("flux-"):
            launches += [x for x in flux_launches(preset, resolutions, dtypes) if x not in launches]
            continue
        config = ModelConfig.from_name(preset)
        one_block = dataclasses.replace(config.transformer, depth=1)  # every block launches the same kernels
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            model = DiT(one_block).to(dtype).eval()
            for px in resolutions:
                side = px // config.vae.scale_factor
                latents = torch.randn(2, one_block.in_channels, side, side, dtype=dtype)
                t = torch.full((2,), 500.0, dtype=dtype)
                if one_block.class_conditional:
                    kwargs = dict(class_labels=torch.tensor([207, one_block.num_classes]))
                    args = (latents, t)
                else:
                    m = config.text_encoder.max_position_embeddings
                    mask = torch.arange(m)[None, :] < torch.tensor([[9], [m]])  # one padded prompt
                    args = (latents, t, torch.randn(2, m, one_block.context_dim, dtype=dtype), mask,
                            torch.randn(2, one_block.pooled_dim, dtype=dtype))
                    kwargs = {}
                with recording(launches), ops.use(**kernel_impls()), torch.no_grad():
                    model(*args, **kwargs)
    return launches


def flux_launches(preset: str, resolutions: list[int], dtypes: list[str]) -> list[Launch]:
    """The launches one FLUX.1 step of the triton backend makes (batch 1, embedded guidance): one
    double- and one single-stream block at the preset's widths (every block of a kind launches the
    same kernels), T5 padded to the model's max_sequence_length (512 dev, 256 schnell) and
    (px / 16)^2 image tokens in one joint sequence. Weights are left uninitialised (`to_empty`):
    only shapes, strides and dtypes reach a launch, and nothing is launched."""
    from ldm_rt import families, ops
    from ldm_rt.backends.triton_backend import kernel_impls
    from ldm_rt.families.flux.loading import run_defaults
    from ldm_rt.families.flux.sampling import latent_image_ids, text_ids
    from ldm_rt.families.flux.transformer import FluxTransformer2DModel

    config = families.get("flux").presets()[preset].transformer
    one_each = dataclasses.replace(config, num_layers=1, num_single_layers=1)
    m = run_defaults(config)["max_sequence_length"]
    launches: list[Launch] = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        with torch.device("meta"):
            model = FluxTransformer2DModel(one_each)
        model = model.to_empty(device="cpu").to(dtype).eval()
        for px in resolutions:
            grid = px // 16  # VAE factor 8 x the 2x2 packing
            args = (torch.randn(1, grid * grid, one_each.in_channels, dtype=dtype),
                    torch.randn(1, m, one_each.joint_attention_dim, dtype=dtype),
                    torch.randn(1, one_each.pooled_projection_dim, dtype=dtype), torch.full((1,), 0.5),
                    latent_image_ids(grid, grid, dtype=dtype), text_ids(m, dtype=dtype),
                    torch.full((1,), 3.5) if one_each.guidance_embeds else None)
            with recording(launches), ops.use(**kernel_impls()), torch.no_grad():
                model(*args)
    return launches


def norm_and_rope_grid(dtypes: list[str], widths: list[int]) -> list[Launch]:
    """adaLN launches at every row width up to the kernel's MAX_D (both ops, gated or not), and
    the standalone RoPE kernel at head dims 64 and 72 (bench/kernel_bench.py times it)."""
    from ldm_rt.kernels import adaln, rope

    launches: list[Launch] = []
    with recording(launches):
        for dtype in [DTYPES[name] for name in dtypes] + [torch.float32]:
            for d in widths:
                x = torch.randn(2, 5, d, dtype=dtype)
                vec = torch.randn(2, d, dtype=dtype)
                adaln.layernorm_modulate(x, vec, vec)
                adaln.gated_residual_layernorm_modulate(x, x, vec, vec, vec)
                adaln.gated_residual_layernorm_modulate(x, x, None, vec, vec)
            for d in (64, 72):
                rope.apply_rope(torch.randn(2, 3, 7, d, dtype=dtype), torch.randn(7, d // 2), torch.randn(7, d // 2))
    return launches


def attention_grid(dtypes: list[str], head_dims: list[int], seqs: list[int]) -> list[Launch]:
    """Attention launches beyond the backend's: every head dim the kernel promises, fp32 too,
    split and padded head dim (bench/kernel_bench.py measures both), self-attention with fused RoPE
    (fp32 tables) and cross-attention to 77 padded text keys."""
    from ldm_rt.kernels import flash_attention

    launches: list[Launch] = []
    with recording(launches):
        for dtype in [DTYPES[name] for name in dtypes] + [torch.float32]:
            for d in head_dims:
                for n in seqs:
                    q = torch.randn(2, 4, n, d, dtype=dtype)
                    text = torch.randn(2, 4, 77, d, dtype=dtype)
                    mask = torch.arange(77)[None, :] < torch.tensor([[9], [77]])
                    cos = sin = torch.randn(n, d // 2)
                    for pad in (False, True):
                        flash_attention.attention(q, q, q, pad_head_dim=pad)
                        flash_attention.attention(q, q, q, cos=cos, sin=sin, pad_head_dim=pad)
                        flash_attention.attention(q, text, text, key_padding_mask=mask, pad_head_dim=pad)
    return launches


def ptxas_usage(ptx: str, arch: str, capability: int) -> dict[str, int]:
    """Registers, spill bytes and stack frame of the kernel in `ptx`, from `ptxas -v` (the ptxas
    Triton itself uses for this capability: its wheel bundles one)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([get_ptxas(capability).path, f"--gpu-name={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas failed: {done.stderr.strip()}")
    text = done.stderr + done.stdout

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        return int(found.group(1)) if found else 0

    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), stack_frame=number(r"(\d+) bytes stack frame"))


def compile_launch(launch: Launch, capability: int = 90) -> dict[str, Any]:
    """Compile one launch for CUDA `capability`; shared memory, registers, spills, seconds."""
    import triton
    from triton.backends.compiler import GPUTarget

    module, attr = _kernels()[launch.kernel]
    jit_fn = getattr(module, attr)
    src = triton.compiler.ASTSource(fn=jit_fn, signature=dict(launch.signature), constexprs=dict(launch.constexprs),
                                    attrs={(i,): [["tt.divisibility", 16]] for i in launch.divisible_by_16})
    target = GPUTarget("cuda", capability, 32)
    options = triton.compiler.make_backend(target).parse_options(
        dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    start = time.perf_counter()
    compiled = triton.compile(src, target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    arch = re.search(r"\.target\s+(sm_\w+)", compiled.asm["ptx"]).group(1)
    usage = ptxas_usage(compiled.asm["ptx"], arch, capability)
    return dict(launch.describe(), arch=arch, shared_bytes=compiled.metadata.shared, **usage,
                memory_ops=memory_ops(compiled.asm["ptx"]), mma_ops=mma_ops(compiled.asm["ptx"]),
                compile_s=round(seconds, 2))


def memory_ops(ptx: str) -> dict[str, int]:
    """Global loads, stores and async copies in the PTX by kind, e.g. {"ld.global.v4.b32": 4,
    "cp.async.cg.shared.global": 8}: the width shows whether rows move as 16-byte vectors
    (v4.b32, cp.async.cg) or element by element (b16 for fp16)."""
    found = re.findall(r"\b(ld\.global(?:\.[a-z]\w*)*|st\.global(?:\.[a-z]\w*)*|cp\.async\.c[ag]\.shared\.global)", ptx)
    return dict(sorted(Counter(found).items()))


def mma_ops(ptx: str) -> dict[str, int]:
    """Tensor-core instructions in the PTX by kind, e.g. {"wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16": 9}:
    Hopper's warpgroup MMA (wgmma, asynchronous, operands from shared memory) or the older
    per-warp `mma.sync` that sm_90a also runs, at a fraction of the rate."""
    return dict(sorted(Counter(re.findall(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx)).items()))


def problems(row: dict[str, Any]) -> list[str]:
    """What would stop this launch on an H100 (compile error, too much shared memory or too many
    registers: it cannot launch) or slow it (spills)."""
    found = [row["error"]] if "error" in row else []
    if found:
        return found
    if row["shared_bytes"] > HOPPER_SMEM:
        found.append(f"needs {row['shared_bytes']} B of shared memory, above the {HOPPER_SMEM} B an H100 block has")
    if row["registers"] > MAX_REGISTERS:
        found.append(f"{row['registers']} registers per thread")
    if row["spill_stores"] or row["spill_loads"]:
        found.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads to local memory")
    return found


def cannot_launch(row: dict[str, Any]) -> bool:
    return "error" in row or row["shared_bytes"] > HOPPER_SMEM or row["registers"] > MAX_REGISTERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compile the triton backend's kernel launches for sm_90a (no GPU needed).")
    p.add_argument("--presets", nargs="+", default=["dit-xl-2", "dit-xl-2-256-class"])
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    p.add_argument("--grid", action="store_true",
                   help="also fp32, adaLN at D = 1152 ... 16384, RoPE, and attention at head dims 64, 72, 96 "
                        "and 128, padded or split, N = 1, 77, 1024")
    p.add_argument("--out", type=Path, help="directory for compile_kernels.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be JIT functions, not interpreted ones
    import triton

    launches = backend_launches(args.presets, args.resolutions, args.dtype)
    if args.grid:
        extra = norm_and_rope_grid(args.dtype, [1152, 3072, 8192, 16384])
        extra += attention_grid(args.dtype, [64, 72, 96, 128], [1, 77, 1024])
        launches += [launch for launch in extra if launch not in launches]
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(launches)} distinct launches", flush=True)
    rows = []
    for launch in launches:
        try:
            row = compile_launch(launch)
        except Exception as error:  # a compile failure is this script's finding, not a crash
            row = dict(launch.describe(), error=f"{type(error).__name__}: {error}")
        row["problems"] = problems(row)
        rows.append(row)
        if "error" in row:
            print(f"FAIL  {row['label']}\n      {row['error']}", flush=True)
        else:
            status = "FAIL" if cannot_launch(row) else "WARN" if row["problems"] else "ok  "
            print(f"{status}  {row['label']}: {row['arch']}, smem {row['shared_bytes'] / 1024:.1f} KiB, "
                  f"{row['registers']} regs, spills {row['spill_stores']}/{row['spill_loads']} B, {row['compile_s']} s"
                  + "".join(f"\n      {p}" for p in row["problems"]), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compile_kernels.json").write_text(json.dumps(
            dict(triton=triton.__version__, torch=torch.__version__, command=" ".join(sys.argv), launches=rows),
            indent=2) + "\n")
    failed = sum(cannot_launch(row) for row in rows)
    spilling = sum(bool(row["problems"]) and not cannot_launch(row) for row in rows)
    print(f"{len(rows) - failed} of {len(rows)} launches compile for sm_90a within H100 limits; "
          f"{spilling} of them spill registers")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
