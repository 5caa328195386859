"""The 2x super-resolution demo (issue 17): a small DiT conditioned by channel concatenation.

    python -m ldm_rt.demo.train --config sr --stage dit    --run-dir runs/sr --steps 4000
    python -m ldm_rt.demo.train --config sr --stage export --run-dir runs/sr --out ldm_rt/demo/sr_model

What it learns: a 64 px shapes image -> the 128 px one. The data are the demo's (`shapes.py`,
train split): the 128 px render is the ground truth, its 2x2 box average (`downscale`) the
64 px input. The conditioning is the 64 px image resized to 128 px with the pipeline's own
resize (`image_input.preprocess`: Lanczos, diffusers' VaeImageProcessor default), then
encoded by the shipped demo VAE (posterior mean, scaled as the pipeline scales latents): the
same function of the input at training and at inference, in the latents' own layout (4 x 16 x
16), so the DiT sees the blurred image where its sharp latents must go and learns the
difference. (Encoding the 64 px image instead would give 8 x 8 latents, a layout the DiT would
have to upsample itself.)

The VAE, text encoder and tokenizer are the shipped demo model's (`cfg.base_model`), frozen:
the SR model directory carries copies of them, so it loads like any other. Text is optional:
captions are dropped to "" with probability `caption_dropout` (0.5), so the empty prompt (what
`ldm-rt upscale` sends) is half of what the model saw.

Training: flow matching on the 128 px image's latents, as the demo's dit stage (logit-normal t,
v = noise - x0), with the conditioning latents concatenated to x_t. The dataset
(`num_train_images` scenes) is encoded once and cached in the run dir (`sr_latents.pt`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm_rt.demo.demo_config import DemoConfig
from ldm_rt.demo.shapes import make_batch
from ldm_rt.errors import InputError

_SR_DATA_SEED_BASE = 2_000_003  # make_batch seeds of the SR dataset (the dit stage's start at 1_000_003)
CACHE = "sr_latents.pt"
CKPT = "sr.pt"


def base_model_dir(cfg: DemoConfig) -> Path:
    path = Path(cfg.base_model)
    if not path.is_absolute():
        path = Path(__file__).parent / path
    return path


def load_base(cfg: DemoConfig):
    """The shipped demo model's components (text encoder, tokenizer, VAE: frozen, fp32)."""
    from ldm_rt.model_dir import load_model_dir

    root = base_model_dir(cfg)
    if not (root / "model_index.json").is_file():
        raise InputError(f"the SR demo reuses the demo model at {root}, which is missing.")
    components = load_model_dir(root)
    for module in (components.text_encoder, components.vae):
        module.float().eval().requires_grad_(False)
    return components


def downscale(images: np.ndarray, factor: int = 2) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, H/f, W/f, 3) uint8: the f x f box average, rounded (what a
    renderer with area sampling draws at the lower resolution)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // factor, factor, w // factor, factor, c).astype(np.float32).mean(axis=(2, 4))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def upsample_for_condition(low: np.ndarray, size: int) -> torch.Tensor:
    """(B, h, w, 3) uint8 -> (B, 3, size, size) in [-1, 1], exactly as the pipeline preprocesses a
    PIL image of that size for an output of `size` (`image_input.preprocess`, Lanczos)."""
    from ldm_rt import image_input

    return torch.cat([image_input.preprocess(Image.fromarray(im), size, size) for im in low])


def bicubic(low: np.ndarray, size: int) -> np.ndarray:
    """The baseline: PIL bicubic to size x size, (B, size, size, 3) uint8."""
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in low])


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> the pipeline's scaled latents from the posterior mean (`Pipeline.encode`,
    sample_mode "argmax")."""
    mean, _ = vae.encode(x)
    c = vae.config
    return (mean - (c.shift_factor or 0.0)) * c.scaling_factor


@torch.no_grad()
def sr_cache(cfg: DemoConfig, run_dir: Path, base, progress: bool = True) -> dict:
    """The fixed SR dataset: target latents (N, 4, 16, 16) of the 128 px images, conditioning
    latents of their 64 px versions (same shape), caption ids and masks. Cached in the run dir."""
    from tqdm.auto import tqdm

    path = run_dir / CACHE
    if path.is_file():
        from ldm_rt.demo.train import _load

        return _load(path)
    from ldm_rt.demo.train import _save_atomic, to_tensor

    n, chunk, size = cfg.num_train_images, 200, cfg.image_size
    targets, conds, captions = [], [], []
    for k in tqdm(range(0, n, chunk), desc="encoding SR dataset", disable=not progress):
        images, caps = make_batch(_SR_DATA_SEED_BASE + k, min(chunk, n - k), size=size, split="train")
        low = downscale(images, cfg.upscale)
        targets += [encode_latents(base.vae, part) for part in to_tensor(images).split(50)]
        conds += [encode_latents(base.vae, part) for part in upsample_for_condition(low, size).split(50)]
        captions += caps
    tokens = base.tokenizer(captions)
    cache = {"latents": torch.cat(targets), "condition": torch.cat(conds), "input_ids": tokens.input_ids,
             "mask": tokens.attention_mask, "captions": captions}
    _save_atomic(cache, path)
    return cache


def sr_loss(dit, text_encoder, x0, condition, input_ids, mask, gen: torch.Generator) -> torch.Tensor:
    """The demo's flow-matching loss with the conditioning latents concatenated to x_t."""
    b = x0.shape[0]
    t = torch.sigmoid(torch.randn(b, generator=gen))  # (B,) logit-normal(0, 1), as SD3
    noise = torch.randn(x0.shape, generator=gen)
    tt = t.view(b, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    with torch.no_grad():  # the text encoder is the demo model's, frozen
        states, pooled = text_encoder(input_ids)
    pred = dit(xt, t * 1000.0, states, mask, pooled, condition=condition)
    return F.mse_loss(pred, noise - x0)


def train_sr(cfg: DemoConfig, run_dir: Path, steps: int, seed: int, batch: int, lr: float, log_every: int,
             ckpt_every: int, progress: bool, overfit: bool) -> list[float]:
    from ldm_rt.demo.train import (
        _load, _rng_states, _set_rng_states, _train_loop, ema_decay_at, ema_update, lr_at, step_generator,
    )
    from ldm_rt.models.dit import DiT

    base = load_base(cfg)
    cache = sr_cache(cfg, run_dir, base, progress)
    empty = base.tokenizer([""])
    torch.manual_seed(seed)
    dit = DiT(cfg.transformer)
    dit.initialize_weights()  # adaLN-Zero
    params = list(dit.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in dit.named_parameters()} if cfg.ema_decay > 0 else None
    ckpt_path = run_dir / CKPT
    state = {"step": 0}
    if ckpt_path.is_file():
        ck = _load(ckpt_path)
        dit.load_state_dict(ck["dit"])
        opt.load_state_dict(ck["opt"])
        ema = ck["ema"]
        _set_rng_states(ck["rng"])
        state["step"] = ck["step"]
    dit.train()
    n = cache["latents"].shape[0]

    def step_fn(step):
        gen = step_generator(seed, 0 if overfit else step)
        idx = torch.randint(n, (batch,), generator=gen)
        ids, mask = cache["input_ids"][idx].clone(), cache["mask"][idx].clone()
        drop = torch.rand(batch, generator=gen) < cfg.caption_dropout
        ids[drop], mask[drop] = empty.input_ids[0], empty.attention_mask[0]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, cfg.dit_warmup, cfg.dit_decay)
        loss = sr_loss(dit, base.text_encoder, cache["latents"][idx], cache["condition"][idx], ids, mask, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema_update(ema, dit, "", ema_decay_at(step, cfg.ema_decay))
        return loss.item()

    def save_fn(done):
        return {"step": done, "dit": dit.state_dict(), "opt": opt.state_dict(), "ema": ema, "rng": _rng_states(),
                "batch": batch, "lr": lr}

    return _train_loop(stage="sr", run_dir=run_dir, steps=steps, log_every=log_every, ckpt_every=ckpt_every,
                       progress=progress, ckpt_path=ckpt_path, state=state, step_fn=step_fn, save_fn=save_fn)


def export_sr(cfg: DemoConfig, run_dir: Path, out: Path, use_ema: bool = True) -> Path:
    """The SR model as a standard model directory: the trained DiT (fp16) with the demo model's
    text encoder, tokenizer and VAE, and run defaults (`upscale`, steps, guidance 1)."""
    from ldm_rt.demo.train import _load, write_model_dir
    from ldm_rt.model_dir import Components
    from ldm_rt.models.dit import DiT

    ckpt_path = run_dir / CKPT
    if not ckpt_path.is_file():
        raise InputError(f"{ckpt_path} does not exist; run `--config sr --stage dit` with this --run-dir first.")
    base = load_base(cfg)
    ck = _load(ckpt_path)
    dit = DiT(cfg.transformer)
    dit.load_state_dict(ck["dit"])
    if use_ema and ck.get("ema") is not None:
        with torch.no_grad():
            for name, p in dit.named_parameters():
                p.copy_(ck["ema"][name])
    components = Components(base.text_encoder, base.tokenizer, dit.eval(), base.vae, cfg.scheduler, cfg.defaults)
    return write_model_dir(components, out, run_dir, ck, use_ema,
                           base_model="ldm_rt/demo/model (text encoder, tokenizer, VAE)")
