"""The `tensorrt` backend: TensorRT engines built from the exported ONNX graphs.

On first use the model is exported in the pipeline's precision (`ldm-rt export --dtype`: an
fp16/bf16 graph keeps its norm statistics and softmax in fp32, and an fp16 export keeps a
`force_upcast` VAE decoder in fp32) into the same content-keyed cache as the onnxruntime backend
(`$LDM_RT_CACHE`, default `~/.cache/ldm-rt`, then `onnx/<key>`), and one engine per component is
built next to the graphs by `ldm_rt.export.tensorrt.build_engines` (`<component>.<precision>.engine`
+ its JSON metadata). Networks are strongly typed, on TensorRT 10 and 11 alike (11 has no
FP16/BF16 builder flags): an engine computes in its graph's types, and fp32 engines clear TF32.
A stale engine (other TensorRT, GPU, ONNX file, precision or profile) is rebuilt with one line
saying why. Engine inputs and outputs have the graph's types; inputs are cast to them.

Engines run on torch CUDA tensors in place: `set_input_shape` and `set_tensor_address`
(`tensor.data_ptr()`) per input, outputs allocated from `get_tensor_shape`, then
`execute_async_v3` on torch's current stream, so no host sync is needed between stages.
With `LDM_RT_TENSORRT_CUDA_GRAPH=1` each engine records one CUDA graph per input-shape
signature and replays it (static input/output buffers; inputs are copied in).

Written against the TensorRT 10 and 11 Python APIs (the names are checked against the real
bindings, see `ldm_rt.export.tensorrt.TENSORRT_API`) and NOT run in this workplace: TensorRT
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


def engine_dir(components, precision: Precision, digests: dict[str, str]) -> Path:
    """Where this model's graphs in `precision` and their engines live (the onnxruntime backend's cache key)."""
    from ldm_rt.backends.onnxruntime_backend import cache_dir

    return cache_dir(components, precision.value, digests)


# bf16 tensor cores start with Ampere; TensorRT has no bf16 kernels below it.
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)


def precision_problem(precision: Precision, system) -> str | None:
    """None when engines in `precision` can be built on `system` (SystemFacts), else why not."""
    major, minor = (int(x) for x in system.compute_capability.split("."))
    if precision is Precision.BF16 and (major, minor) < BF16_MIN_COMPUTE_CAPABILITY:
        return (f"bf16 engines need compute capability {'.'.join(map(str, BF16_MIN_COMPUTE_CAPABILITY))} or newer, "
                f"and {system.gpu} has {system.compute_capability}; use --dtype fp16 or fp32")
    return None


def check(device: torch.device, precision: Precision = Precision.FP32):
    """Raise unless TensorRT engines in `precision` can be built and run on `device` here: a CUDA
    device, tensorrt (10 or 11), the export extra (the backend exports the graphs it builds
    from), and a precision the GPU can build. Returns the system's facts. Cheap, and before any
    export: `Pipeline` and `ldm-rt bench` ask before they export or copy the model."""
    from ldm_rt.errors import require
    from ldm_rt.export.tensorrt import build_plan, current_system, import_tensorrt

    if device.type != "cuda":
        raise InputError(
            f"the tensorrt backend runs on an NVIDIA GPU (device cuda), not on {device}; "
            "use backend onnxruntime or torch there."
        )
    build_plan(import_tensorrt(), precision.value)  # TensorRT too old for strongly typed networks
    for module in ("onnx", "onnxscript"):
        require(module, "export", "the tensorrt backend (it exports the ONNX graphs its engines are built from)")
    system = current_system(device.index)
    problem = precision_problem(precision, system)
    if problem is not None:
        raise InputError(f"the tensorrt backend cannot build {precision.value} engines here: {problem}.")
    return system


def load(components, device: torch.device, precision: Precision) -> Runtime:
    from ldm_rt.backends.onnxruntime_backend import _VAE, _TextEncoder, _Transformer
    from ldm_rt.export.onnx_export import component_digests, export_model
    from ldm_rt.export.specs import component_specs
    from ldm_rt.export.tensorrt import Geometry, build_engines, profile_points

    system = check(device, precision)  # tensorrt, CUDA and a buildable precision, before any export work
    digests = component_digests(components)
    out = engine_dir(components, precision, digests)
    names = list(component_specs(components.config))  # the graphs the model's family declares
    # The graphs carry the precision: strongly typed engines compute in their graphs' types.
    export_model(components, out, names, dtype=precision.value, digests=digests)
    engines = build_engines(out, out, precision=precision.value, geometry=Geometry.from_config(components.config),
                            system=system)
    specs = component_specs(components.config, precision.value)
    lo, hi = (profile_points(Geometry.from_config(components.config))[p] for p in ("min", "max"))
    hint = (f"the tensorrt backend builds its engines for {lo.batch} to {hi.batch} images of "
            f"{lo.height}x{lo.width} to {hi.height}x{hi.width} px")
    graph = os.environ.get("LDM_RT_TENSORRT_CUDA_GRAPH", "") not in ("", "0")
    parts = {name: TrtEngine(engines[name], specs[name], device, graph, hint) for name in names}
    return Runtime(
        text_encoder=_TextEncoder(parts["text_encoder"]) if "text_encoder" in parts else None,
        transformer=_Transformer(parts["transformer"]),
        vae=_VAE(parts["vae_decoder"]),
        vae_dtype=parts["vae_decoder"].dtypes["latents"],
        graphs=parts,
    )
