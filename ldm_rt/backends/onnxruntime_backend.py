"""The `onnxruntime` backend: the exported ONNX graphs, with the reference modules' call signatures.

Graphs are exported on first use into a cache keyed by the model's content
(`$LDM_RT_CACHE`, default `~/.cache/ldm-rt`, then `onnx/<sha256 of configs + weights + dtype +
exporter versions>`), and reused after that (`export_model` reuses files whose hash matches).

CPU: CPUExecutionProvider, numpy feeds. CUDA: CUDAExecutionProvider (onnxruntime-gpu) with I/O
binding, so torch CUDA tensors are read and written in place. The CUDA path is written against
the documented onnxruntime API (`InferenceSession.io_binding`, `bind_input`/`bind_output` with
`buffer_ptr`) and has NOT run here: onnxruntime-gpu cannot be installed on the GPU machine of
this workplace.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ldm_rt.backends import Runtime
from ldm_rt.errors import InputError, ModelDirError
from ldm_rt.precision import Precision

# What the graphs run in: fp32 and fp16 (tests/test_parity_cmd.py runs both on the CPU provider).
RUNNABLE = (Precision.FP32, Precision.FP16)

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}


def cache_root() -> Path:
    return Path(os.environ.get("LDM_RT_CACHE") or Path.home() / ".cache" / "ldm-rt").expanduser()


def cache_dir(components, dtype: str = "fp32", digests: dict[str, str] | None = None) -> Path:
    """Where this model's graphs live: keyed by its configs and weights, the dtype and the exporter."""
    from ldm_rt.export.onnx_export import _versions, source_hash

    source = source_hash(components, digests)
    key = hashlib.sha256(f"{source} {dtype} {sorted(_versions().items())}".encode()).hexdigest()
    return cache_root() / "onnx" / key[:24]


def _resolve(dim, env: dict[str, int]) -> int:
    """A spec dim -> its size: an int, a symbol bound by the inputs, or 'symbol*k'."""
    if isinstance(dim, int):
        return dim
    if "*" in dim:
        symbol, factor = dim.split("*")
        return env[symbol] * int(factor)
    return env[dim]


class OrtComponent:
    """One exported graph as a callable taking and returning torch tensors."""

    def __init__(self, path: Path, spec, device: torch.device, providers: list):
        import onnxruntime as ort

        self.spec = spec
        self.device = device
        options = ort.SessionOptions()
        if device.type == "cpu":
            # The same CPU budget as the torch backend, so timings compare like with like.
            options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        names = [i.name for i in self.session.get_inputs()]
        if names != spec.input_names:
            raise ModelDirError(f"{path} takes inputs {names}, the spec declares {spec.input_names}; re-export it.")

    def _check(self, tensors) -> dict[str, int]:
        env: dict[str, int] = {}
        for t, x in zip(self.spec.inputs, tensors):
            if x.dim() != len(t.dims):
                raise InputError(f"{self.spec.name} input {t.name} has shape {tuple(x.shape)}; expected {t.dims}.")
            for d, n in zip(t.dims, x.shape):
                if isinstance(d, int) and d != n:
                    raise InputError(
                        f"{self.spec.name} input {t.name} has shape {tuple(x.shape)}; the exported graph "
                        f"takes {t.dims}."
                    )
                if isinstance(d, str):
                    env.setdefault(d, n)
        return env

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        tensors = [x.to(t.dtype).contiguous() for t, x in zip(self.spec.inputs, tensors)]
        env = self._check(tensors)
        if self.device.type == "cpu":
            feeds = {t.name: x.detach().cpu().numpy() for t, x in zip(self.spec.inputs, tensors)}
            return [torch.from_numpy(o) for o in self.session.run(self.spec.output_names, feeds)]
        return self._run_cuda(tensors, env)

    def _run_cuda(self, tensors, env) -> list[torch.Tensor]:
        """I/O binding on torch CUDA tensors (documented onnxruntime-gpu API; not run here)."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        binding = self.session.io_binding()
        tensors = [x.to(self.device) for x in tensors]  # kept alive until the run is over
        for t, x in zip(self.spec.inputs, tensors):
            binding.bind_input(name=t.name, device_type="cuda", device_id=index, element_type=_NUMPY[t.dtype],
                               shape=tuple(x.shape), buffer_ptr=x.data_ptr())
        outputs = []
        for t in self.spec.outputs:
            out = torch.empty([_resolve(d, env) for d in t.dims], dtype=t.dtype, device=self.device)
            binding.bind_output(name=t.name, device_type="cuda", device_id=index, element_type=_NUMPY[t.dtype],
                                shape=tuple(out.shape), buffer_ptr=out.data_ptr())
            outputs.append(out)
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs


class _TextEncoder:
    def __init__(self, graph: OrtComponent):
        self.graph = graph

    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's outputs as a tuple: (last_hidden_state, pooled) for a DiT's text encoder."""
        return tuple(self.graph(input_ids))


class _Transformer:
    """The transformer graph with the reference module's call signature: positional inputs in the
    spec's order, keyword inputs by the spec's names (a family's transformer takes its own
    conditioning inputs: text states, class labels, ...)."""

    def __init__(self, graph: OrtComponent):
        self.graph = graph

    def __call__(self, *args, **kwargs):
        names = self.graph.spec.input_names
        # Positional arguments beyond the graph's inputs are None (FLUX.1's guidance of a model
        # without a guidance embedder: the graph has no such input).
        extra = [a for a in args[len(names):] if a is not None]
        if extra:
            raise InputError(f"{self.graph.spec.name} takes {len(names)} inputs ({', '.join(names)}), "
                             f"got {len(args)}.")
        feeds = {**dict(zip(names, args)), **kwargs}
        timestep = feeds.get("timestep")
        if timestep is not None and timestep.dim() == 0:  # a scalar timestep: one per row
            feeds["timestep"] = timestep.expand(feeds[names[0]].shape[0])
        if "text_mask" in names and feeds.get("text_mask") is None:  # no mask: every token attends
            states = feeds["text_states"]
            feeds["text_mask"] = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        missing = [n for n in names if feeds.get(n) is None]
        if missing:
            raise InputError(f"{self.graph.spec.name} needs input(s) {', '.join(missing)}.")
        return self.graph(*[feeds[n] for n in names])[0]


class _VAE:
    def __init__(self, graph: OrtComponent):
        self.graph = graph

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.graph(latents)[0]


def providers_for(device: torch.device) -> list:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise InputError(
                f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (it has {', '.join(available)}): "
                "pip install 'ldm-rt[onnxruntime-gpu]', or use device cpu."
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def check(device: torch.device, precision: Precision) -> list:
    """Raise an InputError unless onnxruntime can run `precision` graphs on `device` here (no
    export, no copy of the model: `ldm-rt bench` asks before it copies one); its providers."""
    if precision not in RUNNABLE:
        # onnxruntime 1.32's CPU provider has no bfloat16 kernels for Conv, Add, MatMul...: a bf16
        # graph fails at session creation (NOT_IMPLEMENTED), so refuse it up front.
        raise InputError(
            f"the onnxruntime backend cannot run {precision.value} graphs (onnxruntime has no "
            f"{precision.value} kernels for most of their ops); use dtype fp32 or fp16, or build a "
            "TensorRT engine from a bf16 export."
        )
    return providers_for(device)


def load(components, device: torch.device, precision: Precision, onnx_dir: str | Path | None = None) -> Runtime:
    """Every graph the family declares as backend callables (`Runtime.graphs`; the text encoder,
    transformer and VAE decoder also in the reference modules' signatures): from `onnx_dir` when given (checked against the
    model by `open_onnx_dir`), else exported on first use into the cache."""
    from ldm_rt.export.onnx_dir import open_onnx_dir
    from ldm_rt.export.onnx_export import component_digests, export_model
    from ldm_rt.export.specs import component_specs

    providers = check(device, precision)
    digests = component_digests(components)  # hash the weights once for the cache key and the export
    specs = component_specs(components.config, precision.value)
    names = list(specs)  # the graphs the model's family declares
    if onnx_dir is not None:
        out = Path(onnx_dir).expanduser()
        manifest = open_onnx_dir(out, components, precision.value, names, digests)
    else:
        out = cache_dir(components, precision.value, digests)
        manifest = export_model(components, out, names, dtype=precision.value, digests=digests)
    graphs = {
        name: OrtComponent(out / manifest["components"][name]["file"], specs[name], device, providers)
        for name in names
    }
    chosen = graphs["transformer"].session.get_providers()
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}: providers {', '.join(chosen)} | graphs in {out}", file=sys.stderr)
    return Runtime(
        text_encoder=_TextEncoder(graphs["text_encoder"]) if "text_encoder" in graphs else None,
        transformer=_Transformer(graphs["transformer"]),
        vae=_VAE(graphs["vae_decoder"]),
        vae_dtype=specs["vae_decoder"].inputs[0].dtype,  # fp32 in fp16 when the VAE config forces an upcast
        graphs=graphs,
    )
