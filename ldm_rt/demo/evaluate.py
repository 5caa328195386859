"""Measure what the demo model draws, and draw the README's grid.

    python -m ldm_rt.demo.evaluate [--model-dir DIR] [--n-single 54] [--n-two 24]
    python -m ldm_rt.demo.evaluate --sweep [--model-dir DIR]
    python -m ldm_rt.demo.evaluate --diversity [--model-dir DIR]
    python -m ldm_rt.demo.evaluate --grid ldm_rt/demo/grid.png

Accuracy is scored by the no-learning classifier of `classify.py` on images generated with the
model's own run defaults (steps, guidance, size: what `ldm-rt run` uses):
- single-object captions from the held-out (colour, shape) pairings, which the model never saw
  in training: colour, position and shape accuracy;
- two-object captions: both colours present, each with its centroid in its named cell;
- `--sweep`: all 24 (colour, shape) pairs (held-out ones included) in each of the natural
  caption forms of issue 19 (`SWEEP_FORMS`: no position, a position after a comma, a trailing
  full stop, no colour); "all" = every attribute the prompt names is right;
- `--diversity`: how much 16 seeds of one prompt differ (spread of the object's centroid and
  size, mean absolute pixel difference between images) against 16 dataset images of the same
  caption, measured the same way (`diversity`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ldm_rt.demo.classify import background_colour, foreground_mask, score
from ldm_rt.demo.shapes import (
    COLOURS, POSITIONS, SHAPES, Scene, _sample_object, caption, heldout_captions, parse_caption, render,
    sample_scenes,
)

# Issue 19's sweep: what a new user types. Every form must parse (shapes.parse_caption). The
# last one names no colour (only its shape and position are scored); its position changes
# with the pair, so each shape is asked for in 8 different cells.
SWEEP_FORMS = (
    "a {colour} {shape}",
    "a {colour} {shape}, in the center",
    "a {colour} {shape}, on the left.",
    "a {shape} {position}",
)

# The README grid: held-out pairings (marked *) next to trained ones, every background, both
# caption forms and two-object scenes.
GRID_PROMPTS = (
    "a red circle on the left on a white background",
    "a red triangle in the center on a gray background",  # *
    "a blue circle in the top right corner on a black background",  # *
    "a green square at the bottom on a white background",  # *
    "a yellow square in the bottom left corner on a black background",
    "a purple circle at the top",  # *
    "a cyan square on the right on a gray background",  # *
    "a orange triangle in the top left corner on a white background",
    "a pink circle in the bottom right corner on a gray background",
    "a blue square in the top left corner and a yellow triangle at the bottom on a white background",
    "a green circle on the left and a red square on the right on a black background",
    "a pink triangle at the top and a cyan circle in the bottom right corner",
)


def single_object_prompts(n: int) -> list[str]:
    """`n` (<= 216) distinct held-out single-object captions. heldout_captions() is ordered by
    pairing, cell, background clause (216 = 6 x 9 x 4); stepping through it with a stride of 37
    (co-prime to 216) spreads any n over every pairing, cell and clause."""
    captions = heldout_captions()
    if not 0 < n <= len(captions):
        raise ValueError(f"n_single must be in 1..{len(captions)}, got {n}.")
    return [captions[(i * 37) % len(captions)] for i in range(n)]


def two_object_prompts(n: int, seed: int = 777) -> list[str]:
    return [caption(s) for s in sample_scenes(seed, n, split="train", two_object_prob=1.0)]


def generate(pipe, prompts: list[str], seed: int, batch: int = 12, progress: bool = False) -> list[np.ndarray]:
    """Images (H, W, 3) uint8 for `prompts` with the pipeline's run defaults; batch k uses seed
    `seed + k` (one generator per batch, as `ldm-rt run --prompt ... --prompt ...` does)."""
    from tqdm.auto import tqdm

    images = []
    chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    for k, chunk in enumerate(tqdm(chunks, desc="generating", disable=not progress)):
        images += [np.asarray(im) for im in pipe.generate(chunk, seed=seed + k).images]
    return images


def evaluate(pipe, n_single: int = 54, n_two: int = 24, seed: int = 0, progress: bool = False) -> dict:
    """Accuracies of the model behind `pipe` (see the module docstring)."""
    single = single_object_prompts(n_single)
    two = two_object_prompts(n_two)
    result = score(generate(pipe, single, seed, progress=progress), single)
    if two:
        result["two_object"] = score(generate(pipe, two, seed + 1000, progress=progress), two)["two_object"]
        result["n_two"] = len(two)
    return result


def sweep_prompts(form: str) -> list[str]:
    """`form` filled with each of the 24 (colour, shape) pairs, in colour, shape order; a
    `{position}` is the pair's own cell, (colour index + 3 x shape index) mod 9."""
    return [form.format(colour=c, Colour=c.capitalize(), shape=s, position=POSITIONS[(i + 3 * j) % len(POSITIONS)])
            for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES)]


def sweep(pipe, forms=SWEEP_FORMS, seed: int = 0, progress: bool = False) -> dict[str, dict]:
    """form -> `score` of its 24 prompts (two batches of 12, seeds `seed` and `seed + 1`)."""
    out = {}
    for form in forms:
        prompts = sweep_prompts(form)
        out[form] = score(generate(pipe, prompts, seed, progress=progress), prompts)
    return out


DIVERSITY_PROMPTS = (
    "a red circle on the left on a white background",
    "a blue circle in the center on a black background",  # held-out pair
    "a green square at the top on a gray background",  # held-out pair
    "a yellow square in the bottom right corner on a white background",
    "a orange triangle on the right on a black background",
    "a pink circle at the bottom on a gray background",
)


def _spread(images: list[np.ndarray], background: str) -> dict:
    """Std over images of the foreground centroid (x, y) and bounding side (mean of width and
    height), as fractions of the image side, and the mean absolute pixel difference (0..255)
    over all image pairs. Images without foreground are left out of the geometry."""
    centres, sides = [], []
    for image in images:
        fg = foreground_mask(image, background_colour(image, background))
        if not fg.any():
            continue
        ys, xs = np.nonzero(fg)
        n = image.shape[0]
        centres.append(((xs.mean() + 0.5) / n, (ys.mean() + 0.5) / n))
        sides.append(((xs.max() - xs.min() + 1) + (ys.max() - ys.min() + 1)) / (2 * n))
    stack = np.stack([im.astype(np.float64) for im in images])  # (K, H, W, 3)
    k = len(images)
    pair = [np.abs(stack[i] - stack[j]).mean() for i in range(k) for j in range(i + 1, k)]
    c = np.asarray(centres).reshape(-1, 2)
    return {"centre_std": float(np.sqrt(c.var(axis=0).sum())) if len(c) > 1 else None,
            "size_std": float(np.std(sides)) if len(sides) > 1 else None,
            "pixel_mad": float(np.mean(pair)), "n_foreground": len(sides)}


def diversity(pipe, prompts=DIVERSITY_PROMPTS, n_seeds: int = 16, progress: bool = False) -> dict[str, dict]:
    """prompt -> {"model": _spread of seeds 0..n_seeds-1 (one image per seed), "data": _spread of
    n_seeds dataset images of that caption (fresh size and jitter, as `sample_scene` draws)}."""
    from tqdm.auto import tqdm

    size = pipe.defaults.get("height", 128)
    out = {}
    for prompt in tqdm(prompts, desc="diversity", disable=not progress):
        (obj,), background = parse_caption(prompt).objects, parse_caption(prompt).background
        model = [np.asarray(pipe.generate(prompt, seed=k).images[0]) for k in range(n_seeds)]
        rng = np.random.default_rng(2024)
        data = [render(Scene((_sample_object(rng, obj.colour, obj.shape, obj.cell),), background, prompt, True), size)
                for _ in range(n_seeds)]
        out[prompt] = {"model": _spread(model, background), "data": _spread(data, background)}
    return out


def make_grid(pipe, prompts=GRID_PROMPTS, seed: int = 0, columns: int = 4) -> "Image.Image":
    """The images of `prompts` in a grid, each captioned underneath (wrapped)."""
    import textwrap

    from PIL import Image, ImageDraw

    images = pipe.generate(list(prompts), seed=seed).images
    w, h = images[0].size
    text_h, pad = 52, 6
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        x, y = pad + (i % columns) * (w + pad), pad + (i // columns) * (h + text_h + pad)
        grid.paste(image, (x, y))
        draw.multiline_text((x, y + h + 2), "\n".join(textwrap.wrap(prompt, 24)[:4]), fill=(0, 0, 0), spacing=1)
    return grid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm_rt.demo.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="default: the built-in demo model")
    p.add_argument("--n-single", type=int, default=54)
    p.add_argument("--n-two", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", type=Path, default=None, help="write the README grid PNG here instead")
    p.add_argument("--sweep", action="store_true", help="score the 24-pair sweep in each SWEEP_FORMS form instead")
    p.add_argument("--diversity", action="store_true", help="measure seed diversity against the dataset's instead")
    a = p.parse_args(argv)

    from ldm_rt.errors import LdmRtError
    from ldm_rt.model_dir import default_model_dir
    from ldm_rt.pipeline import Pipeline

    try:
        pipe = Pipeline.from_pretrained(a.model_dir or default_model_dir(), device="cpu")
        if a.grid is not None:
            make_grid(pipe, seed=a.seed).save(a.grid)
            print(f"wrote {a.grid}")
        elif a.diversity:
            print(json.dumps(diversity(pipe, progress=True), indent=1))
        elif a.sweep:
            print(json.dumps(sweep(pipe, seed=a.seed, progress=True), indent=1))
        else:
            print(json.dumps(evaluate(pipe, a.n_single, a.n_two, a.seed, progress=True), indent=1))
    except LdmRtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
