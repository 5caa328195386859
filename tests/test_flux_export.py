"""FLUX.1 export specs on tiny configs (CPU): the declared shapes match the reference modules.
ONNX export and onnxruntime parity: tests/test_flux_onnx.py; TensorRT profiles: tests/test_flux_tensorrt.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm_rt.configs import PRESETS
from ldm_rt.families.flux.config import FluxModelConfig
from ldm_rt.families.flux.specs import export_specs
from ldm_rt.families.flux.transformer import FLUX_PRESETS, FluxTransformer2DModel
from ldm_rt.models.t5 import T5_PRESETS, T5EncoderModel
from ldm_rt.models.text_encoder import CLIPTextModel
from ldm_rt.models.vae import AutoencoderKL
from random_weights import randomize_


@pytest.fixture(scope="module", params=[True, False], ids=["dev-like", "schnell-like"])
def parts(request):
    t = PRESETS["tiny"]
    flux = dataclasses.replace(FLUX_PRESETS["flux-tiny"], guidance_embeds=request.param)
    cfg = FluxModelConfig(flux, t.text_encoder, T5_PRESETS["t5-tiny"], dataclasses.replace(t.vae, latent_channels=16))
    mods = dict(text_encoder=CLIPTextModel(cfg.text_encoder), text_encoder_2=T5EncoderModel(cfg.text_encoder_2),
                transformer=FluxTransformer2DModel(cfg.transformer), vae=AutoencoderKL(cfg.vae))
    for i, m in enumerate(mods.values()):
        randomize_(m, seed=i)
        m.eval()
    return type("Parts", (), dict(mods, config=cfg))()


@pytest.mark.parametrize("batch, h, w", [(2, 6, 4), (1, 4, 10)])
def test_spec_shapes_match_the_reference_modules(parts, batch, h, w):
    for name, spec in export_specs(parts.config).items():
        inputs = spec.sample_inputs(batch, h, w, seed=3)
        env = {}
        for t, x in zip(spec.inputs, inputs):
            assert x.dim() == len(t.dims), (name, t.name)
            for d, n in zip(t.dims, x.shape):
                assert n == d if isinstance(d, int) else env.setdefault(d, n) == n, (name, t.name, d)
        with torch.no_grad():
            outs = spec.module(parts)(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        assert len(outs) == len(spec.outputs)
        for t, y in zip(spec.outputs, outs):
            assert torch.isfinite(y).all()
            for d, n in zip(t.dims, y.shape):
                if isinstance(d, int):
                    assert n == d, (name, t.name)
                elif "*" in d:
                    sym, k = d.split("*")
                    assert n == env[sym] * int(k), (name, t.name)
                else:
                    assert n == env[d], (name, t.name, d)
