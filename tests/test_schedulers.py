"""Schedulers against diffusers (the oracle) and against a schedule worked out by hand."""

from __future__ import annotations

import pytest
import torch

from ldm_rt.errors import ConfigError, InputError
from ldm_rt.schedulers import DDIM, FlowMatchEuler, Scheduler, calculate_shift, scheduler_from_config

import diffusers  # a test dependency: missing means the install is broken, not a skip

SHAPE = (3, 4, 5, 7)  # batch 3, odd spatial sizes
STEPS = (1, 7, 50)

DDIM_CONFIGS = {
    "sd": {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_start": 0.00085,
           "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
           "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000},
    "dit": {"_class_name": "DDIMScheduler", "beta_start": 0.0001, "beta_end": 0.02,
            "beta_schedule": "linear", "clip_sample": False, "timestep_spacing": "leading"},
    "zero_snr_v": {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "clip_sample": False, "timestep_spacing": "trailing",
                   "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                   "set_alpha_to_one": False},
    "clip_eps": {"_class_name": "DDIMScheduler", "clip_sample": True, "clip_sample_range": 1.5,
                 "prediction_type": "epsilon", "timestep_spacing": "linspace"},
    "cosine_sample": {"_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2",
                      "prediction_type": "sample", "clip_sample": False, "timestep_spacing": "trailing"},
}

FLOW_CONFIGS = {
    "shift1": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0},
    "shift3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    "dynamic": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0",
                "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 4096, "use_karras_sigmas": False},
}
IMAGE_SEQ_LEN = 1000  # a non-power-of-two token count (e.g. 25 x 40 patches)


def _randn(gen, dtype=torch.float32):
    return torch.randn(SHAPE, generator=gen, dtype=dtype)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", list(DDIM_CONFIGS))
def test_ddim_matches_diffusers(name, steps):
    cfg = DDIM_CONFIGS[name]
    ref = diffusers.DDIMScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    ours = scheduler_from_config(cfg, steps)
    assert isinstance(ours, DDIM) and isinstance(ours, Scheduler)
    assert ours.num_steps == steps and ours.init_noise_sigma == 1.0
    assert ours.timesteps.dtype == torch.float32 and ours.timesteps.shape == (steps,)
    assert torch.equal(ours.timesteps, ref.timesteps.to(torch.float32))
    gen = torch.Generator().manual_seed(steps)
    x_ours = x_ref = _randn(gen)
    for i, t in enumerate(ref.timesteps):
        out = _randn(gen)  # a fresh model output at every step
        x_ref = ref.step(out, t, x_ref).prev_sample
        x_ours = ours.step(x_ours, out, i)
        assert x_ours.dtype == torch.float32
        assert (x_ours - x_ref).abs().max().item() <= 1e-6, f"step {i}"


def _flow_ref(cfg, steps):
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
    if cfg.get("use_dynamic_shifting"):
        mu = calculate_shift(IMAGE_SEQ_LEN, cfg["base_image_seq_len"], cfg["max_image_seq_len"],
                             cfg["base_shift"], cfg["max_shift"])
        ref.set_timesteps(steps, mu=mu)
    else:
        ref.set_timesteps(steps)
    return ref


def test_calculate_shift_matches_diffusers_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as ref_shift
    assert calculate_shift(IMAGE_SEQ_LEN, 256, 4096, 0.5, 1.15) == ref_shift(IMAGE_SEQ_LEN, 256, 4096, 0.5, 1.15)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", list(FLOW_CONFIGS))
def test_flow_matches_diffusers(name, steps):
    cfg = FLOW_CONFIGS[name]
    ref = _flow_ref(cfg, steps)
    ours = scheduler_from_config(cfg, steps, image_seq_len=IMAGE_SEQ_LEN)
    assert isinstance(ours, FlowMatchEuler) and isinstance(ours, Scheduler)
    assert ours.prediction_type == "flow" and ours.init_noise_sigma == 1.0
    assert ours.timesteps.dtype == torch.float32 and ours.timesteps.shape == (steps,)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    gen = torch.Generator().manual_seed(100 + steps)
    x_ours = x_ref = _randn(gen)
    for i, t in enumerate(ref.timesteps):
        out = _randn(gen)
        x_ref = ref.step(out, t, x_ref).prev_sample
        x_ours = ours.step(x_ours, out, i)
        assert (x_ours - x_ref).abs().max().item() <= 1e-6, f"step {i}"


def test_flow_by_hand():
    """shift 1, N = 1000, 4 steps, worked out without diffusers.

    The schedule spans sigma_max = 1000/1000 = 1 to sigma_min = 1/1000 in 4 even steps:
    sigma_k = 1 - k * (1 - 0.001) / 3 = 1, 0.667, 0.334, 0.001; shift 1 leaves them as they
    are, and a final sigma of 0 is appended. timesteps = 1000 * sigma = 1000, 667, 334, 1.
    """
    s = scheduler_from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}, 4)
    torch.testing.assert_close(s.sigmas, torch.tensor([1.0, 0.667, 0.334, 0.001, 0.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(s.timesteps, torch.tensor([1000.0, 667.0, 334.0, 1.0]), rtol=0, atol=1e-4)
    # One Euler step: x + (sigma_1 - sigma_0) * v = x - 0.333 * v.
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    v = torch.tensor([[3.0, 0.0], [-1.0, 2.0]])
    expected = torch.tensor([[0.001, -2.0], [0.833, 2.334]])
    torch.testing.assert_close(s.step(x, v, 0), expected, rtol=0, atol=1e-6)
    # The last step lands on sigma = 0: x - 0.001 * v.
    torch.testing.assert_close(s.step(x, v, 3), torch.tensor([[0.997, -2.0], [0.501, 2.998]]),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [DDIM_CONFIGS["zero_snr_v"], FLOW_CONFIGS["dynamic"]], ids=["ddim", "flow"])
def test_step_is_pure(cfg):
    s = scheduler_from_config(cfg, 7, image_seq_len=IMAGE_SEQ_LEN)
    gen = torch.Generator().manual_seed(0)
    x, out = _randn(gen), _randn(gen)
    x0, out0 = x.clone(), out.clone()
    tables = {k: v.clone() for k, v in vars(s).items() if isinstance(v, torch.Tensor)}
    a, b = s.step(x, out, 3), s.step(x, out, 3)
    assert torch.equal(a, b)
    assert torch.equal(x, x0) and torch.equal(out, out0)
    assert all(torch.equal(getattr(s, k), v) for k, v in tables.items())
    with pytest.raises(AttributeError):  # frozen
        s.num_steps = 3


@pytest.mark.parametrize("cfg", [*DDIM_CONFIGS.values(), *FLOW_CONFIGS.values()],
                         ids=[*(f"ddim-{k}" for k in DDIM_CONFIGS), *(f"flow-{k}" for k in FLOW_CONFIGS)])
def test_update_with_coefficients_is_step_and_one_key_serves_every_schedule(cfg):
    """What a CUDA-graph loop relies on: `update` with step i's `coefficients` is `step(i)` bit for
    bit, and the update of another step count (another schedule) has the same key, so one
    captured update serves both; the key differs where the arithmetic does."""
    gen = torch.Generator().manual_seed(2)
    x, out = _randn(gen), _randn(gen)
    s7, s50 = (scheduler_from_config(cfg, n, image_seq_len=IMAGE_SEQ_LEN) for n in (7, 50))
    for i in (0, 3, 6):
        assert torch.equal(s50.update(x, out, s7.coefficients(i)), s7.step(x, out, i))
    assert s7.update_key == s50.update_key
    keys = {scheduler_from_config(c, 7, image_seq_len=IMAGE_SEQ_LEN).update_key
            for c in [*DDIM_CONFIGS.values(), *FLOW_CONFIGS.values()]}
    # sd/dit (epsilon, no clip) share one; clip 1.5, v_prediction, sample and flow differ
    assert len(keys) == 5, keys
    with pytest.raises(InputError):
        s7.coefficients(7)


@pytest.mark.parametrize("cfg", [DDIM_CONFIGS["sd"], FLOW_CONFIGS["shift3"]], ids=["ddim", "flow"])
def test_step_keeps_low_precision_dtype(cfg):
    s = scheduler_from_config(cfg, 7)
    gen = torch.Generator().manual_seed(1)
    x, out = _randn(gen), _randn(gen)
    want = s.step(x, out, 2)
    got = s.step(x.bfloat16(), out.bfloat16(), 2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)


def test_unknown_class():
    with pytest.raises(ConfigError, match=r"'PNDMScheduler'.*FlowMatchEulerDiscreteScheduler.*DDIMScheduler"):
        scheduler_from_config({"_class_name": "PNDMScheduler"}, 10)


@pytest.mark.parametrize("steps", [0, -1])
def test_bad_steps(steps):
    with pytest.raises(InputError, match="steps must be a positive integer"):
        scheduler_from_config(FLOW_CONFIGS["shift1"], steps)


def test_thresholding_rejected():
    with pytest.raises(ConfigError, match="thresholding=True is not supported"):
        scheduler_from_config({**DDIM_CONFIGS["dit"], "thresholding": True}, 10)


def test_dynamic_shifting_needs_image_seq_len():
    with pytest.raises(InputError, match="image_seq_len"):
        scheduler_from_config(FLOW_CONFIGS["dynamic"], 10)


@pytest.mark.parametrize("key,value", [("use_karras_sigmas", True), ("use_exponential_sigmas", True),
                                       ("use_beta_sigmas", True), ("invert_sigmas", True),
                                       ("shift_terminal", 0.1), ("stochastic_sampling", True)])
def test_flow_unsupported_options_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        scheduler_from_config({**FLOW_CONFIGS["shift3"], key: value}, 10)


def test_flow_defaults_of_unsupported_options_accepted():
    cfg = {**FLOW_CONFIGS["shift3"], "use_karras_sigmas": False, "shift_terminal": None,
           "invert_sigmas": False, "time_shift_type": "exponential"}
    assert torch.equal(scheduler_from_config(cfg, 5).sigmas, scheduler_from_config(FLOW_CONFIGS["shift3"], 5).sigmas)


def test_bad_ddim_values():
    with pytest.raises(ConfigError, match="prediction_type 'flow'"):
        scheduler_from_config({**DDIM_CONFIGS["dit"], "prediction_type": "flow"}, 10)
    with pytest.raises(ConfigError, match="beta_schedule 'sigmoid'"):
        scheduler_from_config({**DDIM_CONFIGS["dit"], "beta_schedule": "sigmoid"}, 10)
    with pytest.raises(InputError, match="num_train_timesteps"):
        scheduler_from_config(DDIM_CONFIGS["dit"], 1001)


def test_step_index_out_of_range():
    s = scheduler_from_config(FLOW_CONFIGS["shift1"], 4)
    x = torch.ones(2)
    with pytest.raises(InputError, match="step index 4"):
        s.step(x, x, 4)
