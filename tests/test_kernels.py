"""Triton kernels against their ldm_rt.ops references, judged by the tolerance table's `op` rows.

Without a GPU they run on CPU tensors in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1); with one, the same tests run compiled on CUDA, plus the bf16 cases marked
`gpu`. The interpreter is slow (a 257-token attention takes seconds), so each parametrization
covers every listed size (N = 1, 77, 100, 257; D = 64, 72, 96, 128; batch 3) in some
combination rather than the full product.
"""

import sys

import pytest
import torch

import triton  # noqa: F401  (an oracle-style dependency: fail loudly, never skip, when it is missing)
from ldm_rt import kernels, ops
from ldm_rt.errors import InputError, MissingDependencyError
from ldm_rt.parity import compare

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAMES = {FP32: "fp32", FP16: "fp16", BF16: "bf16"}


def gpu(*values):
    return pytest.param(*values, marks=pytest.mark.gpu)


def randn(*shape, seed, dtype=FP32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def check(out, ref, dtype):
    """out (kernel, in `dtype`) against the fp32 reference computed from the same rounded inputs."""
    assert out.dtype == dtype
    result = compare(out.float(), ref.float(), "op", NAMES[dtype])
    assert result.passed, str(result)


def padding_mask(batch, nk, lengths):
    """(batch, nk) bool, True for the first lengths[b] keys of row b."""
    return torch.arange(nk, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]


# --------------------------------------------------------------------------------- adaLN


@pytest.mark.parametrize("n,d,dtype", [
    (1, 64, FP32), (77, 72, FP16), (100, 128, FP32), (257, 1152, FP16), (3, 8192, FP32), (2, 8192, FP16),
    (100, 1152, FP32), gpu(257, 1152, BF16), gpu(3, 8192, BF16),
])
def test_layernorm_modulate_matches_reference(n, d, dtype):
    x = randn(3, n, d, seed=0, dtype=dtype) * 2 + 0.5  # a mean and a spread away from 0/1
    shift, scale = randn(3, d, seed=1, dtype=dtype), randn(3, d, seed=2, dtype=dtype)
    out = kernels.layernorm_modulate(x, shift, scale, eps=1e-6)
    assert out.shape == x.shape and out.is_contiguous()
    check(out, ops.layernorm_modulate(x.float(), shift.float(), scale.float(), 1e-6), dtype)


@pytest.mark.parametrize("n,d,dtype,gated", [
    (1, 72, FP16, True), (77, 128, FP32, True), (100, 64, FP16, True), (257, 1152, FP32, True),
    (3, 8192, FP16, True), (77, 72, FP16, False), (100, 1152, FP32, False), gpu(100, 1152, BF16, True),
    gpu(257, 1152, BF16, False),
])
def test_gated_residual_layernorm_modulate_matches_reference(n, d, dtype, gated):
    """gated=False: gate None, the ungated residual of the cross-attention (h = x + y)."""
    x, y = randn(3, n, d, seed=0, dtype=dtype), randn(3, n, d, seed=1, dtype=dtype)
    gate, shift, scale = (randn(3, d, seed=s, dtype=dtype) for s in (2, 3, 4))
    gate = gate if gated else None
    h, out = kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale, eps=1e-5)
    h_ref, out_ref = ops.gated_residual_layernorm_modulate(
        x.float(), y.float(), None if gate is None else gate.float(), shift.float(), scale.float(), eps=1e-5)
    check(h, h_ref, dtype)
    check(out, out_ref, dtype)


@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_adaln_kernels_read_strided_inputs(dtype):
    """x transposed from (B, D, N), y a slice of a wider tensor, gate/shift/scale chunks of one
    (B, 6D) adaLN projection (how the DiT block produces them)."""
    b, n, d = 3, 77, 1152
    x = randn(b, d, n, seed=0, dtype=dtype).transpose(1, 2)  # (B, N, D), stride(-1) = N
    y = randn(b, n, d + 16, seed=1, dtype=dtype)[:, :, 8:8 + d]
    shift, scale, gate, *_ = randn(b, 6 * d, seed=2, dtype=dtype).chunk(6, dim=-1)
    assert not (x.is_contiguous() or y.is_contiguous() or shift.is_contiguous())
    check(kernels.layernorm_modulate(x, shift, scale), ops.layernorm_modulate(x.float(), shift.float(), scale.float()),
          dtype)
    h, out = kernels.gated_residual_layernorm_modulate(x, y, gate, shift, scale)
    h_ref, out_ref = ops.gated_residual_layernorm_modulate(*(t.float() for t in (x, y, gate, shift, scale)))
    check(h, h_ref, dtype)
    check(out, out_ref, dtype)


def test_layernorm_modulate_rejects_rows_beyond_registers():
    x = randn(1, 1, 16385, seed=0)
    with pytest.raises(ValueError, match="16384"):
        kernels.layernorm_modulate(x, x[:, 0], x[:, 0])


# --------------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("n,d,dtype,table_dtype", [
    (1, 64, FP32, FP32), (77, 72, FP16, FP32), (100, 128, FP32, FP32), (257, 72, FP16, FP16), (100, 96, FP16, FP32),
    gpu(257, 72, BF16, FP32), gpu(77, 128, BF16, BF16),
])
def test_apply_rope_matches_reference(n, d, dtype, table_dtype):
    x = randn(3, 2, n, d, seed=0, dtype=dtype)
    cos, sin = (t.to(device=DEVICE, dtype=table_dtype) for t in ops.rope_freqs(1, n, (d // 2, d // 2)))
    out = kernels.apply_rope(x, cos, sin)
    assert out.shape == x.shape and out.is_contiguous()
    check(out, ops.apply_rope(x.float(), cos.float(), sin.float()), dtype)


@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_apply_rope_reads_strided_inputs(dtype):
    """x permuted from (B, N, H, D) as the DiT's qkv split makes it; tables as column slices."""
    b, h, n, d = 3, 2, 77, 72
    x = randn(b, n, h, d, seed=0, dtype=dtype).permute(0, 2, 1, 3)
    cos_full, sin_full = ops.rope_freqs(7, 11, (d, d))  # (N, d): take every other column
    cos, sin = cos_full.to(DEVICE)[:, ::2], sin_full.to(DEVICE)[:, ::2]
    assert not (x.is_contiguous() or cos.is_contiguous())
    check(kernels.apply_rope(x, cos, sin), ops.apply_rope(x.float(), cos, sin), dtype)


# --------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("shape,d,dtype,eps", [
    ((3, 2, 77), 72, FP32, 1e-6), ((3, 3, 257), 128, FP16, 1e-6), ((3, 100), 64, FP32, 1e-5), ((3, 4, 1), 128, FP32, 1e-6),
    ((2, 1), 8192, FP16, 1e-6), gpu((3, 24, 1024), 128, BF16, 1e-6), gpu((3, 16, 257), 72, BF16, 1e-6),
])
def test_rms_norm_matches_reference(shape, d, dtype, eps):
    x = randn(*shape, d, seed=0, dtype=dtype) * 3 + 0.5  # rows far from unit RMS
    weight = randn(d, seed=1, dtype=dtype)
    out = kernels.rms_norm(x, weight, eps)
    assert out.shape == x.shape and out.is_contiguous()
    check(out, ops.rms_norm(x.float(), weight.float(), eps), dtype)


@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_rms_norm_reads_head_views_in_place(dtype):
    """q as the qk-norm gets it: the (B, H, N, Dh) transposed view of a (B, N, H * Dh) projection,
    and a weight that is a strided slice."""
    b, n, h, d = 3, 77, 2, 72
    q = randn(b, n, h * d, seed=0, dtype=dtype).unflatten(-1, (h, d)).transpose(1, 2)
    weight = randn(2 * d, seed=1, dtype=dtype)[::2]
    assert not (q.is_contiguous() or weight.is_contiguous())
    check(kernels.rms_norm(q, weight), ops.rms_norm(q.float(), weight.float()), dtype)


def test_rms_norm_is_a_custom_op():
    x, w = randn(2, 3, 5, 16, seed=0), randn(16, seed=1)
    torch.library.opcheck(torch.ops.ldm_rt.rms_norm.default, (x, w, 1e-6))


# --------------------------------------------------------------------------------- attention


def attention_inputs(b, h, nq, nk, d, dtype, seed=0):
    return randn(b, h, nq, d, seed=seed, dtype=dtype), randn(b, h, nk, d, seed=seed + 1, dtype=dtype), \
        randn(b, h, nk, d, seed=seed + 2, dtype=dtype)


def reference_attention(q, k, v, **kwargs):
    kwargs = {k_: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for k_, t in kwargs.items()}
    return ops.attention(q.float(), k.float(), v.float(), **kwargs)


@pytest.mark.parametrize("n,d,dtype", [
    (1, 64, FP32), (77, 72, FP16), (100, 128, FP16), (100, 96, FP32), (257, 64, FP16),
    gpu(257, 72, BF16), gpu(1024, 128, BF16), gpu(1024, 72, FP16),
])
def test_self_attention_with_fused_rope_matches_reference(n, d, dtype):
    q, k, v = attention_inputs(3, 2, n, n, d, dtype)
    cos, sin = (t.to(DEVICE) for t in ops.rope_freqs(1, n, (d // 2, d // 2)))
    out = kernels.attention(q, k, v, cos=cos, sin=sin)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    check(out, reference_attention(q, k, v, cos=cos, sin=sin), dtype)


@pytest.mark.parametrize("nq,d,dtype", [(100, 72, FP16), (257, 128, FP32), (1, 64, FP16), gpu(257, 72, BF16)])
def test_cross_attention_with_padded_keys_matches_reference(nq, d, dtype):
    """77 text keys, rows padded at different lengths (77, 5, 40): every key block is partly
    or wholly padding in some row."""
    q, k, v = attention_inputs(3, 2, nq, 77, d, dtype, seed=3)
    mask = padding_mask(3, 77, [77, 5, 40])
    check(kernels.attention(q, k, v, key_padding_mask=mask), reference_attention(q, k, v, key_padding_mask=mask), dtype)


def test_attention_without_rope_or_mask_and_more_keys_than_queries():
    q, k, v = attention_inputs(3, 2, 77, 257, 128, FP16, seed=5)
    check(kernels.attention(q, k, v, scale=0.05), reference_attention(q, k, v, scale=0.05), FP16)


@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_attention_reads_strided_inputs(dtype):
    """q, k, v as views of one fused qkv projection (B, N, 3, H, D), the mask a column slice,
    cos/sin column slices; RoPE and a mask together."""
    b, h, n, d = 3, 2, 100, 72
    qkv = randn(b, n, 3, h, d, seed=0, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, D), non-contiguous
    mask = padding_mask(b, n + 3, [n + 3, 60, 97])[:, 3:]
    cos_full, sin_full = ops.rope_freqs(10, 10, (d, d))
    cos, sin = cos_full.to(DEVICE)[:, ::2], sin_full.to(DEVICE)[:, ::2]
    assert not (q.is_contiguous() or mask.is_contiguous() or cos.is_contiguous())
    out = kernels.attention(q, k, v, key_padding_mask=mask, cos=cos, sin=sin)
    check(out, reference_attention(q, k, v, key_padding_mask=mask, cos=cos, sin=sin), dtype)


def test_alignment_is_what_the_tensors_allow():
    """The launcher tells the kernel how many elements every row start is a multiple of (16 bytes
    at most); it must never claim more than the pointers and strides give."""
    from ldm_rt.kernels.flash_attention import aligned_elements

    qkv = torch.zeros(2, 100, 3, 16, 72, dtype=FP16)  # DiT-XL: head stride 72, row stride 3456
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    assert aligned_elements(q, k, v) == 8  # 16 bytes
    assert aligned_elements(q.float(), k.float()) == 4  # 16 bytes of fp32
    assert aligned_elements(torch.zeros(2, 3, 5, 36, dtype=FP16)) == 4  # rows of 36 elements
    wide = torch.zeros(2, 3, 5, 80, dtype=FP16)
    assert aligned_elements(wide[..., 1:73]) == 1  # starts one element past an aligned pointer
    assert aligned_elements(wide[..., 2:74]) == 2
    assert aligned_elements(q, wide[..., 1:73]) == 1  # the least aligned tensor decides


@pytest.mark.parametrize("offset", [1, 2, 4])
def test_attention_reads_rows_at_any_alignment(offset):
    """Views that start 1, 2 or 4 elements past an aligned pointer (ALIGN 1, 2, 4): the strides
    the launcher divides by ALIGN and the kernel multiplies back must address the same rows."""
    from ldm_rt.kernels.flash_attention import aligned_elements

    b, h, n, d = 3, 2, 77, 72
    wide = randn(b, h, n, d + 8, seed=11, dtype=FP16)
    q, k, v = (wide[..., offset:offset + d] for _ in range(3))
    k = k.flip(2)  # another order of the same rows, so k differs from q
    assert aligned_elements(q, k, v) == offset
    cos, sin = (t.to(DEVICE) for t in ops.rope_freqs(1, n, (d // 2, d // 2)))
    check(kernels.attention(q, k, v, cos=cos, sin=sin), reference_attention(q, k, v, cos=cos, sin=sin), FP16)


def test_head_dim_split_and_padding_agree():
    """72 runs as 64 + 16 (8 masked); forcing one padded 128 block gives the same result."""
    from ldm_rt.kernels.flash_attention import attention as launch, head_dim_blocks

    assert [head_dim_blocks(d) for d in (64, 72, 96, 128)] == [(64, 0), (64, 16), (64, 32), (128, 0)]
    assert head_dim_blocks(72, pad=True) == (128, 0)
    q, k, v = attention_inputs(3, 2, 77, 77, 72, FP32, seed=7)
    split, padded = launch(q, k, v), launch(q, k, v, pad_head_dim=True)
    check(split, reference_attention(q, k, v), FP32)
    check(padded, reference_attention(q, k, v), FP32)


def test_attention_row_with_no_valid_key_is_zero():
    q, k, v = attention_inputs(2, 1, 5, 9, 64, FP32, seed=9)
    mask = padding_mask(2, 9, [9, 0])
    out = kernels.attention(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    check(out[:1], reference_attention(q[:1], k[:1], v[:1], key_padding_mask=mask[:1]), FP32)


def test_attention_rejects_bad_inputs():
    q, k, v = attention_inputs(1, 1, 4, 6, 64, FP32)
    cos = torch.ones(4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="Nq = Nk"):
        kernels.attention(q, k, v, cos=cos, sin=cos)
    with pytest.raises(ValueError, match="key_padding_mask"):
        kernels.attention(q, k, v, key_padding_mask=torch.ones(1, 5, dtype=torch.bool, device=DEVICE))


# --------------------------------------------------------------------------------- registration


def test_kernels_are_torch_custom_ops():
    """Each kernel is a torch.library op with a fake: opcheck runs it for real, under fake
    tensors and through AOT dispatch, and compares."""
    x, s = randn(2, 5, 72, seed=0), randn(2, 72, seed=1)
    q, kv = randn(2, 2, 5, 16, seed=2), randn(2, 2, 7, 16, seed=3)
    mask = padding_mask(2, 7, [7, 3])
    table = randn(5, 8, seed=4)
    cases = {
        "layernorm_modulate": (x, s, s * 2, 1e-6),
        "gated_residual_layernorm_modulate": (x, x * 2, s, s * 3, s * 4, 1e-6),
        "apply_rope": (q, table, table * 2),
        "attention": (q, kv, kv * 2, mask, None, None, 0.3),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.ldm_rt, name).default, args)
    torch.library.opcheck(torch.ops.ldm_rt.gated_residual_layernorm_modulate.default, (x, x * 2, None, s, s * 3, 1e-6))
    q5 = randn(2, 2, 5, 16, seed=5)
    torch.library.opcheck(torch.ops.ldm_rt.attention.default, (q5, q5 * 2, q5 * 3, None, table, table * 2, None))


def test_kernels_trace_as_single_nodes_under_torch_compile():
    """fullgraph=True: no graph break around the ops; the traced graph calls them by name."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    def block(x, shift, scale, q, mask):
        return kernels.layernorm_modulate(x, shift, scale), kernels.attention(q, q, q, key_padding_mask=mask)

    x, s, q = randn(2, 5, 64, seed=0), randn(2, 64, seed=1), randn(2, 2, 5, 16, seed=2)
    mask = padding_mask(2, 5, [5, 2])
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    out = compiled(x, s, s, q, mask)
    eager = block(x, s, s, q, mask)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    code = graphs[0].code
    assert "ldm_rt.layernorm_modulate" in code and "ldm_rt.attention" in code, code


def test_kernels_export_as_one_named_node_each():
    """torch.export of a block that calls every kernel: each is one `ldm_rt.<name>` node of the
    exported graph (traced through the fakes; nothing is decomposed into aten ops)."""

    class Block(torch.nn.Module):
        def forward(self, x, y, shift, scale, q, mask, cos, sin):
            h, out = kernels.gated_residual_layernorm_modulate(x, y, shift, shift, scale)
            ungated = kernels.gated_residual_layernorm_modulate(h, y, None, shift, scale)[1]
            return (kernels.layernorm_modulate(out + ungated, shift, scale), kernels.apply_rope(q, cos, sin),
                    kernels.attention(q, q, q, key_padding_mask=mask), kernels.attention(q, q, q, cos=cos, sin=sin))

    x, y, s = randn(2, 5, 64, seed=0), randn(2, 5, 64, seed=3), randn(2, 64, seed=1)
    q, table = randn(2, 2, 5, 16, seed=2), randn(5, 8, seed=4)
    program = torch.export.export(Block(), (x, y, s, s, q, padding_mask(2, 5, [5, 2]), table, table))
    targets = sorted(str(n.target) for n in program.graph.nodes if n.op == "call_function"
                     and str(n.target).startswith("ldm_rt."))
    assert targets == ["ldm_rt.apply_rope.default", "ldm_rt.attention.default", "ldm_rt.attention.default",
                       "ldm_rt.gated_residual_layernorm_modulate.default",
                       "ldm_rt.gated_residual_layernorm_modulate.default", "ldm_rt.layernorm_modulate.default"], targets


def test_missing_triton_is_one_sentence_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    x = randn(1, 2, 8, seed=0)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ldm-rt\[triton\]'"):
        kernels.layernorm_modulate(x, x[:, 0], x[:, 0])


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU-tensor error outside the interpreter")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = randn(1, 2, 8, seed=0)
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        kernels.layernorm_modulate(x, x[:, 0], x[:, 0])
