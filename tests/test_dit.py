"""The DiT reference: properties that hold by construction of the paper's design."""

import pytest
import torch

from ldm_rt.configs import PRESETS, DiTConfig
from ldm_rt.model_dir import randomize_
from ldm_rt.models.dit import DiT
from ldm_rt.parity import compare

CONFIG = DiTConfig(sample_size=8, hidden_size=72, depth=2, num_heads=2, context_dim=24, pooled_dim=20, qk_norm=True)


def _model(config=CONFIG, seed=0):
    model = DiT(config).eval()
    randomize_(model, torch.Generator().manual_seed(seed))
    return model


def _inputs(config=CONFIG, batch=3, h=6, w=10, m=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config.in_channels, h, w, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, m, config.context_dim, generator=g)
    mask = torch.ones(batch, m, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 5:] = False
    pooled = torch.randn(batch, config.pooled_dim, generator=g)
    return latents, t, text, mask, pooled


def test_shapes_at_odd_resolution():
    model = _model()
    for h, w in [(6, 10), (2, 2), (14, 4)]:
        out = model(*_inputs(h=h, w=w))
        assert out.shape == (3, 4, h, w)
        assert torch.isfinite(out).all()


def test_training_init_block_is_identity():
    """adaLN-Zero: with the training init every block returns its input unchanged."""
    model = DiT(CONFIG).eval()
    model.initialize_weights()
    latents, t, text, mask, pooled = _inputs()
    x = torch.randn(3, 15, CONFIG.hidden_size)
    c = model.t_embedder(t) + model.pooled_embedder(pooled)
    cos, sin = model.rope(3, 5, x.device)
    for block in model.blocks:
        torch.testing.assert_close(block(x, c, text, mask, cos, sin), x, atol=0, rtol=0)
    assert model(latents, t, text, mask, pooled).abs().max() == 0  # zero final layer


def test_patchify_unpatchify_round_trip_and_conv_order():
    model = _model()
    x = torch.randn(2, 4, 6, 10)
    tokens = model.patchify(x)  # (B, N, p*p*C)
    assert tokens.shape == (2, 15, 16)
    torch.testing.assert_close(model.unpatchify(tokens, 3, 5), x, atol=0, rtol=0)
    # The patch-embedding conv sees the same (row-major) token order as unpatchify.
    w = model.x_embedder.proj.weight  # (D, C, p, p)
    as_linear = tokens @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T + model.x_embedder.proj.bias
    torch.testing.assert_close(model.x_embedder(x), as_linear, atol=1e-5, rtol=1e-5)


def test_padded_text_tokens_do_not_change_the_output():
    model = _model()
    latents, t, text, mask, pooled = _inputs()
    ref = model(latents, t, text, mask, pooled)
    noisy = text.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), CONFIG.context_dim) * 100
    torch.testing.assert_close(model(latents, t, noisy, mask, pooled), ref, atol=1e-5, rtol=0)
    # ...while a real token does change it
    noisy[0, 0] += 1
    assert (model(latents, t, noisy, mask, pooled) - ref).abs().max() > 1e-4


def test_cfg_batch_equals_separate_calls():
    model = _model()
    inputs = _inputs(batch=4)
    batched = model(*inputs)
    first = model(*(x[:2] for x in inputs))
    second = model(*(x[2:] for x in inputs))
    torch.testing.assert_close(batched, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


def test_every_input_matters():
    """Timestep, pooled text and text states all reach the output (nothing silently dropped)."""
    model = _model()
    latents, t, text, mask, pooled = _inputs()
    ref = model(latents, t, text, mask, pooled)
    for changed in (
        (latents, t + 1, text, mask, pooled),
        (latents, t, text, mask, pooled + 0.1),
        (latents, t, text + 0.1, mask, pooled),
    ):
        assert (model(*changed) - ref).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", ["bf16"])
def test_low_precision_within_table(dtype):
    model = _model()
    inputs = _inputs()
    ref = model(*inputs)
    low = DiT(CONFIG).eval()
    low.load_state_dict(model.state_dict())
    low = low.to(torch.bfloat16)
    out = low(*(x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs))
    result = compare(out.float(), ref, "transformer", dtype)
    assert result.passed, str(result)


def test_presets_have_the_paper_sizes():
    xl = PRESETS["dit-xl-2"]
    assert (xl.transformer.depth, xl.transformer.hidden_size, xl.transformer.num_heads) == (28, 1152, 16)
    assert xl.transformer.head_dim == 72
    assert xl.text_encoder.hidden_size == 768 and xl.text_encoder.num_hidden_layers == 12
    assert xl.text_encoder.max_position_embeddings == 77
    assert xl.vae.scale_factor == 8 and xl.vae.latent_channels == 4
    for name in ("dit-s-2", "dit-b-4", "dit-l-8", "dit-xl-4", "tiny"):
        assert name in PRESETS
    assert PRESETS["dit-s-8"].transformer.patch_size == 8


def test_rope_plus_sincos_is_rope_with_the_sincos_table_added_to_the_tokens():
    """pos_embed="rope+sincos" (the demo model) = the RoPE model fed tokens + sin-cos table."""
    from dataclasses import replace

    from ldm_rt.models.dit import sincos_pos_embed

    both_cfg = replace(CONFIG, pos_embed="rope+sincos")
    rope, both = _model(), DiT(both_cfg).eval()
    both.load_state_dict(rope.state_dict())  # no new parameters: the table is fixed
    inputs = _inputs(h=6, w=10)
    embed = rope.x_embedder.forward
    table = sincos_pos_embed(3, 5, CONFIG.hidden_size, CONFIG.sample_size // CONFIG.patch_size)  # (15, D)
    rope.x_embedder.forward = lambda x: embed(x) + table[None]
    expected = rope(*inputs)
    out = both(*inputs)
    assert torch.equal(out, expected)
    rope.x_embedder.forward = embed
    assert not torch.allclose(rope(*inputs), out)  # the table does change the output
    with pytest.raises(ValueError, match="rope, sincos, rope\\+sincos"):
        replace(CONFIG, pos_embed="learned")
