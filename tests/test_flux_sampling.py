"""Flux sampling functions against diffusers' FluxPipeline / FlowMatchEulerDiscreteScheduler."""

import dataclasses

import numpy as np
import pytest
import torch

from ldm_rt.families.flux import sampling
from ldm_rt.families.flux.transformer import FluxConfig, FluxTransformer2DModel
from random_weights import randomize_

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402

# The scheduler configs of black-forest-labs/FLUX.1-dev (dynamic shift) and FLUX.1-schnell.
DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
       "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
       "use_dynamic_shifting": True}
SCHNELL = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
           "use_dynamic_shifting": False}


@pytest.mark.parametrize("hw", [(6, 10), (8, 4)])
def test_pack_unpack_and_ids_match_diffusers(hw):
    h, w = hw
    x = torch.randn(3, 16, h, w, generator=torch.Generator().manual_seed(h))
    packed = sampling.pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 16, h, w))
    assert packed.shape == (3, h * w // 4, 64)
    assert torch.equal(sampling.unpack_latents(packed, h, w), FluxPipeline._unpack_latents(packed, h * 8, w * 8, 8))
    assert torch.equal(sampling.unpack_latents(packed, h, w), x)
    ids = sampling.latent_image_ids(h // 2, w // 2)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(3, h // 2, w // 2, "cpu", torch.float32))


@pytest.mark.parametrize("config", [DEV, SCHNELL], ids=["dev", "schnell"])
@pytest.mark.parametrize("steps,seq", [(28, 4096), (4, 1024), (7, 333)])
def test_schedule_matches_diffusers(config, steps, seq):
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    assert sampling.calculate_shift(seq) == mu
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu if config["use_dynamic_shifting"] else None)
    ours = sampling.flux_scheduler(config, steps, seq)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)


CONFIG = FluxConfig(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=20, pooled_projection_dim=18,
                    axes_dims_rope=(4, 6, 6))


@pytest.mark.parametrize("mode", ["guidance", "true_cfg"])
def test_denoising_loop_matches_diffusers(mode):
    """A few steps of FluxPipeline's loop (transformer, true CFG, scheduler.step) against ours."""
    config = dataclasses.replace(CONFIG, guidance_embeds=mode == "guidance")
    ref_model = diffusers.FluxTransformer2DModel(**{k: v for k, v in config.to_dict().items() if k[0] != "_"}).eval()
    randomize_(ref_model, 21)
    ours = FluxTransformer2DModel(config).eval()
    ours.load_state_dict(ref_model.state_dict())
    g = torch.Generator().manual_seed(22)
    b, m, h, w, steps, scale = 2, 5, 6, 4, 3, 3.5
    latents = sampling.pack_latents(torch.randn(b, 16, h, w, generator=g))
    img_ids, txt = sampling.latent_image_ids(h // 2, w // 2), sampling.text_ids(m)
    cond = sampling.FluxConditioning(torch.randn(b, m, 20, generator=g), torch.randn(b, 18, generator=g), txt)
    neg = sampling.FluxConditioning(torch.randn(b, m, 20, generator=g), torch.randn(b, 18, generator=g), txt)
    guidance = sampling.guidance_vector(scale, b) if config.guidance_embeds else None

    sched = sampling.flux_scheduler(DEV, steps, latents.shape[1])
    ref_sched = FlowMatchEulerDiscreteScheduler.from_config(DEV)
    ref_sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(latents.shape[1]))
    ref_sched.set_begin_index(0)
    x_ours, x_ref = latents.clone(), latents.clone()
    with torch.no_grad():
        for i, t in enumerate(ref_sched.timesteps):
            kw = dict(hidden_states=x_ref, timestep=t.expand(b).to(x_ref.dtype) / 1000, guidance=guidance,
                      img_ids=img_ids, return_dict=False)
            v = ref_model(**kw, pooled_projections=cond.pooled_prompt_embeds, encoder_hidden_states=cond.prompt_embeds,
                          txt_ids=txt)[0]
            if mode == "true_cfg":
                v_neg = ref_model(**kw, pooled_projections=neg.pooled_prompt_embeds,
                                  encoder_hidden_states=neg.prompt_embeds, txt_ids=txt)[0]
                v = v_neg + scale * (v - v_neg)
            x_ref = ref_sched.step(v, t, x_ref, return_dict=False)[0]
            x_ours = sampling.denoise_step(ours, sched, x_ours, i, img_ids, cond, guidance,
                                           negative=neg if mode == "true_cfg" else None, true_cfg_scale=scale)
    err = (x_ours - x_ref).abs().max().item()
    print(f"flux {mode} loop max-abs {err:.2e}")
    assert err <= 1e-5 and (x_ref - latents).abs().max() > 0.1
