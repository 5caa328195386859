"""Procedural captioned dataset of flat shapes: the demo model's training data.

A scene is one or two flat-coloured shapes (circle, axis-aligned square, upward triangle) on a
flat background, each in a cell of a 3 x 3 grid, with a caption that says what is where:

    "a red circle on the left on a white background"
    "a blue square in the top left corner and a yellow triangle at the bottom"

Geometry is in fractions of the image side (x right, y down, (0, 0) the top-left corner), so
one scene renders at any size. Cells are numbered row-major, `cell = 3 * row + col`, row 0 at
the top. Everything is numpy only and deterministic from a `np.random.Generator`
(`make_batch(seed, ...)` from a seed).

Six (colour, shape) pairings are held out of training as single-object captions
(`HELDOUT_PAIRS`); two-object scenes may use any pairing.

A scene's own caption (`caption`) names everything: article, colour, shape and position of each
object, and the background in 70% of scenes. The training stage shows each image under a
shortened caption too (`vary_caption`): position, background clause, article or colour left
out at random, "an" before "orange", an unknown word now and then. What a caption leaves out is
free; what it names must be drawn. The grammar of both (`parse_caption` reads them):

    caption  := object [" and " object] [" on " [article] background " background"]
    object   := [article] [colour " "] shape [" " position]
    article  := "a " | "an "

Case, punctuation and runs of whitespace do not matter (`normalise`), as in the demo tokenizer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

# Object palette (RGB). The closest object/background pair is purple on gray, RGB distance 92.8,
# which keeps every object above the classifier's foreground threshold of 60.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "orange": (240, 140, 30),
    "purple": (140, 60, 190),
    "pink": (240, 120, 180),
    "cyan": (40, 200, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Index = cell = 3 * row + col.
POSITIONS = (
    "in the top left corner", "at the top", "in the top right corner",
    "on the left", "in the center", "on the right",
    "in the bottom left corner", "at the bottom", "in the bottom right corner",
)
HELDOUT_PAIRS = (
    ("red", "triangle"), ("blue", "circle"), ("green", "square"),
    ("yellow", "triangle"), ("purple", "circle"), ("cyan", "square"),
)
TRAIN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)  # 18 pairs
SPLITS = ("train", "heldout")

SIZE_RANGE = (0.22, 0.35)  # bounding side of an object, fraction of the image side
JITTER = 0.04  # max distance of an object's centre from its cell centre, fraction of the side
# Bounding boxes of two objects are at least this far apart (2.6 px at 128), so their
# anti-aliased edges never share a pixel.
MIN_GAP = 0.02
SUPERSAMPLE = 4  # 4 x 4 samples per pixel: 17 coverage levels on an edge


def cell_center(cell: int) -> tuple[float, float]:
    """(x, y) of a cell's centre: 1/6, 1/2 or 5/6 of the side on each axis."""
    row, col = divmod(cell, 3)
    return (2 * col + 1) / 6, (2 * row + 1) / 6


@dataclass(frozen=True)
class ShapeSpec:
    """One object: `size_frac` is its bounding side and `center_xy` the centre of its bounding
    box, both as fractions of the image side."""

    colour: str
    shape: str
    cell: int
    size_frac: float
    center_xy: tuple[float, float]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in fractions of the side."""
        (cx, cy), h = self.center_xy, self.size_frac / 2
        return cx - h, cy - h, cx + h, cy + h


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object; None = not said (free)."""

    colour: str | None
    shape: str
    cell: int | None


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption says: its objects, and the background if it names one (else None)."""

    objects: tuple[ObjectSpec, ...]
    background: str | None


@dataclass(frozen=True)
class Scene:
    """A sampled scene: exact geometry, the true background, and its caption."""

    objects: tuple[ShapeSpec, ...]
    background: str
    caption: str
    with_background_clause: bool

    def spec(self) -> CaptionSpec:
        """What the caption says about this scene (`parse_caption(scene.caption)` equals it)."""
        objects = tuple(ObjectSpec(o.colour, o.shape, o.cell) for o in self.objects)
        return CaptionSpec(objects, self.background if self.with_background_clause else None)


# ----------------------------------------------------------------------------- captions

def _object_text(o: ObjectSpec, article: str | None = "a") -> str:
    words = [article, o.colour, o.shape, None if o.cell is None else POSITIONS[o.cell]]
    return " ".join(w for w in words if w)


def caption(scene: Scene | CaptionSpec) -> str:
    """The caption of a scene (or of a parsed caption: `caption(parse_caption(t)) == t` for the
    captions `caption` writes, which always have the article "a")."""
    spec = scene.spec() if isinstance(scene, Scene) else scene
    text = " and ".join(_object_text(o) for o in spec.objects)
    if spec.background is not None:
        text += f" on a {spec.background} background"
    return text


def normalise(text: str) -> str:
    """Lowercase, every punctuation or symbol run as a space, whitespace runs collapsed: what the
    demo tokenizer does before it splits words (`CLIPTokenizer(strip_punctuation=True)`)."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in words)


ARTICLES = ("a", "an")
_OBJECT = (rf"(?:(?:{_alternatives(ARTICLES)}) )?(?:({_alternatives(COLOURS)}) )?({_alternatives(SHAPES)})"
           rf"(?: ({_alternatives(POSITIONS)}))?")
_CAPTION = re.compile(rf"{_OBJECT}(?: and {_OBJECT})?"
                      rf"(?: on (?:(?:{_alternatives(ARTICLES)}) )?({_alternatives(BACKGROUNDS)}) background)?")

VOCABULARY: list[str] = sorted(
    {*ARTICLES, "and", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS}
    | {w for phrase in POSITIONS for w in phrase.split()}
)

_EXAMPLE = CaptionSpec((ObjectSpec("red", "circle", 3),), "white")  # for error messages


def parse_caption(text: str) -> CaptionSpec:
    """Invert the caption grammar (after `normalise`: case and punctuation do not matter).

    Raises ValueError for text outside the grammar, including two objects that share a colour
    or a cell (when both are named).
    """
    m = _CAPTION.fullmatch(normalise(text))
    if m is None:
        raise ValueError(f"{text!r} is not a demo caption; expected e.g. {caption(_EXAMPLE)!r}.")
    g = m.groups()  # colour, shape, position, [colour, shape, position], background
    objects = tuple(
        ObjectSpec(g[i], g[i + 1], None if g[i + 2] is None else POSITIONS.index(g[i + 2]))
        for i in (0, 3) if g[i + 1] is not None
    )
    if len(objects) == 2:
        a, b = objects
        if (a.colour is not None and a.colour == b.colour) or (a.cell is not None and a.cell == b.cell):
            raise ValueError(f"{text!r}: the two objects need different colours and different positions.")
    return CaptionSpec(objects, g[6])


@dataclass(frozen=True)
class CaptionVariation:
    """Probabilities with which `vary_caption` leaves a part out (each object's position and
    article are dropped independently; colour only on a single object, so a two-object caption
    never loses the colour that tells its objects apart)."""

    omit_position: float = 0.35
    omit_background: float = 0.4  # of the clauses the scene's caption has
    omit_article: float = 0.3
    omit_colour: float = 0.1
    an_before_vowel: float = 0.5  # "an orange" rather than "a orange"
    unknown_word: float = 0.1  # a random non-word inserted between two words (single objects)


def _random_non_word(rng: np.random.Generator) -> str:
    known = set(VOCABULARY)
    while True:
        word = "".join(chr(ord("a") + int(k)) for k in rng.integers(26, size=int(rng.integers(3, 9))))
        if word not in known:
            return word


def vary_caption(spec: CaptionSpec, rng: np.random.Generator,
                 variation: CaptionVariation = CaptionVariation()) -> str:
    """A shortened caption of `spec`: never a part it does not say, so a train-split image keeps
    its train-split pairing (a held-out pairing named alone stays held out), and whatever the
    caption still names is true of the image. Deterministic from `rng`."""
    v = variation
    single = len(spec.objects) == 1
    parts = []
    for o in spec.objects:
        colour = None if single and rng.random() < v.omit_colour else o.colour
        cell = None if rng.random() < v.omit_position else o.cell
        first = colour or o.shape
        article = None if rng.random() < v.omit_article else (
            "an" if first[0] in "aeiou" and rng.random() < v.an_before_vowel else "a")
        parts.append(_object_text(ObjectSpec(colour, o.shape, cell), article))
    text = " and ".join(parts)
    if spec.background is not None and rng.random() >= v.omit_background:
        text += f" on a {spec.background} background"
    if single and rng.random() < v.unknown_word:  # single only: a two-object caption could overflow 32 tokens
        words = text.split()
        words.insert(int(rng.integers(len(words) + 1)), _random_non_word(rng))
        text = " ".join(words)
    return text


def heldout_captions() -> list[str]:
    """Every held-out single-object caption: 6 pairings x 9 positions x (3 backgrounds + no
    clause) = 216, in pairing, cell, background (white, gray, black, none) order."""
    return [
        caption(CaptionSpec((ObjectSpec(colour, shape, cell),), background))
        for colour, shape in HELDOUT_PAIRS
        for cell in range(9)
        for background in (*BACKGROUNDS, None)
    ]


# ----------------------------------------------------------------------------- sampling

def _inside_image(obj: ShapeSpec) -> bool:
    x0, y0, x1, y1 = obj.bbox
    return x0 >= 0 and y0 >= 0 and x1 <= 1 and y1 <= 1


def _apart(a: ShapeSpec, b: ShapeSpec) -> bool:
    """Bounding boxes separated by at least MIN_GAP along x or y."""
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= MIN_GAP


def _sample_object(rng: np.random.Generator, colour: str, shape: str, cell: int) -> ShapeSpec:
    """Uniform size and a uniform jitter in a disc of radius JITTER, resampled until the object
    lies inside the image (a corner object fits only below size 2 * (1/6 - jitter))."""
    cx, cy = cell_center(cell)
    while True:
        size = float(rng.uniform(*SIZE_RANGE))
        dx, dy = rng.uniform(-JITTER, JITTER, size=2)
        if dx * dx + dy * dy > JITTER * JITTER:
            continue
        obj = ShapeSpec(colour, shape, cell, size, (cx + float(dx), cy + float(dy)))
        if _inside_image(obj):
            return obj


def _sample_two(rng: np.random.Generator) -> tuple[ShapeSpec, ShapeSpec]:
    """Two objects with different colours and cells; placements resampled until they are apart."""
    colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=2, replace=False)]
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=2)]
    cells = [int(c) for c in rng.choice(9, size=2, replace=False)]
    while True:
        a, b = (_sample_object(rng, colours[i], shapes[i], cells[i]) for i in range(2))
        if _apart(a, b):
            return a, b


def _make_scene(objects: tuple[ShapeSpec, ...], background: str, with_clause: bool) -> Scene:
    spec = CaptionSpec(tuple(ObjectSpec(o.colour, o.shape, o.cell) for o in objects),
                       background if with_clause else None)
    return Scene(objects, background, caption(spec), with_clause)


def sample_scene(rng: np.random.Generator, split: str = "train", two_object_prob: float = 0.3,
                 background_clause_prob: float = 0.7) -> Scene:
    """One scene. "train" never yields a held-out single-object pairing; "heldout" yields only
    held-out single-object scenes (`two_object_prob` is ignored there)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {SPLITS}.")
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    with_clause = bool(rng.random() < background_clause_prob)
    if split == "train" and rng.random() < two_object_prob:
        return _make_scene(_sample_two(rng), background, with_clause)
    pairs = TRAIN_PAIRS if split == "train" else HELDOUT_PAIRS
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    return _make_scene((_sample_object(rng, colour, shape, int(rng.integers(9))),), background, with_clause)


def sample_scenes(seed: int, n: int, split: str = "train", two_object_prob: float = 0.3,
                  background_clause_prob: float = 0.7) -> list[Scene]:
    """`n` scenes from `np.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split, two_object_prob, background_clause_prob) for _ in range(n)]


# ----------------------------------------------------------------------------- rendering

def _inside(obj: ShapeSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether points (x, y) (broadcastable, fractions of the side) lie inside the object."""
    (cx, cy), h = obj.center_xy, obj.size_frac / 2
    if obj.shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h * h
    if obj.shape == "square":
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    if obj.shape == "triangle":  # apex at (cx, cy - h), base from cx - h to cx + h at y = cy + h
        return (y <= cy + h) & (np.abs(x - cx) <= (y - (cy - h)) / 2)
    raise ValueError(f"shape={obj.shape!r}; use one of {SHAPES}.")


def coverage(obj: ShapeSpec, size: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel the object covers, from supersample x supersample point samples.

    Returns (size, size) float64 in [0, 1]: exactly 1 inside, 0 outside, in steps of
    1 / supersample**2 on the edge (an edge within 1/8 px of a pixel boundary comes out crisp at
    4 x 4). Only the object's bounding box is sampled.
    """
    k = supersample
    x0, y0, x1, y1 = obj.bbox
    c0, c1 = max(0, math.floor(x0 * size)), min(size, math.ceil(x1 * size))
    r0, r1 = max(0, math.floor(y0 * size)), min(size, math.ceil(y1 * size))
    xs = (np.arange(c0 * k, c1 * k) + 0.5) / (size * k)  # (W_box * k,) sample x
    ys = (np.arange(r0 * k, r1 * k) + 0.5) / (size * k)  # (H_box * k,) sample y
    hits = _inside(obj, xs[None, :], ys[:, None])  # (H_box * k, W_box * k)
    out = np.zeros((size, size))
    out[r0:r1, c0:c1] = hits.reshape(r1 - r0, k, c1 - c0, k).mean(axis=(1, 3))
    return out


def render(scene: Scene, size: int = 128) -> np.ndarray:
    """(size, size, 3) uint8: flat background, flat objects, anti-aliased edges.

    Pixels an object covers fully hold its palette colour exactly (bg + 1 * (fg - bg) is exact
    on integer-valued floats).
    """
    image = np.empty((size, size, 3))
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:  # objects never share a pixel (MIN_GAP), so order does not matter
        cov = coverage(obj, size)[..., None]  # (size, size, 1)
        image += cov * (np.asarray(COLOURS[obj.colour], dtype=np.float64) - image)
    return np.rint(image).astype(np.uint8)


def make_batch(seed: int, n: int, size: int = 128, split: str = "train", two_object_prob: float = 0.3,
               background_clause_prob: float = 0.7) -> tuple[np.ndarray, list[str]]:
    """`n` rendered scenes and their captions, deterministic from `seed`.

    Returns images (n, size, size, 3) uint8 and a list of n captions.
    """
    scenes = sample_scenes(seed, n, split, two_object_prob, background_clause_prob)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = render(scene, size)
    return images, [s.caption for s in scenes]
