"""Samplers, configured from diffusers' `scheduler/scheduler_config.json`.

Each scheduler is a frozen schedule plus a pure `step(latents, model_output, i) -> latents`:
no step counter, no RNG, nothing mutated, so every backend and a CUDA-graph loop share it.
`timesteps[i]` is what the denoiser receives as its timestep input at step i; both
schedulers put it on the training scale [0, num_train_timesteps].

`step` is split in two so a CUDA graph can hold the update: `coefficients(i)`, the step's
numbers as a small fp32 tensor (a graph reads them from a buffer refilled each step), and
`update(latents, model_output, coefficients)`, the arithmetic, which depends on the schedule
only through `update_key` (the class and its prediction settings): one captured update serves
every step and every schedule with the same key.

- `FlowMatchEuler`: diffusers' `FlowMatchEulerDiscreteScheduler` (SD3/Flux rectified flow).
- `DDIM`: diffusers' `DDIMScheduler` with eta = 0 (deterministic).

Image-to-image (diffusers' img2img/inpaint pipelines): `img2img_start(strength)` is the first step
index that `strength` keeps (diffusers' `get_timesteps`, whose rounding differs between the
flow-matching pipelines and the DDPM-family ones: `flow_img2img_start`, `ddim_img2img_start`), and `add_noise(x0, noise, i)`
noises clean latents to the level of step i's timestep: `FlowMatchEulerDiscreteScheduler.scale_noise`
(x = sigma * noise + (1 - sigma) * x0) for flow matching, `DDIMScheduler.add_noise`
(x = sqrt(a_t) x0 + sqrt(1 - a_t) noise) for DDIM. Both are pure, as `step` is.

The schedules reproduce diffusers' `set_timesteps` op for op (same dtypes, same order), so
`step` matches diffusers' `step(...).prev_sample` bit for bit on fp32 inputs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ldm_rt.errors import ConfigError, InputError


@runtime_checkable
class Scheduler(Protocol):
    num_steps: int
    timesteps: torch.Tensor  # (num_steps,) float32, the denoiser's timestep input at step i
    prediction_type: str  # "flow" (velocity), "epsilon", "v_prediction" or "sample"
    init_noise_sigma: float  # initial latents = init_noise_sigma * randn

    def step(self, latents: torch.Tensor, model_output: torch.Tensor, i: int) -> torch.Tensor: ...

    def add_noise(self, sample: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor: ...

    def img2img_start(self, strength: float) -> int: ...

    def coefficients(self, i: int) -> torch.Tensor: ...

    def update(self, latents: torch.Tensor, model_output: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor: ...

    @property
    def update_key(self) -> tuple: ...


def _check_index(s: Scheduler, i: int) -> None:
    if not 0 <= i < s.num_steps:
        raise InputError(f"step index {i} is outside 0..{s.num_steps - 1}; pass i from range(num_steps).")


def _settings(config: dict[str, Any], name: str, defaults: dict[str, Any], unsupported: tuple[str, ...],
              ignored: tuple[str, ...] = ()) -> dict[str, Any]:
    """Config over defaults. A truthy `unsupported` key is an error (they all default to off);
    `_`-prefixed keys are metadata; other unknown keys warn and are ignored."""
    for key in unsupported:
        if config.get(key):
            raise ConfigError(
                f"{name}: {key}={config[key]!r} is not supported by ldm-rt; set it to "
                f"{'null' if key == 'shift_terminal' else 'false'} in scheduler/scheduler_config.json."
            )
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults
                     and k not in unsupported and k not in ignored)
    if unknown:
        warnings.warn(f"{name} config: unknown key(s) {unknown} (ignored).", stacklevel=3)
    return {k: config.get(k, d) for k, d in defaults.items()}


# ----------------------------------------------------------------------------- flow matching

_FLOW_DEFAULTS = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
    "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
_FLOW_UNSUPPORTED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                     "use_beta_sigmas", "stochastic_sampling")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for dynamic shifting: linear in the latent token count (diffusers' pipeline_flux.py)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


@dataclass(frozen=True, eq=False)
class FlowMatchEuler:
    """x_t = (1 - sigma) x0 + sigma noise; the model predicts v = noise - x0; Euler step in sigma."""

    num_steps: int
    timesteps: torch.Tensor  # (num_steps,) float32, sigmas[:-1] * num_train_timesteps
    sigmas: torch.Tensor  # (num_steps + 1,) float32, from ~1 down to sigmas[-1] = 0
    prediction_type: str = "flow"
    init_noise_sigma: float = 1.0

    @classmethod
    def from_config(cls, config: dict[str, Any], num_steps: int, image_seq_len: int | None = None):
        c = _settings(config, "FlowMatchEulerDiscreteScheduler", _FLOW_DEFAULTS, _FLOW_UNSUPPORTED)
        n_train, shift, dynamic = c["num_train_timesteps"], c["shift"], c["use_dynamic_shifting"]
        if dynamic:
            if image_seq_len is None:
                raise InputError("this scheduler uses dynamic shifting (use_dynamic_shifting=true): pass "
                                 "image_seq_len, the number of latent tokens (H/patch * W/patch).")
            if c["time_shift_type"] != "exponential":
                raise ConfigError(f"FlowMatchEulerDiscreteScheduler: time_shift_type="
                                  f"{c['time_shift_type']!r} is not supported; use \"exponential\".")
            mu = calculate_shift(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"],
                                 c["base_shift"], c["max_shift"])
        # Ends of diffusers' training sigmas (N/N .. 1/N) in float32, statically shifted unless
        # dynamic. set_timesteps spaces between these shifted ends and then shifts *again*: that
        # double shift is diffusers' behaviour, reproduced on purpose.
        ends = torch.tensor([n_train, 1.0], dtype=torch.float32) / n_train
        if not dynamic:
            ends = shift * ends / (1 + (shift - 1) * ends)
        sigma_max, sigma_min = ends[0].item(), ends[1].item()
        sig = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train  # float64
        if dynamic:  # exponential time shift with sigma = 1
            sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1))
        else:
            sig = shift * sig / (1 + (shift - 1) * sig)
        sig = torch.from_numpy(sig).to(torch.float32)
        return cls(num_steps, sig * n_train, torch.cat([sig, torch.zeros(1)]))

    def step(self, latents: torch.Tensor, model_output: torch.Tensor, i: int) -> torch.Tensor:
        return self.update(latents, model_output, self.coefficients(i))

    def add_noise(self, sample: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """Clean latents noised to step i's level (i in 0..num_steps; num_steps is sigma 0): diffusers'
        `scale_noise(sample, timesteps[i], noise)`, same op order: sigma * noise + (1 - sigma) * sample."""
        if not 0 <= i <= self.num_steps:
            raise InputError(f"step index {i} is outside 0..{self.num_steps}.")
        sigma = self.sigmas[i].to(device=sample.device, dtype=sample.dtype)
        return sigma * noise + (1.0 - sigma) * sample

    def img2img_start(self, strength: float) -> int:
        return flow_img2img_start(self.num_steps, strength)

    def coefficients(self, i: int) -> torch.Tensor:
        """(1,) float32: dt = sigmas[i + 1] - sigmas[i] (negative)."""
        _check_index(self, i)
        return (self.sigmas[i + 1] - self.sigmas[i]).reshape(1)

    @property
    def update_key(self) -> tuple:
        return ("FlowMatchEuler",)

    @staticmethod
    def update(latents: torch.Tensor, model_output: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        dt = coefficients[0]  # 0-d float32
        return (latents.float() + dt * model_output.float()).to(latents.dtype)


# ----------------------------------------------------------------------------- DDIM

_DDIM_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True,
    "steps_offset": 0, "prediction_type": "epsilon", "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


def _betas(c: dict[str, Any]) -> torch.Tensor:
    """(num_train_timesteps,) float32 betas, as DDIMScheduler.__init__ builds them."""
    n, schedule = c["num_train_timesteps"], c["beta_schedule"]
    if c["trained_betas"] is not None:
        if len(c["trained_betas"]) != n:
            raise ConfigError(f"DDIMScheduler: trained_betas has {len(c['trained_betas'])} values but "
                              f"num_train_timesteps is {n}; make them agree.")
        return torch.tensor(c["trained_betas"], dtype=torch.float32)
    if schedule == "linear":
        return torch.linspace(c["beta_start"], c["beta_end"], n, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":  # cosine alpha_bar, betas capped at 0.999, in float64
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - alpha_bar((k + 1) / n) / alpha_bar(k / n), 0.999) for k in range(n)],
                            dtype=torch.float32)
    raise ConfigError(f"DDIMScheduler: beta_schedule {schedule!r} is not supported; "
                      "use linear, scaled_linear or squaredcos_cap_v2.")


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last one is 0 (arXiv 2305.08891, Alg. 1)."""
    ab_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - last) * (first / (first - last))
    ab = ab_sqrt**2
    return 1 - torch.cat([ab[0:1], ab[1:] / ab[:-1]])


@dataclass(frozen=True, eq=False)
class DDIM:
    """Deterministic DDIM (eta = 0): predict x0 and eps, then re-noise x0 to the previous level."""

    num_steps: int
    timesteps: torch.Tensor  # (num_steps,) float32, integer training timesteps t_i
    alpha_prod: torch.Tensor  # (num_steps,) float32, alphas_cumprod[t_i]
    alpha_prod_prev: torch.Tensor  # (num_steps,) float32, alphas_cumprod[t_i - N // n] or the final one
    prediction_type: str
    clip_sample_range: float | None  # None: no clipping of predicted x0
    init_noise_sigma: float = 1.0

    @classmethod
    def from_config(cls, config: dict[str, Any], num_steps: int):
        c = _settings(config, "DDIMScheduler", _DDIM_DEFAULTS, ("thresholding",),
                      ignored=("dynamic_thresholding_ratio", "sample_max_value"))  # thresholding-only
        n_train, spacing, pred = c["num_train_timesteps"], c["timestep_spacing"], c["prediction_type"]
        if pred not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"DDIMScheduler: prediction_type {pred!r} is not supported; "
                              "use epsilon, v_prediction or sample.")
        if num_steps > n_train:
            raise InputError(f"steps={num_steps} is more than the scheduler's num_train_timesteps "
                             f"{n_train}; use at most {n_train} steps.")
        betas = _betas(c)
        if c["rescale_betas_zero_snr"]:
            betas = _rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (N,) float32, like diffusers
        final = torch.tensor(1.0) if c["set_alpha_to_one"] else alphas_cumprod[0]
        if spacing == "linspace":
            t = np.linspace(0, n_train - 1, num_steps).round()[::-1].astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, num_steps) * (n_train // num_steps)).round()[::-1].astype(np.int64)
            t = t + c["steps_offset"]
        elif spacing == "trailing":
            t = np.round(np.arange(n_train, 0, -n_train / num_steps)).astype(np.int64) - 1
        else:
            raise ConfigError(f"DDIMScheduler: timestep_spacing {spacing!r} is not supported; "
                              "use leading, trailing or linspace.")
        if t.max() >= n_train:
            raise InputError(f"steps={num_steps} with the scheduler's steps_offset {c['steps_offset']} gives "
                             f"timestep {t.max()} >= num_train_timesteps {n_train}; use fewer steps.")
        t = torch.from_numpy(t.copy())
        # diffusers steps to t - N // n, not to the next scheduled timestep; the two differ for
        # trailing/linspace spacing, and we keep diffusers' choice to stay equal to it.
        prev = t - n_train // num_steps
        a_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
        clip = float(c["clip_sample_range"]) if c["clip_sample"] else None
        return cls(num_steps, t.to(torch.float32), alphas_cumprod[t], a_prev, pred, clip)

    def step(self, latents: torch.Tensor, model_output: torch.Tensor, i: int) -> torch.Tensor:
        return self.update(latents, model_output, self.coefficients(i))

    def add_noise(self, sample: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """Clean latents noised to step i's timestep: diffusers' `add_noise(sample, noise, timesteps[i])`,
        same op order: sqrt(a_t) * sample + sqrt(1 - a_t) * noise."""
        _check_index(self, i)
        a_t = self.alpha_prod[i].to(device=sample.device, dtype=sample.dtype)
        return a_t**0.5 * sample + (1 - a_t) ** 0.5 * noise

    def img2img_start(self, strength: float) -> int:
        return ddim_img2img_start(self.num_steps, strength)

    def coefficients(self, i: int) -> torch.Tensor:
        """(2,) float32: alphas_cumprod at step i's timestep and at the one it steps to."""
        _check_index(self, i)
        return torch.stack([self.alpha_prod[i], self.alpha_prod_prev[i]])

    @property
    def update_key(self) -> tuple:
        return ("DDIM", self.prediction_type, self.clip_sample_range)

    def update(self, latents: torch.Tensor, model_output: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        a_t, a_prev = coefficients[0], coefficients[1]  # 0-d float32, same op order as diffusers
        b_t = 1 - a_t
        x, out = latents.float(), model_output.float()
        if self.prediction_type == "epsilon":
            x0, eps = (x - b_t**0.5 * out) / a_t**0.5, out
        elif self.prediction_type == "sample":
            x0, eps = out, (x - a_t**0.5 * out) / b_t**0.5
        else:  # v_prediction
            x0, eps = a_t**0.5 * x - b_t**0.5 * out, a_t**0.5 * out + b_t**0.5 * x
        if self.clip_sample_range is not None:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return (a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps).to(latents.dtype)


# ----------------------------------------------------------------------------- image-to-image


def check_strength(strength) -> float:
    """`strength` as a float, or InputError unless 0 < strength <= 1 (diffusers accepts 0 and then
    fails on an empty schedule; here 0 is refused up front, with the same fix)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise InputError(f"strength must be a number in (0, 1], got {strength!r}: 1 redraws the whole image, "
                         "values near 0 keep it.")
    return float(strength)


def _img2img_start(num_steps: int, strength: float, init_timestep: float) -> int:
    """t_start = int(max(n - init_timestep, 0)), diffusers' `get_timesteps`; InputError when the tail
    it leaves is empty (diffusers raises too)."""
    t_start = int(max(num_steps - init_timestep, 0))
    if num_steps - t_start < 1:
        raise InputError(f"strength {strength:g} with {num_steps} steps leaves no denoising step; "
                         f"raise strength or steps (at least {math.ceil(1 / strength)} steps at this strength).")
    return t_start


def flow_img2img_start(num_steps: int, strength) -> int:
    """First step index `strength` keeps, as diffusers' flow-matching img2img/inpaint pipelines
    (FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline, ...): init_timestep = min(n * strength, n)
    (a float: 0.3 x 20 keeps 6 steps, 0.33 x 20 keeps 20 - int(20 - 6.6) = 7)."""
    strength = check_strength(strength)
    return _img2img_start(num_steps, strength, min(num_steps * strength, num_steps))


def ddim_img2img_start(num_steps: int, strength) -> int:
    """First step index `strength` keeps, as diffusers' DDPM-family img2img/inpaint pipelines
    (StableDiffusionImg2ImgPipeline, ...): init_timestep = min(int(n * strength), n) (floored: 0.33 x 20
    keeps 6 steps; a strength below 1/n keeps none, an InputError)."""
    strength = check_strength(strength)
    return _img2img_start(num_steps, strength, min(int(num_steps * strength), num_steps))


# ----------------------------------------------------------------------------- factory

_CLASSES = {"FlowMatchEulerDiscreteScheduler": FlowMatchEuler, "DDIMScheduler": DDIM}


def scheduler_from_config(config: dict[str, Any], num_steps: int, image_seq_len: int | None = None) -> Scheduler:
    """Build the scheduler named by config["_class_name"] for `num_steps` denoising steps.

    image_seq_len (latent tokens) is needed only by flow schedulers with use_dynamic_shifting.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise InputError(f"steps must be a positive integer, got {num_steps!r}.")
    name = config.get("_class_name")
    if name not in _CLASSES:
        raise ConfigError(f"scheduler class {name!r} is not supported; "
                          f"scheduler/scheduler_config.json must name one of {', '.join(_CLASSES)}.")
    if name == "DDIMScheduler":
        return DDIM.from_config(config, num_steps)
    return FlowMatchEuler.from_config(config, num_steps, image_seq_len)
