"""The `triton` backend against the `torch` backend.

On the CPU (conftest.py sets TRITON_INTERPRET=1) the kernels run in Triton's interpreter,
eagerly, in fp32, on the tiny model: the DiT call and whole CFG sampling runs are compared.
The tests marked `gpu` check CUDA-graph capture/replay, the graph cache and the image against
the torch backend in fp16/bf16.
"""

import numpy as np
import pytest
import torch

from ldm_rt import kernels
from ldm_rt.backends import triton_backend
from ldm_rt.errors import InputError
from ldm_rt.model_dir import load_model_dir
from ldm_rt.parity import IMAGE_PSNR_DB, compare, psnr
from ldm_rt.pipeline import Pipeline
from ldm_rt.precision import Precision


def dit_inputs(cfg, batch=3, h=8, w=6, m=7, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, m, cfg.context_dim, generator=g)
    mask = torch.arange(m)[None, :] < torch.tensor([m, 2, 5][:batch])[:, None]  # rows padded differently
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    return (latents.to(device, dtype), t.to(device), text.to(device, dtype), mask.to(device), pooled.to(device, dtype))


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Wrap the public kernels so a test can see that the backend really routed to them."""
    calls = {}
    for name in ("attention", "layernorm_modulate"):
        real = getattr(kernels, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter path")
def test_dit_with_kernels_matches_reference_on_cpu(tiny_model_dir, monkeypatch):
    components = load_model_dir(tiny_model_dir)
    ref_model = components.transformer
    inputs = dit_inputs(ref_model.config)
    with torch.no_grad():
        ref = ref_model(*inputs)
    runtime = triton_backend.load(load_model_dir(tiny_model_dir), torch.device("cpu"), Precision.FP32)
    assert isinstance(runtime.transformer, triton_backend.KernelModule)  # no CUDA graphs on the CPU
    calls = count_kernel_calls(monkeypatch)
    out = runtime.transformer(*inputs)
    depth = ref_model.config.depth
    assert calls == {"attention": 2 * depth, "layernorm_modulate": 2 * depth + 1}, calls
    result = compare(out, ref, "transformer", "fp32")
    assert result.passed, str(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter path")
def test_pipeline_on_triton_backend_matches_torch_backend_on_cpu(tiny_model_dir):
    """Whole CFG sampling runs (text encoder, DiT steps with guidance, scheduler, VAE)."""
    kwargs = dict(steps=3, guidance=4.0, seed=5, height=32, width=48)
    ref = Pipeline.from_pretrained(tiny_model_dir, backend="torch", device="cpu", dtype="fp32")("a red circle", **kwargs)[0]
    pipe = Pipeline.from_pretrained(tiny_model_dir, backend="triton", device="cpu", dtype="fp32")
    image = pipe("a red circle", **kwargs)[0]
    db = psnr(torch.from_numpy(np.array(image)), torch.from_numpy(np.array(ref)))
    assert db >= IMAGE_PSNR_DB["fp32"], f"triton image PSNR {db:.1f} dB against the torch backend"


def test_triton_backend_refuses_cpu_without_the_interpreter(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="needs a CUDA device"):
        Pipeline.from_pretrained(tiny_model_dir, backend="triton", device="cpu", dtype="fp32")


def test_triton_backend_refuses_bf16_in_the_interpreter(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(InputError, match="fp32 only"):
        Pipeline.from_pretrained(tiny_model_dir, backend="triton", device="cpu", dtype="bf16")


# --------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_triton_backend_refuses_fp32_on_cuda(tiny_model_dir):
    with pytest.raises(InputError, match="fp16 or bf16"):
        Pipeline.from_pretrained(tiny_model_dir, backend="triton", device="cuda", dtype="fp32")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_graph_replay_matches_eager_kernels_and_reference(tiny_model_dir, dtype, monkeypatch):
    precision = Precision.parse(dtype)
    runtime = triton_backend.load(load_model_dir(tiny_model_dir), torch.device("cuda"), precision)
    graphed = runtime.transformer
    assert isinstance(graphed, triton_backend.GraphedTransformer)
    cfg = graphed.call.module.config
    first = dit_inputs(cfg, device="cuda", dtype=precision.dtype, seed=0)
    second = dit_inputs(cfg, device="cuda", dtype=precision.dtype, seed=1)  # same shapes, new values
    eager = graphed.call(*second)
    graphed(*first)  # captures
    out = graphed(*second)  # replays with new inputs copied into the static buffers
    assert graphed.captures == 1
    same = compare(out.float(), eager.float(), "op", dtype)  # stale static buffers would give first's output
    assert same.passed, str(same)
    with torch.no_grad():
        ref = load_model_dir(tiny_model_dir).transformer.cuda()(*(t.float() if t.is_floating_point() else t
                                                                   for t in second))
    result = compare(out.float(), ref, "transformer", dtype)
    assert result.passed, str(result)


@pytest.mark.gpu
def test_graph_cache_captures_once_per_size_and_evicts(tiny_model_dir):
    runtime = triton_backend.load(load_model_dir(tiny_model_dir), torch.device("cuda"), Precision.FP16)
    graphed = runtime.transformer
    graphed.max_graphs = 2
    cfg = graphed.call.module.config
    small, large, wide = ((dit_inputs(cfg, h=h, w=w, device="cuda", dtype=torch.float16)) for h, w in
                          ((8, 6), (12, 10), (8, 16)))
    for inputs in (small, small, large, small, wide):
        out = graphed(*inputs)
        assert out.shape == inputs[0].shape
    assert graphed.captures == 3 and len(graphed.graphs) == 2
    graphed(*large)  # evicted by `wide` (small was used more recently): captured again
    assert graphed.captures == 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_triton_backend_image_matches_torch_backend_on_cuda(tiny_model_dir, dtype):
    kwargs = dict(steps=8, seed=3, height=32, width=48)
    ref = Pipeline.from_pretrained(tiny_model_dir, device="cuda", dtype="fp32")("a red circle", **kwargs)[0]
    image = Pipeline.from_pretrained(tiny_model_dir, backend="triton", device="cuda", dtype=dtype)(
        "a red circle", **kwargs)[0]
    db = psnr(torch.from_numpy(np.array(image)), torch.from_numpy(np.array(ref)))
    assert db >= IMAGE_PSNR_DB[dtype], f"triton {dtype} image PSNR {db:.1f} dB against the fp32 torch backend"
