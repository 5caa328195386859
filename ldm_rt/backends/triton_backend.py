"""The `triton` backend: the reference modules with the Triton kernels swapped in, and each
whole CFG denoising step replayed from a CUDA graph.

- Kernels: the DiT runs inside `ops.use(...)` with the `ldm_rt.kernels` versions of every swap
  point, so the model file is the reference's, unforked. Self-attention gets RoPE fused into the
  attention kernel (the DiT passes cos/sin to `attention`) and reads q, k, v as strided views of
  the reference's single fused qkv projection (`SelfAttention.qkv` is already one Linear, so
  there is no separate QKV fusion to add); cross-attention runs on the same kernel with the
  text padding mask; each block's residual add before the MLP is fused with the MLP's adaLN
  (`gated_residual_layernorm_modulate`). The text encoder and the VAE stay eager (the VAE's
  attention has head dim 512, above the kernel's 256; both run once per image, not per step).
- FLUX.1 (`ldm_rt.families.flux`) runs the same way through the same swap points: the joint
  [text; image] attention of both block kinds on the fused-RoPE kernel (head dim 128, the 3-axis
  tables of `ops.rope_freqs_from_ids`, text ids 0), the adaLN-Zero of every stream and the final
  AdaLayerNormContinuous on `layernorm_modulate`, the double-stream block's attention residual
  fused with its MLP's adaLN, the RMS qk-norm of q and k on `rms_norm` (the DiT's too); CLIP and
  T5 stay eager. The whole `flux_step` (ids and RoPE tables derived from the shapes, true CFG, the
  Euler update) has no host sync, so it is captured as one graph like the DiT's step
  (tests/test_flux_triton.py runs it on meta tensors on the CPU and captures it on the GPU).
- CUDA graphs (`StepGraphs`, the runtime's `run_step`): the pipeline hands over each denoising
  step as one pure function (the DiT call on [latents; latents], the CFG combination, the
  scheduler update, see `Family.step`, e.g. `ldm_rt.families.dit_text.text_cfg_step`) with its tensors: latents, timestep,
  the scheduler's coefficients for the step, the guidance scale, the conditioning. The first
  step with a new key and input signature (shapes, dtypes: one per batch and resolution) warms
  up on a side stream (Triton JIT, cuBLAS handles), then is captured into a graph reading static
  input buffers. Every later step copies its tensors into those buffers, replays, and returns a
  copy of the static output, so the caller may keep it. Graphs live in a small LRU cache
  (`max_graphs`), so a new image size costs one capture, not a failure.
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
    return dict(attention=kernels.attention, apply_rope=kernels.apply_rope, layernorm_modulate=kernels.layernorm_modulate,
                gated_residual_layernorm_modulate=kernels.gated_residual_layernorm_modulate, rms_norm=kernels.rms_norm)


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

    def __init__(self, fn: Callable, args: tuple, warmup: int):
        self.args = tuple(_static(a) for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.args)

    def __call__(self, args: tuple) -> torch.Tensor:
        for static, new in zip(self.args, args):
            if isinstance(static, torch.Tensor):
                static.copy_(new)
        self.graph.replay()
        return self.output.clone()


def _static(x: Any) -> Any:
    return torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x) if isinstance(x, torch.Tensor) else x


def _signature(args: tuple) -> tuple:
    """What a graph is specialised on: each tensor's shape/dtype/device, every other value."""
    return tuple(("T", tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else ("V", x) for x in args)


class StepGraphs:
    """`Runtime.run_step` with CUDA graphs: one graph per (key, input signature), LRU of `max_graphs`.

    Graph capture needs `step` free of host syncs, which the reference DiT, the kernel
    launchers, the CFG combination and the scheduler update are (no `.item()`, no
    data-dependent shapes; the scheduler's numbers arrive as tensors).
    """

    def __init__(self, max_graphs: int = MAX_GRAPHS, warmup: int = WARMUP_CALLS):
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.captures = 0  # how many graphs were captured (a new size adds one)

    @torch.no_grad()
    def __call__(self, key: tuple, step: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        full_key = (key, _signature(tensors))
        graph = self.graphs.get(full_key)
        if graph is None:
            graph = _Graph(step, tensors, self.warmup)
            self.captures += 1
            self.graphs[full_key] = graph
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)  # frees that graph and its memory pool
        else:
            self.graphs.move_to_end(full_key)
        return graph(tensors)


def check_device(device: torch.device, precision: Precision) -> bool:
    """Raise an InputError unless the triton backend can run here; True when CUDA graphs apply."""
    if device.type == "cuda":
        if precision is Precision.FP32:
            raise InputError("the triton backend runs in fp16 or bf16 on CUDA (its fp32 path skips the tensor "
                             "cores and exists for CPU tests); use dtype fp16 or bf16, or backend torch for fp32.")
        return True
    if device.type == "cpu" and kernels.interpreting():
        if precision is not Precision.FP32:
            raise InputError(f"Triton's CPU interpreter (TRITON_INTERPRET=1) runs the triton backend in fp32 only, "
                             f"not {precision.value}; use dtype fp32.")
        return False
    missing = "" if torch.cuda.is_available() else ", and this machine has no CUDA GPU"
    raise InputError(f"the triton backend needs a CUDA device, not {device}{missing}; use backend torch "
                     "(or set TRITON_INTERPRET=1 to run the kernels in Triton's slow CPU interpreter, for tests).")


def load(components, device: torch.device, precision: Precision, cuda_graphs: bool | None = None) -> Runtime:
    """`cuda_graphs`: None = on CUDA, off in the CPU interpreter; False forces eager kernels on CUDA."""
    graphs_possible = check_device(device, precision)
    use_graphs = graphs_possible if cuda_graphs is None else (cuda_graphs and graphs_possible)
    runtime = torch_backend.load(components, device, precision)  # the same modules, dtypes and VAE upcast
    runtime.transformer.eval()
    run_step = StepGraphs() if use_graphs else runtime.run_step
    return dataclasses.replace(runtime, transformer=KernelModule(runtime.transformer), run_step=run_step)
