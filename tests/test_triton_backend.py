"""The `triton` backend against the `torch` backend.

On the CPU (conftest.py sets TRITON_INTERPRET=1) the kernels run in Triton's interpreter,
eagerly, in fp32, on the tiny model: the DiT call and whole CFG sampling runs are compared.
The tests marked `gpu` check CUDA-graph capture/replay, the graph cache and the image against
the torch backend in fp16/bf16.
"""

import numpy as np
import pytest
import torch

from ldm_rt.backends import eager_step, triton_backend
from ldm_rt.errors import InputError
from ldm_rt.model_dir import load_model_dir
from ldm_rt.parity import IMAGE_PSNR_DB, compare, psnr
from ldm_rt.pipeline import Pipeline
from ldm_rt.precision import Precision

from kernel_helpers import count_kernel_calls


def dit_inputs(cfg, batch=3, h=8, w=6, m=7, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, m, cfg.context_dim, generator=g)
    mask = torch.arange(m)[None, :] < torch.tensor([m, 2, 5][:batch])[:, None]  # rows padded differently
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    return (latents.to(device, dtype), t.to(device), text.to(device, dtype), mask.to(device), pooled.to(device, dtype))


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
    # per block: self- and cross-attention, the attention's adaLN, the residual fused with the
    # MLP's adaLN; plus the final layer's adaLN
    assert calls == {"attention": 2 * depth, "layernorm_modulate": depth + 1,
                     "gated_residual_layernorm_modulate": depth}, calls
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
def test_cuda_graph_steps_match_eager_kernels(tiny_model_dir, dtype):
    """Whole CFG steps replayed from CUDA graphs against the same kernels run eagerly: one capture
    per CFG mode serves other schedules, guidance scales and seeds (stale static buffers or a
    number baked into the capture would give another image)."""
    graphed = Pipeline.from_pretrained(tiny_model_dir, backend="triton", device="cuda", dtype=dtype)
    eager = Pipeline.from_pretrained(tiny_model_dir, backend="triton", device="cuda", dtype=dtype)
    assert isinstance(graphed.run_step, triton_backend.StepGraphs)
    eager.run_step = eager_step
    for kwargs in (dict(steps=3, guidance=4.0, seed=1), dict(steps=6, guidance=2.0, seed=2),
                   dict(steps=2, guidance=1.0, seed=3)):
        got = graphed.generate("a red circle", height=32, width=48, **kwargs).images[0]
        want = eager.generate("a red circle", height=32, width=48, **kwargs).images[0]
        db = psnr(torch.from_numpy(np.array(got)), torch.from_numpy(np.array(want)))
        assert db >= IMAGE_PSNR_DB[dtype], f"{kwargs}: graphed vs eager kernels PSNR {db:.1f} dB"
    assert graphed.run_step.captures == 2  # with and without CFG


@pytest.mark.gpu
def test_graph_cache_captures_once_per_size_and_evicts(tiny_model_dir):
    pipe = Pipeline.from_pretrained(tiny_model_dir, backend="triton", device="cuda", dtype="fp16")
    graphs = pipe.run_step
    graphs.max_graphs = 2
    small, large, wide = (16, 16), (32, 24), (16, 40)
    for height, width in (small, small, large, small, wide):
        image = pipe.generate("a red circle", steps=2, height=height, width=width).images[0]
        assert image.size == (width, height)
    assert graphs.captures == 3 and len(graphs.graphs) == 2
    pipe.generate("a red circle", steps=2, height=large[0], width=large[1])  # evicted by `wide`: captured again
    assert graphs.captures == 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_triton_backend_image_matches_torch_backend_on_cuda(tiny_model_dir, dtype):
    kwargs = dict(steps=8, seed=3, height=32, width=48)
    ref = Pipeline.from_pretrained(tiny_model_dir, device="cuda", dtype="fp32")("a red circle", **kwargs)[0]
    image = Pipeline.from_pretrained(tiny_model_dir, backend="triton", device="cuda", dtype=dtype)(
        "a red circle", **kwargs)[0]
    db = psnr(torch.from_numpy(np.array(image)), torch.from_numpy(np.array(ref)))
    assert db >= IMAGE_PSNR_DB[dtype], f"triton {dtype} image PSNR {db:.1f} dB against the fp32 torch backend"
