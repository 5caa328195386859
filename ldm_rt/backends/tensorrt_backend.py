"""The `tensorrt` backend: TensorRT engines built from the exported ONNX graphs.

On first use the model is exported (fp32 ONNX) into the same content-keyed cache as the
onnxruntime backend (`$LDM_RT_CACHE`, default `~/.cache/ldm-rt`, then `onnx/<key>`), and one
engine per component is built next to the graphs by `ldm_rt.export.tensorrt.build_engines`
(`<component>.<precision>.engine` + its JSON metadata). A stale engine (other TensorRT, GPU,
ONNX file, precision or profile) is rebuilt with one line saying why. fp16/bf16 are TensorRT's
FP16/BF16 builder flags on the fp32 graph; the engines' I/O stay fp32.

Engines run on torch CUDA tensors in place: `set_input_shape` and `set_tensor_address`
(`tensor.data_ptr()`) per input, outputs allocated from `get_tensor_shape`, then
`execute_async_v3` on torch's current stream, so no host sync is needed between stages.
With `LDM_RT_TENSORRT_CUDA_GRAPH=1` each engine records one CUDA graph per input-shape
signature and replays it (static input/output buffers; inputs are copied in).

Written against the documented TensorRT 10 Python API and NOT run in this workplace: TensorRT
cannot be installed here (see the README's TensorRT section).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm_rt.backends import Runtime
from ldm_rt.errors import InputError, LdmRtError, ModelDirError
from ldm_rt.precision import Precision

# TensorRT DataType member name -> torch dtype (names, so the table is checked without TensorRT).
TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT64": torch.int64,
    "INT32": torch.int32,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}


def torch_dtype(trt_dtype) -> torch.dtype:
    """A `tensorrt.DataType` -> the torch dtype of a buffer for it."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in TORCH_DTYPES:
        raise LdmRtError(f"TensorRT tensor type {name} has no torch buffer type in ldm-rt.")
    return TORCH_DTYPES[name]


_LOGGER = None


def _logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


class TrtEngine:
    """One engine as a callable on torch tensors: (*inputs in spec order) -> [outputs in spec order]."""

    def __init__(self, path: Path, spec, device: torch.device, cuda_graph: bool = False,
                 hint: str = "rebuild it with `ldm-rt build-engine --min/--opt/--max` covering that shape"):
        from ldm_rt.export.tensorrt import import_tensorrt

        trt = import_tensorrt()
        self.trt, self.spec, self.device, self.path = trt, spec, device, Path(path)
        runtime = trt.Runtime(_logger(trt))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ModelDirError(
                f"TensorRT {trt.__version__} could not load {self.path}; delete it and rebuild with `ldm-rt build-engine`."
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(self.inputs) != sorted(spec.input_names) or sorted(self.outputs) != sorted(spec.output_names):
            raise ModelDirError(
                f"{self.path} has inputs {self.inputs} and outputs {self.outputs}; the spec declares "
                f"{spec.input_names} and {spec.output_names}; rebuild it."
            )
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = {
            n: dict(zip(("min", "opt", "max"), ([int(d) for d in s] for s in self.engine.get_tensor_profile_shape(n, 0))))
            for n in self.inputs
        }
        self.cuda_graph = cuda_graph
        self.hint = hint  # what to do about a shape outside the profile
        self._graphs: dict[tuple, tuple] = {}

    def _bind(self, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        for name in self.spec.input_names:
            x = tensors[name]
            if not self.context.set_input_shape(name, tuple(x.shape)):
                raise InputError(f"{self.spec.name}: TensorRT rejected input {name} of shape {tuple(x.shape)}.")
            self.context.set_tensor_address(name, x.data_ptr())
        outputs = []
        for name in self.spec.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise LdmRtError(f"TensorRT failed to run {self.path}; its log lines above say why.")

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        from ldm_rt.export.tensorrt import shape_in_profile

        xs = {name: x.to(device=self.device, dtype=self.dtypes[name]).contiguous()
              for name, x in zip(self.spec.input_names, tensors)}
        problem = shape_in_profile(self.profile, {n: tuple(x.shape) for n, x in xs.items()})
        if problem is not None:
            raise InputError(f"{self.spec.name}: {problem}; {self.hint}.")
        with torch.cuda.device(self.device):
            if self.cuda_graph:
                return self._replay(xs)
            outputs = self._bind(xs)  # xs stay referenced until the work is queued on this stream
            self._execute()
            return outputs

    def _replay(self, xs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One CUDA graph per input-shape signature: fixed buffers, inputs copied in, outputs cloned out."""
        key = tuple((n, tuple(x.shape)) for n, x in xs.items())
        if key not in self._graphs:
            static_in = {n: x.clone() for n, x in xs.items()}
            static_out = self._bind(static_in)
            self._execute()  # one plain run first: TensorRT finishes shape-dependent setup outside capture
            torch.cuda.current_stream(self.device).synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # a side stream, as capture requires
                self._execute()
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        for n, x in xs.items():
            static_in[n].copy_(x)
        graph.replay()  # the addresses bound at capture time are baked into the graph
        return [o.clone() for o in static_out]


def engine_dir(components, digests: dict[str, str]) -> Path:
    """Where this model's fp32 graphs and its engines live (the onnxruntime backend's cache key)."""
    from ldm_rt.backends.onnxruntime_backend import cache_dir

    return cache_dir(components, "fp32", digests)


def check(device: torch.device):
    """Raise unless TensorRT engines can be built and run on `device` here (tensorrt installed, a
    CUDA GPU); the system's facts. Cheap: `ldm-rt bench` asks before it copies the model."""
    from ldm_rt.export.tensorrt import current_system

    if device.type != "cuda":
        raise InputError(
            f"the tensorrt backend runs on an NVIDIA GPU (device cuda), not on {device}; "
            "use backend onnxruntime or torch there."
        )
    return current_system(device.index)


def load(components, device: torch.device, precision: Precision) -> Runtime:
    from ldm_rt.backends.onnxruntime_backend import _VAE, _TextEncoder, _Transformer
    from ldm_rt.export.onnx_export import component_digests, export_model
    from ldm_rt.export.specs import COMPONENT_NAMES, component_specs
    from ldm_rt.export.tensorrt import Geometry, build_engines, profile_points

    system = check(device)  # tensorrt and CUDA present, before any export work
    digests = component_digests(components)
    out = engine_dir(components, digests)
    export_model(components, out, COMPONENT_NAMES, dtype="fp32", digests=digests)
    engines = build_engines(out, out, precision=precision.value, geometry=Geometry.from_config(components.config),
                            system=system)
    specs = component_specs(components.config)
    lo, hi = (profile_points(Geometry.from_config(components.config))[p] for p in ("min", "max"))
    hint = (f"the tensorrt backend builds its engines for {lo.batch} to {hi.batch} images of "
            f"{lo.height}x{lo.width} to {hi.height}x{hi.width} px")
    graph = os.environ.get("LDM_RT_TENSORRT_CUDA_GRAPH", "") not in ("", "0")
    parts = {name: TrtEngine(engines[name], specs[name], device, graph, hint) for name in COMPONENT_NAMES}
    return Runtime(
        text_encoder=_TextEncoder(parts["text_encoder"]),
        transformer=_Transformer(parts["transformer"]),
        vae=_VAE(parts["vae_decoder"]),
        vae_dtype=parts["vae_decoder"].dtypes["latents"],
    )
