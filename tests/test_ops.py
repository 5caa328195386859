"""ops.py: the references every kernel is held to, checked against diffusers and by properties."""

import pytest
import torch

from ldm_rt import ops
from ldm_rt.parity import compare


def _flux_rope(height, width, axes_dim, theta=10000.0):
    """diffusers' FluxPosEmbed on (row, col) ids: cos/sin (N, head_dim), repeat-interleaved."""
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    ids = torch.stack([rows, cols], dim=-1).float()  # (N, 2)
    return FluxPosEmbed(theta=int(theta), axes_dim=list(axes_dim))(ids)


@pytest.mark.parametrize("height,width,axes_dim", [(5, 7, (36, 36)), (3, 4, (8, 8)), (1, 9, (32, 32)), (4, 4, (20, 16))])
def test_rope_equals_diffusers_flux(height, width, axes_dim):
    from diffusers.models.embeddings import apply_rotary_emb

    g = torch.Generator().manual_seed(0)
    head_dim = sum(axes_dim)
    x = torch.randn(3, 2, height * width, head_dim, generator=g)
    cos_ref, sin_ref = _flux_rope(height, width, axes_dim)
    expected = apply_rotary_emb(x, (cos_ref, sin_ref), use_real=True, use_real_unbind_dim=-1)

    cos, sin = ops.rope_freqs(height, width, axes_dim)
    assert cos.shape == (height * width, head_dim // 2)
    torch.testing.assert_close(cos, cos_ref[:, ::2].float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(ops.apply_rope(x, cos, sin), expected, atol=1e-5, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    """<R(p) q, R(p') k> is a function of p - p' for 2D positions p = (row, col)."""
    g = torch.Generator().manual_seed(1)
    h, w, axes = 6, 7, (12, 12)
    cos, sin = ops.rope_freqs(h, w, axes)
    q = torch.randn(24, generator=g).expand(1, 1, h * w, 24)  # the same vector at every position
    k = torch.randn(24, generator=g).expand(1, 1, h * w, 24)
    rq, rk = ops.apply_rope(q, cos, sin)[0, 0], ops.apply_rope(k, cos, sin)[0, 0]

    def score(pq, pk):
        return rq[pq[0] * w + pq[1]] @ rk[pk[0] * w + pk[1]]

    offset = (1, -2)
    base = score((2, 3), (2 - offset[0], 3 - offset[1]))
    for pq in [(1, 2), (3, 0), (4, 4), (5, 1)]:
        pk = (pq[0] - offset[0], pq[1] - offset[1])
        if 0 <= pk[0] < h and 0 <= pk[1] < w:
            torch.testing.assert_close(score(pq, pk), base, atol=1e-5, rtol=1e-5)
    # and it does change with the offset (the test would pass for a no-op otherwise)
    assert abs(score((2, 3), (2, 3)) - base) > 1e-3


def _naive_attention(q, k, v, mask=None):
    s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (s.softmax(-1) @ v.double()).to(q.dtype)


@pytest.mark.parametrize("nq,nk,d", [(1, 1, 64), (77, 100, 72), (100, 77, 16), (257, 257, 128)])
def test_attention_references_agree(nq, nk, d):
    g = torch.Generator().manual_seed(nq + nk + d)
    q, k, v = (torch.randn(3, 2, n, d, generator=g) for n in (nq, nk, nk))
    mask = torch.ones(3, nk, dtype=torch.bool)
    mask[1, max(1, nk // 2):] = False  # rows padded at different lengths
    mask[2, max(1, nk - 3):] = False
    ref = _naive_attention(q, k, v, mask)
    for impl in (ops.attention, ops.sdpa_attention):
        result = compare(impl(q, k, v, key_padding_mask=mask), ref, "op", "fp32")
        assert result.passed, f"{impl.__name__}: {result}"


def test_attention_with_rope_equals_rotate_then_attend():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 4, 35, 72, generator=g) for _ in range(3))
    cos, sin = ops.rope_freqs(5, 7, (36, 36))
    ref = _naive_attention(ops.apply_rope(q, cos, sin), ops.apply_rope(k, cos, sin), v)
    for impl in (ops.attention, ops.sdpa_attention):
        assert compare(impl(q, k, v, cos=cos, sin=sin), ref, "op", "fp32").passed


def test_bf16_references_stay_close_to_fp32():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 33, 64, generator=g) for _ in range(3))
    ref = ops.attention(q, k, v)
    out = ops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert compare(out, ref, "op", "bf16").passed
    x = torch.randn(2, 9, 1152, generator=g) * 50  # large activations: fp32 statistics matter
    shift, scale = torch.randn(2, 1152, generator=g), torch.randn(2, 1152, generator=g)
    ref = ops.layernorm_modulate(x, shift, scale)
    out = ops.layernorm_modulate(x.bfloat16(), shift.bfloat16(), scale.bfloat16())
    assert compare(out, ref, "op", "bf16").passed


def test_layernorm_modulate_matches_definition():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 11, 72, generator=g)
    shift, scale = torch.randn(3, 72, generator=g), torch.randn(3, 72, generator=g)
    ln = torch.nn.functional.layer_norm(x, (72,), eps=1e-6)
    torch.testing.assert_close(ops.layernorm_modulate(x, shift, scale), ln * (1 + scale[:, None]) + shift[:, None])


def test_use_swaps_and_restores():
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        return ops.attention(*args, **kwargs)

    q = torch.randn(1, 1, 4, 8)
    with ops.use(attention=fake):
        ops.impl("attention")(q, q, q)
    ops.impl("attention")(q, q, q)
    assert calls == [1]
    with pytest.raises(KeyError):
        with ops.use(not_a_swap_point=fake):
            pass
