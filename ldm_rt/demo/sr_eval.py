"""Measure the 2x super-resolution demo against bicubic upsampling on held-out images.

    python -m ldm_rt.demo.sr_eval [--model-dir ldm_rt/demo/sr_model] [--n 48] [--steps 1 2 4]

Held-out images: the demo's `heldout` split (colour/shape pairings the SR model never saw, drawn
from seeds no training batch used), rendered at 128 px; the 64 px input is their 2x2 box average
(`sr.downscale`, what the SR model was trained on). Each method upsamples the 64 px image to
128 px and is scored against the 128 px render:
- PSNR (dB, 8-bit images, mean over images);
- the demo classifier's (`classify.py`) colour / shape / position read on the output, agreeing
  with its read on the ground truth (fraction of images).
Methods: PIL bicubic, PIL Lanczos (the resize the model's conditioning starts from), the VAE's
round trip of the ground truth itself (its ceiling: any output of a latent model passes through
the decoder), and the SR model at the given step counts (empty prompt, seed 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_rt.demo.classify import classify
from ldm_rt.demo.shapes import make_batch
from ldm_rt.demo.sr import bicubic, downscale

EVAL_SEED = 424_242  # make_batch seed of the held-out images (training used the train split only)


def psnr_8bit(out: np.ndarray, ref: np.ndarray) -> float:
    mse = np.mean((out.astype(np.float64) - ref.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def agreement(outputs: list[np.ndarray], truths: list[np.ndarray]) -> dict[str, float]:
    keys = {"colour": "colour", "shape": "shape", "position": "cell"}
    hits = dict.fromkeys(keys, 0)
    for out, ref in zip(outputs, truths):
        a, b = classify(out), classify(ref)
        for key, attr in keys.items():
            hits[key] += a.ok and getattr(a, attr) == getattr(b, attr)
    return {k: v / len(outputs) for k, v in hits.items()}


def summarise(outputs, truths, seconds=None) -> dict:
    row = {"psnr_db": float(np.mean([psnr_8bit(o, t) for o, t in zip(outputs, truths)])), **agreement(outputs, truths)}
    if seconds is not None:
        row["s_per_image"] = seconds
    return row


@torch.no_grad()
def vae_round_trip(pipe, images: np.ndarray) -> list[np.ndarray]:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    out = pipe.decode(pipe.encode(x, sample_mode="argmax")).clamp(-1, 1)
    return list(((out + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())


def measure(pipe, n: int = 48, steps=(1, 2, 4), seed: int = EVAL_SEED) -> dict[str, dict]:
    truth, _ = make_batch(seed, n, size=128, split="heldout")
    low = downscale(truth)
    truths = list(truth)
    rows = {"bicubic (PIL)": summarise(list(bicubic(low, 128)), truths)}
    lanczos = [np.asarray(Image.fromarray(im).resize((128, 128), Image.Resampling.LANCZOS)) for im in low]
    rows["lanczos (PIL)"] = summarise(lanczos, truths)
    rows["VAE round trip of the 128 px truth (ceiling)"] = summarise(vae_round_trip(pipe, truth), truths)
    for k in steps:
        start = time.perf_counter()
        outs = [np.asarray(pipe.generate("", image=Image.fromarray(im), steps=k, seed=0).images[0]) for im in low]
        rows[f"SR model, {k} step{'s' if k > 1 else ''}"] = summarise(outs, truths, (time.perf_counter() - start) / n)
    return rows


def table(rows: dict[str, dict]) -> str:
    lines = ["| method | PSNR (dB) | colour / shape / position agree with the truth's |", "|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['psnr_db']:.2f} | {r['colour']:.0%} / {r['shape']:.0%} / {r['position']:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from ldm_rt.model_dir import default_sr_model_dir
    from ldm_rt.pipeline import Pipeline

    p = argparse.ArgumentParser(prog="python -m ldm_rt.demo.sr_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    pipe = Pipeline.from_pretrained(a.model_dir or default_sr_model_dir(), device="cpu", dtype="fp32")
    rows = measure(pipe, a.n, tuple(a.steps))
    print(table(rows))
    if a.json is not None:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
