"""Image-to-image schedule functions against diffusers' schedulers and pipelines' `get_timesteps`."""

from __future__ import annotations

import pytest
import torch

from ldm_rt.errors import InputError
from ldm_rt.schedulers import calculate_shift, check_strength, ddim_img2img_start, flow_img2img_start, scheduler_from_config

import diffusers
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import (
    StableDiffusion3Img2ImgPipeline,
)

FLOW = {
    "shift1": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0},
    "shift3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    "dynamic": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 4096},
}
DDIM = {
    "dit": {"_class_name": "DDIMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "clip_sample": False, "timestep_spacing": "leading"},
    "sd": {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1},
}
STEPS = (1, 7, 20, 50)
STRENGTHS = (1.0, 0.999, 0.8, 0.6, 0.33, 0.3, 0.05)
SEQ_LEN = 1000
SHAPE = (3, 4, 5, 7)


def _diffusers_tail(pipeline_cls, scheduler, steps, strength):
    """Run diffusers' own `get_timesteps` (an unbound method: it reads only self.scheduler)."""

    class Holder:
        pass

    holder = Holder()
    holder.scheduler = scheduler
    return pipeline_cls.get_timesteps(holder, steps, strength, "cpu")


def _pairs(configs, strength_fn):
    for name in configs:
        for steps in STEPS:
            for strength in STRENGTHS:
                try:
                    strength_fn(steps, strength)
                except InputError:
                    continue
                yield name, steps, strength


@pytest.mark.parametrize("name,steps,strength", list(_pairs(FLOW, flow_img2img_start)))
def test_flow_tail_and_noising_match_diffusers(name, steps, strength):
    cfg = FLOW[name]
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
    # our dynamic shift comes from the token count; diffusers' pipelines pass the same mu
    kwargs = {"mu": calculate_shift(SEQ_LEN)} if cfg.get("use_dynamic_shifting") else {}
    ours = scheduler_from_config(cfg, steps, image_seq_len=SEQ_LEN)
    ref.set_timesteps(steps, **kwargs)
    timesteps, n_run = _diffusers_tail(StableDiffusion3Img2ImgPipeline, ref, steps, strength)
    start = ours.img2img_start(strength)
    assert steps - start == n_run
    assert torch.equal(ours.timesteps[start:], timesteps.to(torch.float32))
    gen = torch.Generator().manual_seed(steps)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    # img2img's starting latents: diffusers' scale_noise at the first kept timestep
    want = ref.scale_noise(x0, timesteps[:1].repeat(SHAPE[0]), noise)
    assert torch.equal(ours.add_noise(x0, noise, start), want)
    # inpainting's blend target after each step: scale_noise at the next timestep (step_index set)
    ref_latents = want
    for k, t in enumerate(timesteps):
        ref_latents = ref.step(torch.randn(SHAPE, generator=gen), t, ref_latents).prev_sample
        if k < len(timesteps) - 1:
            want = ref.scale_noise(x0, torch.tensor([timesteps[k + 1]]), noise)
            assert torch.equal(ours.add_noise(x0, noise, start + k + 1), want)
    assert torch.equal(ours.add_noise(x0, noise, steps), x0)  # sigma 0 at the end: the clean latents


@pytest.mark.parametrize("name,steps,strength", list(_pairs(DDIM, ddim_img2img_start)))
def test_ddim_tail_and_noising_match_diffusers(name, steps, strength):
    cfg = DDIM[name]
    ref = diffusers.DDIMScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    ours = scheduler_from_config(cfg, steps)
    timesteps, n_run = _diffusers_tail(StableDiffusionImg2ImgPipeline, ref, steps, strength)
    start = ours.img2img_start(strength)
    assert steps - start == n_run
    assert torch.equal(ours.timesteps[start:], timesteps.to(torch.float32))
    gen = torch.Generator().manual_seed(100 + steps)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    for k, t in enumerate(timesteps):
        want = ref.add_noise(x0, noise, torch.tensor([t]))
        assert torch.equal(ours.add_noise(x0, noise, start + k), want)


def test_rounding_differs_between_conventions():
    # diffusers' flow pipelines keep n - int(n - n*s) steps, the DDPM-family ones int(n*s)
    assert 20 - flow_img2img_start(20, 0.33) == 7
    assert 20 - ddim_img2img_start(20, 0.33) == 6
    assert 20 - flow_img2img_start(20, 0.3) == 6 == 20 - ddim_img2img_start(20, 0.3)
    assert flow_img2img_start(7, 1.0) == ddim_img2img_start(7, 1.0) == 0


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, float("nan"), float("inf"), "0.5", True, None])
def test_bad_strength_is_one_input_error(bad):
    with pytest.raises(InputError, match="strength"):
        check_strength(bad)


def test_strength_leaving_no_step_is_an_error():
    # diffusers raises ("After adjusting the num_inference_steps by strength parameter ... is < 1")
    with pytest.raises(InputError, match="no denoising step"):
        ddim_img2img_start(10, 0.05)
    with pytest.raises(InputError, match="no denoising step"):
        flow_img2img_start(10, 1e-20)
