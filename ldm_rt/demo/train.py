"""Train the built-in demo model on the procedural shapes dataset, in three resumable stages.

    python -m ldm_rt.demo.train --stage vae    --run-dir runs/demo --steps 3000
    python -m ldm_rt.demo.train --stage dit    --run-dir runs/demo --steps 30000
    python -m ldm_rt.demo.train --stage export --run-dir runs/demo [--out DIR]  # default runs/demo/model

- `vae`: AutoencoderKL (encoder + decoder) on fresh rendered images in [-1, 1] (foreground-
  centred crops); MSE + KL (1e-6).
- `dit`: VAE frozen; a fixed dataset (`num_train_images` scenes of the train split) is encoded
  once to latents (posterior mean, then shifted and scaled to unit std) and cached in the run
  dir with its tokenised captions; the DiT and the CLIP text encoder are trained jointly from
  scratch with flow matching: x_t = (1 - t) x0 + t noise, target v = noise - x0, t logit-normal
  (SD3), DiT timestep input t * 1000 (the scale of `FlowMatchEuler.timesteps`), captions
  dropped to "" (the pipeline's unconditional prompt) with probability `caption_dropout`.
  With `caption_variation` (the default) each step shows its images under shortened captions
  (`shapes.vary_caption`: position, background, article or colour left out at random), drawn
  from a generator seeded by (seed, step) and tokenised on the fly.
  An EMA of both is kept and exported.
- `export`: a standard model directory (fp16 safetensors + `_ldm_rt_defaults`).

`--steps` is the total target: re-running the same command resumes from the run dir's last
checkpoint (weights, optimiser, step, RNG states) and goes on. The batch and noise of step k
are drawn from a generator seeded by (seed, k), so a resumed run is bit-identical to a straight
one.

Without the run dir's `dit.pt` (150 MB with the optimiser state, too big to commit), `--stage
dit --init-from MODEL_DIR` goes on from an exported model instead: the shipped model holds the
EMA weights and its `training.json` the step they were exported at. The DiT and text encoder
start from those weights (and the EMA too), at that step of the schedule, with a fresh AdamW
whose learning rate warms up again over `dit_warmup` steps. That is a warm start, close to but
not bit-identical with the run that made the model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldm_rt.demo.demo_config import DemoConfig, demo_config
from ldm_rt.demo.shapes import VOCABULARY, make_batch, parse_caption, vary_caption
from ldm_rt.errors import InputError, LdmRtError
from ldm_rt.models.dit import DiT
from ldm_rt.models.text_encoder import CLIPTextModel
from ldm_rt.models.vae import AutoencoderKL
from ldm_rt.tokenizer import BOS, END_OF_WORD, EOS, CLIPTokenizer, _CLIP_BYTE_RANK

STAGES = ("vae", "dit", "export")
DEFAULT_OUT = Path(__file__).parent / "model"
TRAINING_INFO = "training.json"  # written into an exported model dir: config, seed, DiT step
RUN_TOKENIZER = "tokenizer"  # the run dir's tokenizer folder
_DATA_SEED_BASE = 1_000_003  # the fixed dit dataset uses make_batch seeds from here on


# ----------------------------------------------------------------------------- tokenizer

def build_tokenizer(max_length: int) -> CLIPTokenizer:
    """A CLIP-format BPE trained with `tokenizers` on the caption vocabulary.

    Ids 0..511 are the 256 byte symbols and their "</w>" forms (CLIP's order), so any text
    tokenises (unknown words fall back to bytes); then the trainer's merged symbols, which
    include every VOCABULARY word as one "word</w>" token; then bos and eos (pad = eos, as CLIP).
    Punctuation is stripped before tokenising (`strip_punctuation`): captions never show any.

    Not reproducible: the trainer breaks ties between equally frequent pairs at random, so two
    builds may number some merged symbols differently. A run builds it once (`run_tokenizer`).
    """
    return CLIPTokenizer.from_vocab(*_bpe_vocab_merges(), max_length, strip_punctuation=True)


def _bpe_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(end_of_word_suffix=END_OF_WORD))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # caption words are lowercase ascii letters
    # An unreachable vocab_size: merging goes on until every word is a single symbol.
    trainer = BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False, end_of_word_suffix=END_OF_WORD)
    tok.train_from_iterator([" ".join(VOCABULARY)], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    symbols = sorted(_CLIP_BYTE_RANK, key=_CLIP_BYTE_RANK.__getitem__)
    vocab = {s: i for i, s in enumerate(symbols + [s + END_OF_WORD for s in symbols])}
    for token, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def run_tokenizer(cfg: DemoConfig, run_dir: Path) -> CLIPTokenizer:
    """The run's tokenizer, built once and kept in `run_dir/tokenizer/`, so the ids the text
    encoder learns are the ids the exported model is given (`build_tokenizer` is not
    reproducible). A run dir made before tokenizers were kept has only its latent cache: the
    ids of a new build are then renumbered to the cached ones. Punctuation is always stripped
    (a run dir made before that flag existed is upgraded in place: the ids do not change)."""
    max_length = cfg.text_encoder.max_position_embeddings
    path = run_dir / RUN_TOKENIZER
    if (path / "tokenizer.json").is_file():
        tokenizer = CLIPTokenizer.from_dir(path, max_length, strip_punctuation=True)
        tokenizer.save(path)
        return tokenizer
    vocab, merges = _bpe_vocab_merges()
    cache_path = run_dir / "latents.pt"
    if cache_path.is_file():
        vocab = renumber_to_cache(vocab, _load(cache_path))
    tokenizer = CLIPTokenizer.from_vocab(vocab, merges, max_length, strip_punctuation=True)
    tokenizer.save(path)
    return tokenizer


def renumber_to_cache(vocab: dict[str, int], cache: dict) -> dict[str, int]:
    """`vocab` with each caption word's token moved to the id the cache's captions give it
    (swapping ids with whatever token held that id). Each caption word is one token."""
    wanted: dict[str, int] = {}
    for caption, ids in zip(cache["captions"], cache["input_ids"].tolist()):
        words = caption.split()
        for word, i in zip(words, ids[1 : 1 + len(words)]):  # ids[0] is bos
            wanted.setdefault(word + END_OF_WORD, i)
    vocab = dict(vocab)
    for token, i in wanted.items():
        holder = next(t for t, j in vocab.items() if j == i)
        vocab[holder], vocab[token] = vocab[token], i
    return vocab


def check_tokenizer(tokenizer: CLIPTokenizer, cache: dict, where: str) -> None:
    """The tokenizer must give the cached captions their cached ids (what the text encoder learned)."""
    n = min(512, len(cache["captions"]))
    if not torch.equal(tokenizer(cache["captions"][:n]).input_ids, cache["input_ids"][:n]):
        raise InputError(f"{where}: the tokenizer does not give the cached captions the ids the text encoder "
                         "was trained on; use the run dir's tokenizer/ (see run_tokenizer).")


# ----------------------------------------------------------------------------- helpers

def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one step's batch and noise: a function of (seed, step) only."""
    return torch.Generator("cpu").manual_seed(seed * 1_000_000_007 + step)


def lr_at(step: int, peak: float, warmup: int, decay: int = 0) -> float:
    """Linear warmup to `peak`; then, with `decay` > 0, a linear decay to peak / 10 at step
    `decay`, constant after it (else constant at `peak`). The schedule depends on the config
    only, not on `--steps`, so a resume stays exact when `--steps` is raised later."""
    lr = peak * min(1.0, (step + 1) / max(1, warmup))
    if decay > warmup and step >= warmup:
        lr = peak * (1.0 - 0.9 * min(1.0, (step - warmup) / (decay - warmup)))
    return lr


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


class Logger:
    def __init__(self, run_dir: Path, stage: str, bar):
        self.path, self.stage, self.bar = run_dir / "log.jsonl", stage, bar

    def __call__(self, **record) -> None:
        record = {"stage": self.stage, **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        self.bar.write(text) if self.bar is not None else print(text)


def _run_info(run_dir: Path, config_name: str, seed: int) -> None:
    """run.json pins the config and seed of a run dir; a mismatch is an error, not a silent mix."""
    path = run_dir / "run.json"
    info = {"config": config_name, "seed": seed}
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != info:
            raise InputError(
                f"run dir {run_dir} was started with {stored}, not {info}; use a new --run-dir or the same settings."
            )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info) + "\n")


# ----------------------------------------------------------------------------- EMA

@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], module: torch.nn.Module, prefix: str, decay: float) -> None:
    for name, p in module.named_parameters():
        ema[prefix + name].lerp_(p.detach(), 1.0 - decay)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up of the EMA decay, as in diffusers' EMAModel: min(decay, (1 + k) / (10 + k))."""
    return min(decay, (1 + step) / (10 + step))


# ----------------------------------------------------------------------------- stage: vae

def vae_loss(vae: AutoencoderKL, x: torch.Tensor, gen: torch.Generator, kl_weight: float):
    mean, logvar = vae.encode(x)  # (B, Cz, h, w) each
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
    recon = vae.decode(z)  # (B, 3, H, W)
    # MSE, not L1: with L1 the first CPU run (64 px crops, lr 1e-3) settled on the background
    # (the median pixel) and stalled at 20.5 dB; MSE makes a missed object cost enough to learn.
    rec = F.mse_loss(recon, x)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
    return rec + kl_weight * kl, rec


def _crop_centre(img: torch.Tensor, gen: torch.Generator, fg_prob: float) -> tuple[int, int]:
    """(row, col) a crop is centred on: with probability `fg_prob` a random foreground pixel
    (one that differs from the top-left pixel, i.e. from the background), else any pixel."""
    fg = ((img - img[:, :1, :1]).abs().sum(0) > 0.3).nonzero()  # (K, 2)
    if len(fg) and torch.rand(1, generator=gen).item() < fg_prob:
        return tuple(fg[torch.randint(len(fg), (1,), generator=gen).item()].tolist())
    return tuple(torch.randint(img.shape[-1], (2,), generator=gen).tolist())


def vae_batch(cfg: DemoConfig, seed: int, step: int, batch: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Fresh train-split images of step `step` in [-1, 1]; with `cfg.vae_crop`, one crop of that
    side per image, centred on a foreground pixel with probability `cfg.vae_crop_fg` (uniform
    crops are mostly background: the first run learnt to paint the background only)."""
    images, _ = make_batch(seed * 1_000_003 + step, batch, size=cfg.image_size, split="train")
    x = to_tensor(images)  # (B, 3, S, S)
    c, s = cfg.vae_crop, cfg.image_size
    if c is None or c >= s:
        return x
    crops = []
    for img in x:
        cy, cx = _crop_centre(img, gen, cfg.vae_crop_fg)
        i, j = min(max(cy - c // 2, 0), s - c), min(max(cx - c // 2, 0), s - c)
        crops.append(img[:, i : i + c, j : j + c])
    return torch.stack(crops)  # (B, 3, c, c)


def _train_loop(*, stage, run_dir, steps, log_every, ckpt_every, progress, ckpt_path, state, step_fn, save_fn):
    from tqdm.auto import tqdm

    start = state["step"]
    bar = tqdm(total=steps, initial=start, desc=stage, disable=not progress, dynamic_ncols=True)
    log = Logger(run_dir, stage, bar if progress else None)
    losses = []
    t0, window = time.perf_counter(), []
    for step in range(start, steps):
        loss = step_fn(step)
        losses.append(loss)
        window.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        done = step + 1
        if done % log_every == 0 or done == steps:
            dt = (time.perf_counter() - t0) / len(window)
            log(step=done, loss=float(np.mean(window)), s_per_step=dt)
            t0, window = time.perf_counter(), []
        if done % ckpt_every == 0 or done == steps:
            _save_atomic(save_fn(done), ckpt_path)
    bar.close()
    return losses


def train_vae(cfg: DemoConfig, run_dir: Path, steps: int, seed: int, batch: int, lr: float, log_every: int,
              ckpt_every: int, progress: bool, overfit: bool) -> list[float]:
    ckpt_path = run_dir / "vae.pt"
    torch.manual_seed(seed)
    vae = AutoencoderKL(cfg.vae)  # PyTorch's default init
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    state = {"step": 0}
    if ckpt_path.is_file():
        ck = _load(ckpt_path)
        vae.load_state_dict(ck["vae"])
        opt.load_state_dict(ck["opt"])
        _set_rng_states(ck["rng"])
        state["step"] = ck["step"]
    vae.train()

    def step_fn(step):
        gen = step_generator(seed, 0 if overfit else step)
        x = vae_batch(cfg, seed, 0 if overfit else step, batch, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, cfg.vae_warmup, cfg.vae_decay)
        loss, rec = vae_loss(vae, x, gen, cfg.vae_kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return rec.item()

    def save_fn(done):
        return {"step": done, "vae": vae.state_dict(), "opt": opt.state_dict(), "rng": _rng_states(),
                "batch": batch, "lr": lr}

    return _train_loop(stage="vae", run_dir=run_dir, steps=steps, log_every=log_every, ckpt_every=ckpt_every,
                       progress=progress, ckpt_path=ckpt_path, state=state, step_fn=step_fn, save_fn=save_fn)


def load_vae(cfg: DemoConfig, run_dir: Path) -> AutoencoderKL:
    path = run_dir / "vae.pt"
    if not path.is_file():
        raise InputError(f"{path} does not exist; run `--stage vae` with this --run-dir first.")
    vae = AutoencoderKL(cfg.vae)
    vae.load_state_dict(_load(path)["vae"])
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, cfg: DemoConfig, n: int = 64, seed: int = 12345) -> float:
    """PSNR (dB, images in [0, 1]) of mean-latent reconstructions of held-out-split images."""
    images, _ = make_batch(seed, n, size=cfg.image_size, split="heldout")
    x = to_tensor(images)
    errs = []
    for chunk in x.split(16):
        recon = vae.decode(vae.encode(chunk)[0]).clamp(-1, 1)
        errs.append(((recon - chunk) / 2).pow(2).mean(dim=(1, 2, 3)))
    mse = torch.cat(errs)
    return float((-10 * torch.log10(mse.clamp_min(1e-10))).mean())


# ----------------------------------------------------------------------------- stage: dit

@torch.no_grad()
def latent_cache(cfg: DemoConfig, run_dir: Path, tokenizer: CLIPTokenizer, progress: bool = True) -> dict:
    """The fixed dit dataset: scaled latents (N, Cz, h, w), caption ids and masks (N, M), and the
    VAE's shift and scale (latents = (mean - shift) * scale have mean 0, std 1). Cached in
    `latents.pt` so restarts are cheap."""
    from tqdm.auto import tqdm

    path = run_dir / "latents.pt"
    if path.is_file():
        return _load(path)
    vae = load_vae(cfg, run_dir)
    n, chunk = cfg.num_train_images, 250
    means, captions = [], []
    for k in tqdm(range(0, n, chunk), desc="encoding dataset", disable=not progress):
        images, caps = make_batch(_DATA_SEED_BASE + k, min(chunk, n - k), size=cfg.image_size, split="train")
        x = to_tensor(images)
        means += [vae.encode(part)[0] for part in x.split(50)]
        captions += caps
    latents = torch.cat(means)  # (N, Cz, h, w) raw posterior means
    shift, std = latents.mean().item(), latents.std().item()
    tokens = tokenizer(captions)
    cache = {"latents": (latents - shift) / std, "input_ids": tokens.input_ids, "mask": tokens.attention_mask,
             "captions": captions, "shift_factor": shift, "scaling_factor": 1.0 / std}
    _save_atomic(cache, path)
    return cache


def flow_matching_loss(dit: DiT, text_encoder: CLIPTextModel, x0, input_ids, mask, gen: torch.Generator):
    """x_t = (1 - t) x0 + t noise; the DiT predicts v = noise - x0 at timestep t * 1000."""
    b = x0.shape[0]
    t = torch.sigmoid(torch.randn(b, generator=gen))  # (B,) logit-normal(0, 1), as SD3
    noise = torch.randn(x0.shape, generator=gen)
    tt = t.view(b, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    states, pooled = text_encoder(input_ids)  # (B, M, D), (B, D)
    pred = dit(xt, t * 1000.0, states, mask, pooled)
    return F.mse_loss(pred, noise - x0)


def _warm_start(config_name: str, seed: int, model_dir: Path, cache: dict, tokenizer: CLIPTokenizer,
                dit: DiT, text_encoder: CLIPTextModel) -> int:
    """Load an exported model's weights into `dit` and `text_encoder`; returns its DiT step."""
    from ldm_rt.model_dir import load_model_dir

    info_path = Path(model_dir) / TRAINING_INFO
    if not info_path.is_file():
        raise InputError(f"--init-from {model_dir} has no {TRAINING_INFO}; give a model directory written by "
                         "`--stage export` (the built-in one is ldm_rt/demo/model).")
    info = json.loads(info_path.read_text())
    if (info.get("config"), info.get("seed")) != (config_name, seed):
        raise InputError(f"--init-from {model_dir} was trained with config {info.get('config')!r} and seed "
                         f"{info.get('seed')}, not {config_name!r} and {seed}; use the same settings.")
    components = load_model_dir(model_dir)
    vae = components.vae.config
    if abs(vae.scaling_factor - cache["scaling_factor"]) > 1e-4 * cache["scaling_factor"] or \
            abs((vae.shift_factor or 0.0) - cache["shift_factor"]) > 1e-4:
        raise InputError(f"--init-from {model_dir} was trained on the latents of another VAE than this run dir's "
                         "(its latent scaling differs); copy that run's vae.pt, or start the DiT from scratch.")
    if components.tokenizer.vocab != tokenizer.vocab:
        raise InputError(f"--init-from {model_dir} numbers its tokens differently from this run dir's tokenizer/; "
                         "its text encoder would read other ids. Copy the tokenizer/ of the run that made it.")
    dit.load_state_dict({k: v.float() for k, v in components.transformer.state_dict().items()})
    text_encoder.load_state_dict({k: v.float() for k, v in components.text_encoder.state_dict().items()})
    return int(info["dit_step"])


def train_dit(cfg: DemoConfig, run_dir: Path, steps: int, seed: int, batch: int, lr: float, log_every: int,
              ckpt_every: int, progress: bool, overfit: bool, init_from: Path | None = None,
              config_name: str = "demo") -> list[float]:
    ckpt_path = run_dir / "dit.pt"
    if init_from is not None and not (run_dir / RUN_TOKENIZER).is_dir() and (Path(init_from) / "tokenizer").is_dir():
        shutil.copytree(Path(init_from) / "tokenizer", run_dir / RUN_TOKENIZER)  # a warm start reads its model's ids
    tokenizer = run_tokenizer(cfg, run_dir)
    cache = latent_cache(cfg, run_dir, tokenizer, progress)
    check_tokenizer(tokenizer, cache, str(run_dir))
    empty = tokenizer([""])
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(cfg.text_encoder_config(tokenizer))
    dit = DiT(cfg.transformer)
    dit.initialize_weights()  # adaLN-Zero
    params = list(dit.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = None
    if cfg.ema_decay > 0:
        ema = {"dit." + k: v.detach().clone() for k, v in dit.named_parameters()}
        ema |= {"text_encoder." + k: v.detach().clone() for k, v in text_encoder.named_parameters()}
    state = {"step": 0, "init_step": None}
    if ckpt_path.is_file():
        if init_from is not None:
            raise InputError(f"{ckpt_path} exists: the run goes on from it; drop --init-from (it starts a run).")
        ck = _load(ckpt_path)
        dit.load_state_dict(ck["dit"])
        text_encoder.load_state_dict(ck["text_encoder"])
        opt.load_state_dict(ck["opt"])
        if ema is not None:
            ema = ck["ema"]
        _set_rng_states(ck["rng"])
        state["step"], state["init_step"] = ck["step"], ck.get("init_step")
    elif init_from is not None:
        state["step"] = state["init_step"] = _warm_start(config_name, seed, init_from, cache, tokenizer, dit, text_encoder)
        if ema is not None:  # the exported weights are the EMA's
            ema = {"dit." + k: v.detach().clone() for k, v in dit.named_parameters()}
            ema |= {"text_encoder." + k: v.detach().clone() for k, v in text_encoder.named_parameters()}
    dit.train()
    text_encoder.train()
    n = cache["latents"].shape[0]
    varied = cfg.caption_variation is not None or any(v is not None for _, v in cfg.caption_variation_from)
    specs = [parse_caption(c) for c in cache["captions"]] if varied else None

    def step_fn(step):
        gen = step_generator(seed, 0 if overfit else step)
        idx = torch.randint(n, (batch,), generator=gen)
        x0 = cache["latents"][idx]
        variation = cfg.caption_variation_at(step)
        if variation is None:
            ids, mask = cache["input_ids"][idx].clone(), cache["mask"][idx].clone()
        else:  # the cached images under shortened captions, a function of (seed, step)
            rng = np.random.default_rng([seed, 0 if overfit else step])
            tokens = tokenizer([vary_caption(specs[i], rng, variation) for i in idx.tolist()])
            ids, mask = tokens.input_ids, tokens.attention_mask
        drop = torch.rand(batch, generator=gen) < cfg.caption_dropout
        ids[drop], mask[drop] = empty.input_ids[0], empty.attention_mask[0]
        rate = lr_at(step, lr, cfg.dit_warmup, cfg.dit_decay)
        if state["init_step"] is not None:  # a warm start: the fresh AdamW warms up again
            rate *= min(1.0, (step - state["init_step"] + 1) / max(1, cfg.dit_warmup))
        for group in opt.param_groups:
            group["lr"] = rate
        loss = flow_matching_loss(dit, text_encoder, x0, ids, mask, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            decay = ema_decay_at(step, cfg.ema_decay)
            ema_update(ema, dit, "dit.", decay)
            ema_update(ema, text_encoder, "text_encoder.", decay)
        return loss.item()

    def save_fn(done):
        return {"step": done, "dit": dit.state_dict(), "text_encoder": text_encoder.state_dict(),
                "opt": opt.state_dict(), "ema": ema, "rng": _rng_states(), "batch": batch, "lr": lr,
                "init_step": state["init_step"]}

    return _train_loop(stage="dit", run_dir=run_dir, steps=steps, log_every=log_every, ckpt_every=ckpt_every,
                       progress=progress, ckpt_path=ckpt_path, state=state, step_fn=step_fn, save_fn=save_fn)


# ----------------------------------------------------------------------------- stage: export

def export(cfg: DemoConfig, run_dir: Path, out: Path, use_ema: bool = True) -> Path:
    """Write the run's model as a standard model directory (fp16 weights, run defaults)."""
    from ldm_rt.model_dir import Components

    ckpt_path = run_dir / "dit.pt"
    if not ckpt_path.is_file():
        raise InputError(f"{ckpt_path} does not exist; run `--stage dit` with this --run-dir first.")
    tokenizer = run_tokenizer(cfg, run_dir)
    cache = latent_cache(cfg, run_dir, tokenizer, progress=False)
    check_tokenizer(tokenizer, cache, str(run_dir))
    ck = _load(ckpt_path)
    text_encoder = CLIPTextModel(cfg.text_encoder_config(tokenizer))
    dit = DiT(cfg.transformer)
    dit.load_state_dict(ck["dit"])
    text_encoder.load_state_dict(ck["text_encoder"])
    if use_ema and ck.get("ema") is not None:
        with torch.no_grad():
            for prefix, module in (("dit.", dit), ("text_encoder.", text_encoder)):
                for name, p in module.named_parameters():
                    p.copy_(ck["ema"][prefix + name])
    vae = load_vae(cfg, run_dir)
    vae.config = replace(cfg.vae, scaling_factor=cache["scaling_factor"], shift_factor=cache["shift_factor"])
    components = Components(text_encoder.eval(), tokenizer, dit.eval(), vae, cfg.scheduler, cfg.defaults)
    return write_model_dir(components, out, run_dir, ck, use_ema, continue_with=(
        "ldm-rt train-demo --stage dit --run-dir RUN_DIR --init-from THIS_DIR --steps N"))


def write_model_dir(components, out, run_dir: Path, ck: dict, use_ema: bool, **info) -> Path:
    """Save an exported demo model (fp16, replacing an earlier export at `out`) with its training
    record: the run's settings, the checkpoint's step, which weights, and `info`."""
    from ldm_rt.model_dir import save_model_dir

    out = Path(out)
    if out.exists() and (out / "model_index.json").is_file():
        shutil.rmtree(out)
    save_model_dir(components, out, dtype=torch.float16)
    run = json.loads((run_dir / "run.json").read_text())
    record = {**run, "dit_step": ck["step"], "weights": "EMA" if use_ema and ck.get("ema") is not None else "raw",
              **info}
    (out / TRAINING_INFO).write_text(json.dumps(record, indent=1) + "\n")
    return out


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


# ----------------------------------------------------------------------------- entry point

def train(stage: str, run_dir: str | Path, steps: int = 0, seed: int = 0, batch: int | None = None,
          lr: float | None = None, log_every: int = 50, ckpt_every: int = 500, config: str = "demo",
          out: str | Path | None = None, progress: bool = True, overfit: bool = False,
          init_from: str | Path | None = None):
    """One stage (`vae`, `dit` or `export`) in `run_dir`; returns the losses of the steps run
    (for `export`, the model directory written). `overfit` repeats step 0's batch and noise
    (tests only); `init_from` (dit only) warm-starts from an exported model directory."""
    if stage not in STAGES:
        raise InputError(f"--stage {stage!r}; use one of {', '.join(STAGES)}.")
    cfg = demo_config(config)
    run_dir = Path(run_dir)
    _run_info(run_dir, config, seed)
    if init_from is not None and stage != "dit":
        raise InputError(f"--init-from applies to --stage dit, not {stage}.")
    if cfg.upscale > 1 and stage == "vae":
        raise InputError(f"--config {config} reuses the demo model's VAE ({cfg.base_model}); train --stage dit.")
    if stage == "export" and cfg.upscale > 1:
        from ldm_rt.demo.sr import export_sr

        return export_sr(cfg, run_dir, Path(out) if out is not None else run_dir / "model")
    if stage == "export":
        # Into the run dir by default, never into the installed package (issue 19); run_cli says how to ship it.
        path = export(cfg, run_dir, Path(out) if out is not None else run_dir / "model")
        return path
    if steps < 1:
        raise InputError(f"--steps {steps}: give the total number of steps (>= 1).")
    if log_every < 1 or ckpt_every < 1:
        raise InputError("--log-every and --ckpt-every must be >= 1.")
    if stage == "vae":
        return train_vae(cfg, run_dir, steps, seed, batch or cfg.vae_batch, lr or cfg.vae_lr, log_every,
                         ckpt_every, progress, overfit)
    if cfg.upscale > 1:
        if init_from is not None:
            raise InputError(f"--init-from does not apply to --config {config}.")
        from ldm_rt.demo.sr import train_sr

        return train_sr(cfg, run_dir, steps, seed, batch or cfg.dit_batch, lr or cfg.dit_lr, log_every, ckpt_every,
                        progress, overfit)
    return train_dit(cfg, run_dir, steps, seed, batch or cfg.dit_batch, lr or cfg.dit_lr, log_every,
                     ckpt_every, progress, overfit, None if init_from is None else Path(init_from), config)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ldm_rt.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=0, help="total step target (resumes from the last checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--config", default="demo", help="demo (the shipped model), sr (the 2x super-resolution demo) "
                   "or tiny (tests)")
    p.add_argument("--out", type=Path, default=None, help="export directory (default RUN_DIR/model)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="dit: warm-start a run dir without dit.pt from an exported model (e.g. ldm_rt/demo/model)")
    return p.parse_args(argv)


def run_cli(stage, run_dir, steps, seed, batch, lr, log_every, ckpt_every, config, out, init_from=None) -> None:
    """What both `python -m ldm_rt.demo.train` and `ldm-rt train-demo` do."""
    torch.set_num_threads(int(os.environ.get("LDM_RT_TRAIN_THREADS", 0)) or os.cpu_count() or 1)
    result = train(stage, run_dir, steps, seed, batch, lr, log_every, ckpt_every, config, out, init_from=init_from)
    cfg = demo_config(config)
    if stage == "export":
        print(f"wrote {result} ({dir_size_mb(result):.1f} MB)")
        if Path(result).resolve() != DEFAULT_OUT.resolve():
            print(f"to make it the built-in model (what `ldm-rt run` uses without --model-dir), copy it over "
                  f"{DEFAULT_OUT}, or export with --out {DEFAULT_OUT}")
    elif stage == "vae":
        print(f"vae: held-out PSNR {vae_psnr(load_vae(cfg, Path(run_dir)), cfg):.2f} dB")


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        run_cli(a.stage, a.run_dir, a.steps, a.seed, a.batch, a.lr, a.log_every, a.ckpt_every, a.config, a.out,
                a.init_from)
    except LdmRtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
