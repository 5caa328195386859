"""Measure image-to-image and inpainting on the demo model with the no-learning classifier.

    python -m ldm_rt.demo.img2img_eval [--model-dir DIR] [--n 12] [--seed 0]

Inputs are rendered held-out single-object scenes (`shapes.sample_scenes(split="heldout")`); each
is run with a *conflicting* prompt (another colour, shape and cell, the same background), so
the classifier tells which one the output shows:
- "keeps": the output's colour / shape / position equal the input image's;
- "follows": they equal the prompt's.
A low strength should keep the input, strength 1 should follow the prompt. Inpainting: the mask
repaints the image's half away from the object, the prompt asks for a second object there
(`check_two_objects`), and the kept half's pixels are compared with the input's.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from ldm_rt.demo.classify import check_two_objects, classify
from ldm_rt.demo.shapes import (COLOURS, POSITIONS, SHAPES, CaptionSpec, ObjectSpec, caption, parse_caption, render,
                               sample_scenes)

STRENGTHS = (0.3, 1.0)


def conflicting_prompt(obj, background: str, rng: np.random.Generator) -> tuple[str, ObjectSpec]:
    """A caption naming another colour, shape and cell than `obj`, on the same background."""
    colour = rng.choice([c for c in COLOURS if c != obj.colour])
    shape = rng.choice([s for s in SHAPES if s != obj.shape])
    cell = int(rng.choice([c for c in range(len(POSITIONS)) if c != obj.cell]))
    want = ObjectSpec(str(colour), str(shape), cell)
    return caption(CaptionSpec((want,), background)), want


def _rates(images, objects, backgrounds) -> dict[str, float]:
    hits = {"colour": 0, "shape": 0, "position": 0, "all": 0}
    for image, obj, background in zip(images, objects, backgrounds):
        got = classify(np.asarray(image), background)
        right = {"colour": got.colour == obj.colour, "shape": got.shape == obj.shape, "position": got.cell == obj.cell}
        right["all"] = all(right.values())
        for key, ok in right.items():
            hits[key] += ok
    return {key: h / len(objects) for key, h in hits.items()}


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]


def measure(pipe, n: int = 12, seed: int = 0, strengths=STRENGTHS) -> dict:
    """{"strength S": {"keeps": rates, "follows": rates}, "inpaint": {...}} over `n` held-out scenes."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(seed, n, split="heldout")
    images = np.stack([render(s) for s in scenes])  # (n, 128, 128, 3) uint8
    inputs = [s.objects[0] for s in scenes]
    backgrounds = [s.background for s in scenes]
    prompts, wanted = zip(*(conflicting_prompt(o, s.background, rng) for o, s in zip(inputs, scenes)))
    out: dict = {"n": n}
    for strength in strengths:
        result = pipe.generate(list(prompts), image=_as_tensor(images), strength=strength, seed=seed)
        out[f"strength {strength:g}"] = {"keeps": _rates(result.images, inputs, backgrounds),
                                         "follows": _rates(result.images, wanted, backgrounds),
                                         "steps_run": result.steps - pipe.make_scheduler(
                                             torch.zeros(1, 4, 16, 16), result.steps).img2img_start(strength)}
    out["inpaint"] = inpaint(pipe, scenes, images, seed)
    return out


def inpaint(pipe, scenes, images: np.ndarray, seed: int) -> dict:
    """Repaint the half of the image (left or right, 3 of 8 columns' margin from the middle) that
    does not hold the object, asking for a second object there; measure the kept half."""
    size = images.shape[1]
    masks, prompts, keep_cols = [], [], []
    for scene in scenes:
        obj = scene.objects[0]
        object_left = obj.center_xy[0] < 0.5
        mask = np.zeros((size, size), dtype=np.float32)
        half = slice(size // 2, size) if object_left else slice(0, size // 2)
        mask[:, half] = 1.0
        cell = 5 if object_left else 3  # "on the right" / "on the left"
        colour = next(c for c in COLOURS if c != obj.colour and c != "pink")
        second = ObjectSpec(colour, "square", cell)
        prompts.append(caption(CaptionSpec((ObjectSpec(obj.colour, obj.shape, obj.cell), second), scene.background)))
        masks.append(mask)
        keep_cols.append(slice(0, 3 * size // 8) if object_left else slice(5 * size // 8, size))
    result = pipe.generate(prompts, image=_as_tensor(images), mask_image=torch.from_numpy(np.stack(masks))[:, None],
                           strength=1.0, seed=seed)
    outs = [np.asarray(im).astype(np.float64) for im in result.images]
    kept_error = [np.abs(o[:, c] - i[:, c].astype(np.float64)).mean() for o, i, c in zip(outs, images, keep_cols)]
    both = [check_two_objects(o.astype(np.uint8), parse_caption(p)) for o, p in zip(outs, prompts)]
    return {"kept_region_mean_abs_error_0_255": float(np.mean(kept_error)),
            "kept_region_max_of_means": float(np.max(kept_error)),
            "two_objects_rate": float(np.mean(both))}


def main(argv=None) -> int:
    from ldm_rt.model_dir import default_model_dir
    from ldm_rt.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pipe = Pipeline.from_pretrained(args.model_dir or default_model_dir(), device="cpu", dtype="fp32")
    print(json.dumps(measure(pipe, args.n, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
