"""The `triton` backend: the reference modules with the Triton kernels swapped in, and the
CFG-batched DiT call replayed from CUDA graphs.

- Kernels: the DiT runs inside `ops.use(attention=..., apply_rope=..., layernorm_modulate=...)`
  with the `ldm_rt.kernels` versions, so the model file is the reference's, unforked. Self-
  attention gets RoPE fused into the attention kernel (the DiT passes cos/sin to `attention`),
  and reads q, k, v as strided views of the reference's single fused qkv projection
  (`SelfAttention.qkv` is already one Linear, so there is no separate QKV fusion to add);
  cross-attention runs on the same kernel with the text padding mask. The text encoder and
  the VAE stay eager (the VAE's attention has head dim 512, above the kernel's 256; both run
  once per image, not once per step).
- CUDA graphs: the first DiT call with a new input signature (shapes, dtypes, which optional
  inputs are None: one per batch and resolution) warms up on a side stream (Triton JIT,
  cuBLAS handles), then is captured into a graph reading static input buffers. Each later
  call copies its inputs into those buffers (the timestep included: the scheduler's table
  lives on the CPU, the pipeline moves step i's value to the device), replays, and returns a
  copy of the static output, so the caller may keep it across steps. Graphs live in a small
  LRU cache (`max_graphs`), so a new image size costs one capture, not a failure. The CFG
  combination and the scheduler step (the shared pure function) stay outside the graph: a
  few elementwise launches on the latents, against ~30 kernels per DiT block inside it.
- On the CPU with TRITON_INTERPRET=1 (tests only) the kernels run in Triton's interpreter,
  eagerly, without graphs, in fp32 (the interpreter has no bf16; the pipeline refuses fp16
  on the CPU).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Callable

import torch

from ldm_rt import kernels, ops
from ldm_rt.backends import Runtime, torch_backend
from ldm_rt.errors import InputError
from ldm_rt.precision import Precision

MAX_GRAPHS = 4  # one CUDA graph per (batch, resolution); each holds its own activation memory
WARMUP_CALLS = 2  # eager calls on a side stream before capture (JIT, allocator, cuBLAS workspaces)


def kernel_impls() -> dict[str, Callable]:
    """The swap points the triton backend routes to kernels (names as in `ops.use`)."""
    return dict(attention=kernels.attention, apply_rope=kernels.apply_rope, layernorm_modulate=kernels.layernorm_modulate)


class KernelModule:
    """Calls a reference module with the swap points routed to the Triton kernels (eager)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        with ops.use(**kernel_impls()):
            return self.module(*args, **kwargs)


class _Graph:
    """One captured call: static input buffers, the graph, its static output."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, warmup: int):
        self.args = tuple(_static(a) for a in args)
        self.kwargs = {k: _static(v) for k, v in kwargs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.args, **self.kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.args, **self.kwargs)

    def __call__(self, args: tuple, kwargs: dict) -> torch.Tensor:
        for static, new in zip(self.args, args):
            if isinstance(static, torch.Tensor):
                static.copy_(new)
        for name, new in kwargs.items():
            if isinstance(self.kwargs[name], torch.Tensor):
                self.kwargs[name].copy_(new)
        self.graph.replay()
        return self.output.clone()


def _static(x: Any) -> Any:
    return torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x) if isinstance(x, torch.Tensor) else x


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What a graph is specialised on: each tensor's shape/dtype/device, every other value."""
    def sig(x):
        return ("T", tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else ("V", x)

    return tuple(sig(a) for a in args) + tuple((k, sig(v)) for k, v in sorted(kwargs.items()))


class GraphedTransformer:
    """The DiT with kernels, replayed from one CUDA graph per input signature (LRU of `max_graphs`).

    Same call signature as the module. Graph capture needs the whole forward free of host
    syncs, which the reference DiT and the kernel launchers are (no `.item()`, no data-dependent
    shapes).
    """

    def __init__(self, module: torch.nn.Module, max_graphs: int = MAX_GRAPHS, warmup: int = WARMUP_CALLS):
        self.call = KernelModule(module)
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.captures = 0  # how many graphs were captured (a new size adds one)

    @torch.no_grad()
    def __call__(self, *args, **kwargs) -> torch.Tensor:
        key = _signature(args, kwargs)
        graph = self.graphs.get(key)
        if graph is None:
            graph = _Graph(self.call, args, kwargs, self.warmup)
            self.captures += 1
            self.graphs[key] = graph
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)  # frees that graph and its memory pool
        else:
            self.graphs.move_to_end(key)
        return graph(args, kwargs)


def check_device(device: torch.device, precision: Precision) -> bool:
    """Raise an InputError unless the triton backend can run here; True when CUDA graphs apply."""
    if device.type == "cuda":
        if precision is Precision.FP32:
            raise InputError("the triton backend runs in fp16 or bf16 on CUDA (its fp32 path skips the tensor "
                             "cores and exists for CPU tests); pass --dtype fp16 or bf16, or use --backend torch for fp32.")
        return True
    if device.type == "cpu" and kernels.interpreting():
        if precision is not Precision.FP32:
            raise InputError(f"Triton's CPU interpreter (TRITON_INTERPRET=1) runs the triton backend in fp32 only, "
                             f"not {precision.value}; pass --dtype fp32.")
        return False
    missing = "" if torch.cuda.is_available() else ", and this machine has no CUDA GPU"
    raise InputError(f"the triton backend needs a CUDA device, not {device}{missing}; use --backend torch "
                     "(or set TRITON_INTERPRET=1 to run the kernels in Triton's slow CPU interpreter, for tests).")


def load(components, device: torch.device, precision: Precision, cuda_graphs: bool | None = None) -> Runtime:
    """`cuda_graphs`: None = on CUDA, off in the CPU interpreter; False forces eager kernels on CUDA."""
    graphs_possible = check_device(device, precision)
    use_graphs = graphs_possible if cuda_graphs is None else (cuda_graphs and graphs_possible)
    runtime = torch_backend.load(components, device, precision)  # the same modules, dtypes and VAE upcast
    runtime.transformer.eval()
    transformer = GraphedTransformer(runtime.transformer) if use_graphs else KernelModule(runtime.transformer)
    return dataclasses.replace(runtime, transformer=transformer)
