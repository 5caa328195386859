"""Rule-based classifier for demo-shape images: does an image show what its caption asked?

No learning; the rule is fixed so a score means the same thing across runs and models:

1. background = the caption's background colour if it names one, else the palette background
   nearest to the median colour of the image's border pixels;
2. foreground = pixels whose RGB distance to the background exceeds 60 (the closest palette
   pair, purple on gray, is 92.8 apart);
3. colour = the object palette entry nearest to the mean foreground colour;
4. position = the 3 x 3 cell (in thirds of the image) holding the foreground centroid;
5. shape = fill ratio of the foreground's bounding box: square above 0.9 (a square fills 1.0),
   circle above 0.65 (pi / 4 = 0.785), else triangle (0.5).

Two-object captions are checked per colour instead (`check_two_objects`). What a caption does
not name (a shortened caption: no position, no colour) is free: it counts as right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ldm_rt.demo.shapes import BACKGROUNDS, COLOURS, CaptionSpec, Scene, parse_caption

FOREGROUND_DISTANCE = 60.0
SQUARE_FILL = 0.9
CIRCLE_FILL = 0.65
# A named colour counts as present in a two-object image when at least this fraction of the
# image's pixels are nearest to it: 0.01 is 41% of the smallest object (a 22% triangle covers
# 2.4% of the image) and above the ~50 px of anti-aliased red-on-white edge that reads as pink.
MIN_PRESENT_FRAC = 0.01

_PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float64)  # (8, 3)
_COLOUR_NAMES = list(COLOURS)


@dataclass(frozen=True)
class Prediction:
    """What the classifier sees; all None with ok=False when the image has no foreground."""

    colour: str | None
    shape: str | None
    cell: int | None
    ok: bool


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has shape {image.shape}; pass one RGB image (H, W, 3) uint8.")
    return image.astype(np.float64)


def background_colour(image: np.ndarray, background: str | None) -> np.ndarray:
    """(3,) RGB of the named background, or of the palette background nearest the border median."""
    if background is not None:
        if background not in BACKGROUNDS:
            raise ValueError(f"background={background!r}; use one of {list(BACKGROUNDS)} or None.")
        return np.asarray(BACKGROUNDS[background], dtype=np.float64)
    img = _check_image(image)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (2H + 2W, 3)
    median = np.median(border, axis=0)
    names = list(BACKGROUNDS)
    dist = [np.linalg.norm(median - np.asarray(BACKGROUNDS[n])) for n in names]
    return np.asarray(BACKGROUNDS[names[int(np.argmin(dist))]], dtype=np.float64)


def foreground_mask(image: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """(H, W) bool: RGB distance to the background above FOREGROUND_DISTANCE."""
    return np.linalg.norm(_check_image(image) - bg, axis=-1) > FOREGROUND_DISTANCE


def _nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) -> (N,) index into the object palette."""
    return np.argmin(((rgb[:, None, :] - _PALETTE[None]) ** 2).sum(-1), axis=1)  # (N, 8) -> (N,)


def _cell(ys: np.ndarray, xs: np.ndarray, height: int, width: int) -> int:
    """Cell (3 * row + col) of the centroid of pixels (ys, xs), taking pixel centres."""
    cx, cy = (xs.mean() + 0.5) / width, (ys.mean() + 0.5) / height
    return 3 * min(int(cy * 3), 2) + min(int(cx * 3), 2)


def classify(image: np.ndarray, background: str | None = None) -> Prediction:
    """Colour, shape and cell of the single object in `image` (H, W, 3) uint8."""
    img = _check_image(image)
    height, width = img.shape[:2]
    fg = foreground_mask(img, background_colour(img, background))
    if not fg.any():
        return Prediction(None, None, None, ok=False)
    ys, xs = np.nonzero(fg)
    colour = _COLOUR_NAMES[int(_nearest_colour(img[fg].mean(axis=0, keepdims=True))[0])]
    box_area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(ys) / box_area
    shape = "square" if fill > SQUARE_FILL else "circle" if fill > CIRCLE_FILL else "triangle"
    return Prediction(colour, shape, _cell(ys, xs, height, width), ok=True)


def check_two_objects(image: np.ndarray, scene: Scene | CaptionSpec) -> bool:
    """Whether every named colour is present and the centroid of the foreground pixels nearest to
    it lies in its named cell, when the caption names one (shapes are not checked). A Scene is
    judged by its caption. An object without a colour cannot be told apart and is not checked."""
    spec = scene.spec() if isinstance(scene, Scene) else scene
    img = _check_image(image)
    height, width = img.shape[:2]
    fg = foreground_mask(img, background_colour(img, spec.background))
    ys, xs = np.nonzero(fg)
    labels = _nearest_colour(img[fg])  # (N_fg,)
    for obj in spec.objects:
        if obj.colour is None:
            continue
        mine = labels == _COLOUR_NAMES.index(obj.colour)
        if mine.sum() < MIN_PRESENT_FRAC * height * width:
            return False
        if obj.cell is not None and _cell(ys[mine], xs[mine], height, width) != obj.cell:
            return False
    return True


def score(images: np.ndarray | Sequence[np.ndarray], captions: Sequence[str]) -> dict:
    """Accuracy of images against their captions.

    Single-object captions: per-attribute accuracy ("colour", "position", "shape") and "all"
    three at once, over "n_single" images (an attribute the caption does not name counts as
    right, but an image with no foreground is wrong); two-object captions: "two_object" (check_two_objects)
    over "n_two" images. "n_no_foreground" counts single-object images with nothing detected
    (scored wrong). An accuracy is None when there was nothing to score.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions; pass one caption per image.")
    hits = {"colour": 0, "position": 0, "shape": 0, "all": 0}
    n_single = n_two = two_ok = no_fg = 0
    for image, text in zip(images, captions):
        spec = parse_caption(text)
        if len(spec.objects) == 2:
            n_two += 1
            two_ok += check_two_objects(image, spec)
            continue
        n_single += 1
        (want,) = spec.objects
        got = classify(image, spec.background)
        no_fg += not got.ok
        right = {"colour": got.ok and want.colour in (None, got.colour),
                 "position": got.ok and want.cell in (None, got.cell), "shape": got.shape == want.shape}
        right["all"] = all(right.values())
        for key, ok in right.items():
            hits[key] += ok
    out = {key: (h / n_single if n_single else None) for key, h in hits.items()}
    out.update(n_single=n_single, n_no_foreground=no_fg, two_object=two_ok / n_two if n_two else None,
               n_two=n_two)
    return out
