"""FLUX.1 on the `triton` backend: the kernels at Flux's shapes, the Flux transformer with the
kernels against the reference, whole sampling runs against the torch backend, and the step's
fitness for one CUDA graph.

On the CPU (conftest.py sets TRITON_INTERPRET=1) the kernels run in Triton's interpreter in fp32.
Flux's attention is joint: [text; image] tokens in one sequence, RoPE from 3-axis position ids
(0, row, col) with text ids all zero (no rotation), pairs interleaved; head dim 128 with
axes_dims_rope (16, 56, 56) as FLUX.1. diffusers' own RoPE (`FluxPosEmbed` + `apply_rotary_emb`)
is the independent reference of the convention. The tests marked `gpu` check fp16/bf16 and
CUDA-graph capture and replay of the whole Flux step.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ldm_rt import kernels, ops
from ldm_rt.backends import eager_step, triton_backend
from ldm_rt.families.flux import flux_step
from ldm_rt.families.flux.sampling import latent_image_ids, text_ids
from ldm_rt.families.flux.transformer import FluxConfig, FluxTransformer2DModel
from ldm_rt.model_dir import init_model
from ldm_rt.parity import IMAGE_PSNR_DB, compare, psnr
from ldm_rt.pipeline import Pipeline
from ldm_rt.schedulers import FlowMatchEuler

from kernel_helpers import SWAPS, count_kernel_calls

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AXES = (16, 56, 56)  # FLUX.1's axes_dims_rope: head dim 128
# One double- and one single-stream block of FLUX.1's head dim, 3 heads (inner dim 384).
FLUX_128 = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=3,
                      joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=AXES)
PROMPT = "a photo of a red fox in the snow"


def randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def joint_tables(m: int, gh: int, gw: int, axes=AXES):
    """cos, sin (M + N, D/2) of Flux's joint sequence: M text tokens (ids 0), then a gh x gw image grid."""
    ids = torch.cat([text_ids(m), latent_image_ids(gh, gw)]).to(DEVICE)
    return ops.rope_freqs_from_ids(ids, axes)


def diffusers_rope(x: torch.Tensor, m: int, gh: int, gw: int, axes=AXES) -> torch.Tensor:
    """diffusers' Flux RoPE on x (B, H, M + N, D): FluxPosEmbed's tables, apply_rotary_emb (real, pairs)."""
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.cat([text_ids(m), latent_image_ids(gh, gw)]).to(DEVICE)
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)  # each (M + N, D), repeat-interleaved
    return apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1)


# --------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("m,gh,gw", [(7, 3, 5), (12, 1, 9)])
def test_rope_kernel_is_fluxs_rope(m, gh, gw):
    """The RoPE kernel on Flux's joint tables (odd token counts 22 and 21, head dim 128) equals
    ops.apply_rope and diffusers' Flux RoPE; text tokens (ids 0) come out unrotated."""
    x = randn(2, 3, m + gh * gw, 128, seed=0)
    cos, sin = joint_tables(m, gh, gw)
    out = kernels.apply_rope(x, cos, sin)
    for ref in (ops.apply_rope(x, cos, sin), diffusers_rope(x, m, gh, gw)):
        result = compare(out, ref, "op", "fp32")
        assert result.passed, str(result)
    assert torch.equal(out[:, :, :m], x[:, :, :m])  # cos 1, sin 0: text keeps its q and k
    assert not torch.allclose(out[:, :, m + 1:], x[:, :, m + 1:])  # image tokens past (0, 0, 0) rotate


@pytest.mark.parametrize("m,gh,gw,batch", [(7, 3, 5, 2), (5, 2, 3, 3)])
def test_fused_rope_attention_is_fluxs_joint_attention(m, gh, gw, batch):
    """The attention kernel with cos/sin on the joint [text; image] sequence (head dim 128; 22 and
    11 tokens) equals the reference and diffusers' RoPE followed by SDPA."""
    n = m + gh * gw
    q, k, v = (randn(batch, 3, n, 128, seed=s) for s in (1, 2, 3))
    cos, sin = joint_tables(m, gh, gw)
    out = kernels.attention(q, k, v, cos=cos, sin=sin)
    theirs = F.scaled_dot_product_attention(diffusers_rope(q, m, gh, gw), diffusers_rope(k, m, gh, gw), v)
    for ref in (ops.attention(q, k, v, cos=cos, sin=sin), theirs):
        result = compare(out, ref, "op", "fp32")
        assert result.passed, str(result)


@pytest.mark.parametrize("n,d", [(23, 3072), (1, 384)])
def test_adaln_kernels_at_flux_widths(n, d):
    """FLUX.1's width 3072 (24 heads of 128), an odd token count, and one token."""
    x, y = randn(2, n, d, seed=4) * 2 + 0.5, randn(2, n, d, seed=5)
    gate, shift, scale = (randn(2, d, seed=s) for s in (6, 7, 8))
    for out, ref in ((kernels.layernorm_modulate(x, shift, scale), ops.layernorm_modulate(x, shift, scale)),
                     *zip(kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale),
                          ops.gated_residual_layernorm_modulate(x, y, gate, shift, scale))):
        result = compare(out, ref, "op", "fp32")
        assert result.passed, str(result)


# --------------------------------------------------------------------------------- transformer


def seeded_flux(config: FluxConfig, seed: int = 0) -> FluxTransformer2DModel:
    """A Flux transformer with every weight non-zero (N(0, 0.05)); zero-initialised gates would hide blocks."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def flux_inputs(config: FluxConfig, batch=2, m=7, gh=3, gw=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, gh * gw, config.in_channels, generator=g),
            torch.randn(batch, m, config.joint_attention_dim, generator=g),
            torch.randn(batch, config.pooled_projection_dim, generator=g), torch.rand(batch, generator=g),
            latent_image_ids(gh, gw), text_ids(m), torch.full((batch,), 3.5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter path")
def test_flux_transformer_with_kernels_matches_reference(monkeypatch):
    """Both block kinds at head dim 128 through the triton backend's KernelModule, against the
    reference (fp32 table row); every swap point really reaches a kernel."""
    model = seeded_flux(FLUX_128)
    inputs = flux_inputs(FLUX_128)
    with torch.no_grad():
        ref = model(*inputs)
    calls = count_kernel_calls(monkeypatch, (*SWAPS, "rms_norm"))
    out = triton_backend.KernelModule(model)(*inputs)
    # double block: joint attention, two adaLNs (image, text), two residual+adaLNs; single block:
    # attention, adaLN; the final AdaLayerNormContinuous: one adaLN; qk-norm: q, k of each stream (4
    # in the double block, 2 in the single one)
    assert calls == {"attention": 2, "layernorm_modulate": 2 + 1 + 1, "gated_residual_layernorm_modulate": 2,
                     "rms_norm": 4 + 2}, calls
    result = compare(out, ref, "transformer", "fp32")
    print(f"flux transformer, head dim 128, triton kernels vs reference: {result}")
    assert result.passed, str(result)


class HostReads(TorchDispatchMode):
    """Records every op that reads or writes host memory while the step's tensors are on `meta`:
    a CPU tensor among an op's arguments or results is a host <-> device copy on CUDA (a sync, or
    forbidden while a CUDA graph captures); `.item()`, a data-dependent shape, or a Python branch on
    a tensor's value fail outright on meta tensors, which have no values."""

    def __init__(self):
        super().__init__()
        self.host, self.ops = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        flat = [*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else (out,))]
        if any(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in flat):
            self.host.append(str(func))
        return out


@pytest.mark.parametrize("true_cfg", [False, True])
def test_flux_step_needs_nothing_from_the_host(true_cfg):
    """The whole Flux step (flux_step: ids and RoPE tables from the shapes, the transformer with
    the kernels, true CFG, the Euler update) runs on meta tensors with no host transfer, so a CUDA
    graph can capture it: the CPU's stand-in for the capture that the `gpu` tests below run."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(FLUX_128).eval()
        rows = 4 if true_cfg else 2
        latents, t, coefficients = torch.empty(2, 3, 5, 64), torch.empty(2), torch.empty(1)
        guidance, txt_ids = torch.empty(()), torch.empty(7, 3)
        embeds, pooled = torch.empty(rows, 7, FLUX_128.joint_attention_dim), torch.empty(rows, 20)
    step = functools.partial(flux_step, triton_backend.KernelModule(model), FlowMatchEuler.update,
                             guidance_embeds=True, true_cfg_scale=3.0, dtype=torch.float32)
    with HostReads() as mode:
        out = step(latents, t, coefficients, guidance, embeds, pooled, txt_ids)
    assert out.shape == latents.shape and out.device.type == "meta"
    assert {"ldm_rt.attention.default", "ldm_rt.layernorm_modulate.default", "ldm_rt.rms_norm.default"} <= mode.ops
    assert mode.host == [], f"host transfers in the Flux step: {mode.host}"


# --------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("flux") / "tiny", "flux-tiny", seed=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter path")
@pytest.mark.parametrize("extra", [{}, dict(negative_prompt="blurry", true_cfg_scale=2.5)])
def test_flux_image_on_triton_matches_torch_backend(flux_dir, extra):
    """A whole FLUX.1 run (CLIP + T5 eager, transformer steps with the kernels, dev-like embedded
    guidance, and with true CFG the doubled batch, the VAE) against the torch backend. 16 T5 tokens
    keep the interpreter's joint attention small."""
    kwargs = dict(steps=2, guidance=3.5, seed=5, height=32, width=48, max_sequence_length=16, **extra)
    ref = Pipeline.from_pretrained(flux_dir, device="cpu", dtype="fp32").generate(PROMPT, **kwargs).images[0]
    pipe = Pipeline.from_pretrained(flux_dir, backend="triton", device="cpu", dtype="fp32")
    assert isinstance(pipe.transformer, triton_backend.KernelModule)
    image = pipe.generate(PROMPT, **kwargs).images[0]
    assert np.asarray(ref).std() > 5  # an image, not a constant
    db = psnr(torch.from_numpy(np.array(image)), torch.from_numpy(np.array(ref)))
    print(f"flux triton vs torch backend {extra or ''}: PSNR {db:.1f} dB")
    assert db >= IMAGE_PSNR_DB["fp32"], f"triton image PSNR {db:.1f} dB against the torch backend"


# --------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_flux_kernels_at_flux_shapes_on_cuda(dtype):
    """Head dim 128, 24 heads, 512 text + 1024 image tokens (a 512 px FLUX.1-dev request), in the
    table's op rows for the dtype."""
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    q, k, v = (randn(1, 24, 512 + 32 * 32, 128, seed=s, dtype=dt) for s in (1, 2, 3))
    cos, sin = joint_tables(512, 32, 32)
    out = kernels.attention(q, k, v, cos=cos, sin=sin)
    ref = ops.attention(q.float(), k.float(), v.float(), cos=cos, sin=sin)
    result = compare(out.float(), ref, "op", dtype)
    assert result.passed, str(result)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_flux_cuda_graph_steps_match_eager_kernels(flux_dir, dtype):
    """Whole Flux steps replayed from CUDA graphs against the same kernels run eagerly: one capture
    per (CFG mode, size) serves other schedules, guidance values and seeds."""
    graphed = Pipeline.from_pretrained(flux_dir, backend="triton", device="cuda", dtype=dtype)
    eager = Pipeline.from_pretrained(flux_dir, backend="triton", device="cuda", dtype=dtype)
    assert isinstance(graphed.run_step, triton_backend.StepGraphs)
    eager.run_step = eager_step
    for kwargs in (dict(steps=3, guidance=3.5, seed=1), dict(steps=5, guidance=1.5, seed=2),
                   dict(steps=2, guidance=4.0, seed=3, negative_prompt="blurry", true_cfg_scale=2.0)):
        got = graphed.generate(PROMPT, height=32, width=48, **kwargs).images[0]
        want = eager.generate(PROMPT, height=32, width=48, **kwargs).images[0]
        db = psnr(torch.from_numpy(np.array(got)), torch.from_numpy(np.array(want)))
        assert db >= IMAGE_PSNR_DB[dtype], f"{kwargs}: graphed vs eager kernels PSNR {db:.1f} dB"
    assert graphed.run_step.captures == 2  # with and without true CFG


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_flux_triton_image_matches_fp32_torch_on_cuda(flux_dir, dtype):
    kwargs = dict(steps=4, guidance=3.5, seed=3, height=48, width=64)
    ref = Pipeline.from_pretrained(flux_dir, device="cuda", dtype="fp32")(PROMPT, **kwargs)[0]
    image = Pipeline.from_pretrained(flux_dir, backend="triton", device="cuda", dtype=dtype)(PROMPT, **kwargs)[0]
    db = psnr(torch.from_numpy(np.array(image)), torch.from_numpy(np.array(ref)))
    assert db >= IMAGE_PSNR_DB[dtype], f"flux triton {dtype} image PSNR {db:.1f} dB against the fp32 torch backend"
