"""Demo shapes dataset and its rule-based classifier: determinism, held-out split, caption
grammar, geometry, anti-aliasing, and the classifier's accuracy on the dataset's own images."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_rt.demo.classify import check_two_objects, classify, score
from ldm_rt.demo.shapes import (
    BACKGROUNDS, COLOURS, HELDOUT_PAIRS, JITTER, MIN_GAP, POSITIONS, SHAPES, SIZE_RANGE, VOCABULARY, CaptionSpec,
    ObjectSpec, Scene, ShapeSpec, caption, cell_center, coverage, heldout_captions, make_batch, normalise,
    parse_caption, render, sample_scenes, vary_caption,
)

SIZE = 128


def _print_scores(name, s):
    acc = ", ".join(f"{k} {s[k]:.4f}" for k in ("colour", "position", "shape", "all", "two_object")
                    if s[k] is not None)
    print(f"\n[{name}] {acc} (n_single {s['n_single']}, n_two {s['n_two']}, "
          f"no foreground {s['n_no_foreground']})")


def test_make_batch_is_deterministic_from_the_seed():
    a, ca = make_batch(7, 12, size=48)
    b, cb = make_batch(7, 12, size=48)
    c, cc = make_batch(8, 12, size=48)
    assert a.dtype == np.uint8 and a.shape == (12, 48, 48, 3)
    assert a.tobytes() == b.tobytes() and ca == cb
    assert a.tobytes() != c.tobytes() and ca != cc
    h, _ = make_batch(7, 5, size=48, split="heldout")
    assert h.tobytes() == make_batch(7, 5, size=48, split="heldout")[0].tobytes()


def test_classifier_single_object_accuracy():
    train, train_caps = make_batch(0, 420, SIZE, split="train", two_object_prob=0.0)
    held, held_caps = make_batch(1, 240, SIZE, split="heldout")
    captions = train_caps + held_caps
    specs = [parse_caption(t) for t in captions]
    # The mix covers every background, with and without the clause.
    named = {s.background for s in specs}
    assert named == {*BACKGROUNDS, None}
    unnamed_true = {s.background for s in sample_scenes(0, 420, "train", 0.0) if not s.with_background_clause}
    assert unnamed_true == set(BACKGROUNDS)

    s = score(np.concatenate([train, held]), captions)
    _print_scores("single object, 660 images, 128 px", s)
    assert s["n_single"] == 660 and s["n_two"] == 0 and s["n_no_foreground"] == 0
    for key in ("colour", "position", "shape", "all"):
        assert s[key] >= 0.99, (key, s)


def test_classifier_two_object_accuracy():
    images, captions = make_batch(2, 220, SIZE, two_object_prob=1.0)
    s = score(images, captions)
    _print_scores("two objects, 220 images, 128 px", s)
    assert s["n_two"] == 220 and s["n_single"] == 0
    assert s["two_object"] >= 0.95, s
    # A Scene is judged by its caption, like the parsed spec.
    scene = sample_scenes(2, 1, two_object_prob=1.0)[0]
    assert check_two_objects(images[0], scene) == check_two_objects(images[0], parse_caption(captions[0]))


def test_train_split_never_shows_a_heldout_pairing():
    heldout = set(HELDOUT_PAIRS)
    train = sample_scenes(3, 2000, "train")
    singles = [s for s in train if len(s.objects) == 1]
    assert 1000 < len(singles) < 2000  # two_object_prob 0.3
    assert not any((s.objects[0].colour, s.objects[0].shape) in heldout for s in singles)
    # Two-object scenes are not held out: held-out pairings do appear there.
    assert any((o.colour, o.shape) in heldout for s in train if len(s.objects) == 2 for o in s.objects)

    held = sample_scenes(4, 300, "heldout")
    assert all(len(s.objects) == 1 and (s.objects[0].colour, s.objects[0].shape) in heldout for s in held)
    assert {(s.objects[0].colour, s.objects[0].shape) for s in held} == heldout


def test_heldout_captions():
    caps = heldout_captions()
    assert len(caps) == 6 * 9 * (3 + 1) == 216 and len(set(caps)) == 216
    assert caps == heldout_captions()
    specs = [parse_caption(t) for t in caps]
    assert all(len(s.objects) == 1 and (s.objects[0].colour, s.objects[0].shape) in HELDOUT_PAIRS for s in specs)
    assert {s.background for s in specs} == {*BACKGROUNDS, None}
    assert caps[0] == "a red triangle in the top left corner on a white background"
    assert caps[3] == "a red triangle in the top left corner"
    held = {t for t in (s.caption for s in sample_scenes(5, 200, "heldout"))}
    assert held <= set(caps)


def test_parse_caption_round_trips_the_sampler():
    scenes = sample_scenes(6, 300, "train", two_object_prob=0.5) + sample_scenes(7, 100, "heldout")
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert {s.with_background_clause for s in scenes} == {True, False}
    for scene in scenes:
        spec = parse_caption(scene.caption)
        assert spec == scene.spec()
        assert caption(spec) == scene.caption == caption(scene)
        assert set(scene.caption.split()) <= set(VOCABULARY)
    assert VOCABULARY == sorted(set(VOCABULARY))
    assert parse_caption("  A Red  Circle on the left ") == CaptionSpec((ObjectSpec("red", "circle", 3),), None)


@pytest.mark.parametrize("text", [
    "",
    "a red",
    "a red on the left",
    "a circle red",
    "a magenta circle on the left",
    "a red circle on the middle",
    "a red circle on the left on a blue background",
    "a red circle on the left on a white background please",
    "a red circle on the left and a red square on the right",
    "a red circle on the left and a blue square on the left",
    "a red circle on the left and a blue square on the right and a green triangle at the top",
])
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError):
        parse_caption(text)


@pytest.mark.parametrize("text, objects, background", [
    ("a red circle", [("red", "circle", None)], None),
    ("A red circle, on the left.", [("red", "circle", 3)], None),
    ("a circle on the left", [(None, "circle", 3)], None),
    ("Red Circle on the right!", [("red", "circle", 5)], None),
    ("an orange square at the top on a black background", [("orange", "square", 1)], "black"),
    ("a red circle and a blue square on white background", [("red", "circle", None), ("blue", "square", None)], "white"),
    ("a triangle in the center and a square", [(None, "triangle", 4), (None, "square", None)], None),
])
def test_parse_caption_reads_shortened_captions(text, objects, background):
    assert parse_caption(text) == CaptionSpec(tuple(ObjectSpec(*o) for o in objects), background)


def test_vary_caption_leaves_parts_out_never_invents_one_and_keeps_heldout_pairs_out():
    scenes = sample_scenes(11, 3000, "train")
    rng = np.random.default_rng(0)
    seen = Counter()
    for scene in scenes:
        full = scene.spec()
        text = vary_caption(full, rng)
        words = text.split()
        unknown = [w for w in words if w not in VOCABULARY]
        assert len(unknown) <= 1 and (not unknown or len(full.objects) == 1), text
        spec = parse_caption(" ".join(w for w in words if w in VOCABULARY))
        assert len(spec.objects) == len(full.objects), text
        for got, want in zip(spec.objects, full.objects):
            assert got.shape == want.shape and got.colour in (None, want.colour) and got.cell in (None, want.cell)
            seen["no colour"] += got.colour is None
            seen["no position"] += got.cell is None
        assert spec.background in (None, full.background), text
        if len(spec.objects) == 1 and spec.objects[0].colour is not None:
            assert (spec.objects[0].colour, spec.objects[0].shape) not in set(HELDOUT_PAIRS), text
        if len(spec.objects) == 2:
            assert None not in (spec.objects[0].colour, spec.objects[1].colour), text
        seen["no background"] += full.background is not None and spec.background is None
        seen["unknown word"] += bool(unknown)
        seen["no article"] += words[0] not in ("a", "an") and not unknown
        seen["an"] += "an" in words
        seen["unchanged"] += text == scene.caption
    print("\nvary_caption over 3000 train scenes:", dict(seen))
    assert all(seen[k] >= 20 for k in ("no colour", "no position", "no background", "unknown word", "no article",
                                       "an", "unchanged")), seen
    again = [vary_caption(s.spec(), np.random.default_rng(5)) for s in scenes[:50]]
    assert again == [vary_caption(s.spec(), np.random.default_rng(5)) for s in scenes[:50]]


def test_normalise_is_what_the_demo_tokenizer_sees():
    from ldm_rt.demo.train import build_tokenizer

    tok = build_tokenizer(32)
    assert tok.strip_punctuation
    texts = ["A red circle, on the left.", "RED CIRCLE!!!  on  the\tright", "a red-circle (top)", "a_red circle?",
             "a red circle in the top left corner on a white background"]
    assert normalise(texts[0]) == "a red circle on the left"
    assert torch.equal(tok(texts).input_ids, tok([normalise(t) for t in texts]).input_ids)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_spread_measures_the_datasets_jitter_and_size(shape):
    """evaluate._spread (the seed-diversity measure) reads back the sampler's spread: a jitter
    uniform in a disc of radius JITTER has centre std JITTER / sqrt(2), a size uniform in
    SIZE_RANGE has std (hi - lo) / sqrt(12)."""
    from ldm_rt.demo.evaluate import _spread
    from ldm_rt.demo.shapes import _sample_object

    rng = np.random.default_rng(3)
    images = [render(Scene((_sample_object(rng, "red", shape, 4),), "white", "", False), SIZE) for _ in range(300)]
    got = _spread(images, "white")
    assert got["n_foreground"] == 300
    assert got["centre_std"] == pytest.approx(JITTER / np.sqrt(2), rel=0.1), got
    assert got["size_std"] == pytest.approx((SIZE_RANGE[1] - SIZE_RANGE[0]) / np.sqrt(12), rel=0.1), got
    same = _spread([images[0]] * 4, "white")
    assert same["centre_std"] == same["size_std"] == same["pixel_mad"] == 0.0


def test_readme_lists_the_vocabulary_and_grammar():
    """The pipeline's unknown-word warning sends users to this README section."""
    from ldm_rt.demo.demo_config import VOCABULARY_DOC

    assert "Vocabulary and grammar" in VOCABULARY_DOC
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Vocabulary and grammar", 1)[1].split("\n## ", 1)[0]
    for word in VOCABULARY:
        assert f"`{word}`" in section, word
    for phrase in (*POSITIONS, *BACKGROUNDS, "object := [article] [colour] shape [position]"):
        assert phrase in section, phrase


def test_geometry():
    scenes = sample_scenes(8, 1500, "train", two_object_prob=0.5) + sample_scenes(9, 200, "heldout")
    lo, hi = SIZE_RANGE
    for scene in scenes:
        for o in scene.objects:
            assert lo <= o.size_frac <= hi
            (cx, cy), (gx, gy) = o.center_xy, cell_center(o.cell)
            assert np.hypot(cx - gx, cy - gy) <= JITTER + 1e-12
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 and 0 <= y0 and x1 <= 1 and y1 <= 1
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a.colour != b.colour and a.cell != b.cell
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox, b.bbox
            assert max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= MIN_GAP
    # Rendered, two objects never share a pixel, even on their anti-aliased edges.
    for scene in [s for s in scenes if len(s.objects) == 2][:100]:
        a, b = (coverage(o, SIZE) > 0 for o in scene.objects)
        assert not (a & b).any()
    # Sizes and jitter use their whole range.
    sizes = [o.size_frac for s in scenes for o in s.objects]
    assert min(sizes) < lo + 0.01 and max(sizes) > hi - 0.01


def _deep_inside(o: ShapeSpec, size: int) -> np.ndarray:
    """(size, size) bool: pixels that lie inside the shape with a 1-pixel margin, written out
    independently of the renderer."""
    c = (np.arange(size) + 0.5) / size
    x, y = c[None, :], c[:, None]
    (cx, cy), h, m = o.center_xy, o.size_frac / 2, 1.0 / size
    if o.shape == "circle":
        return np.hypot(x - cx, y - cy) < h - m
    if o.shape == "square":
        return (np.abs(x - cx) < h - m) & (np.abs(y - cy) < h - m)
    # Triangle: below the apex edges by >= 1 px (their normals have slope 2), above the base by 1 px.
    top, bottom = cy - h, cy + h
    return (y < bottom - m) & (np.abs(x - cx) < (y - top) / 2 - m * np.sqrt(5) / 2)


def _far_outside(o: ShapeSpec, size: int) -> np.ndarray:
    c = (np.arange(size) + 0.5) / size
    x, y = c[None, :], c[:, None]
    x0, y0, x1, y1 = o.bbox
    m = 1.0 / size
    return (x < x0 - m) | (x > x1 + m) | (y < y0 - m) | (y > y1 + m)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_antialiased_edges_and_flat_interiors(shape, background):
    rng = np.random.default_rng(10)
    n_edge = 0
    for colour in COLOURS:
        size = int(rng.integers(60, 140))  # odd sizes too
        o = ShapeSpec(colour, shape, 4, float(rng.uniform(*SIZE_RANGE)),
                      (0.5 + float(rng.uniform(-0.03, 0.03)), 0.5 + float(rng.uniform(-0.03, 0.03))))
        scene = Scene((o,), background, "", False)
        img = render(scene, size)
        fg, bg = np.asarray(COLOURS[colour]), np.asarray(BACKGROUNDS[background])
        inside, outside = _deep_inside(o, size), _far_outside(o, size)
        assert inside.sum() > 100
        assert (img[inside] == fg).all()
        assert (img[outside] == bg).all()
        # Edge pixels hold blends strictly between background and object colour. (A square whose
        # edges all fall within 1/8 px of pixel boundaries has none: 4 x 4 point samples.)
        edge = ~(img == fg).all(-1) & ~(img == bg).all(-1)
        n_edge += edge.sum()
        t = ((img[edge] - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))  # blend weight of each edge pixel
        assert ((t > 0) & (t < 1)).all()
        off_line = np.linalg.norm(img[edge] - (bg + t[:, None] * (fg - bg)), axis=-1)
        assert off_line.max(initial=0) < 1.0  # only uint8 rounding away from the fg-bg segment
    assert n_edge > 8 * 20


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_blank_image_has_no_foreground(background):
    blank = np.empty((37, 53, 3), dtype=np.uint8)
    blank[:] = BACKGROUNDS[background]
    for named in (background, None):
        p = classify(blank, named)
        assert not p.ok and p.colour is None and p.shape is None and p.cell is None
    spec = parse_caption(f"a red circle on the left and a blue square on the right on a {background} background")
    assert check_two_objects(blank, spec) is False
    captions = ["a red circle on the left", "a red circle at the top and a blue square at the bottom"]
    s = score(np.stack([blank, blank]), captions)
    assert s["all"] == 0.0 and s["two_object"] == 0.0 and s["n_no_foreground"] == 1


def test_classify_checks_its_inputs():
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError):
        classify(img, "magenta")
    with pytest.raises(ValueError):
        classify(img[..., 0])
    with pytest.raises(ValueError):
        score([img], [])
    assert len(POSITIONS) == 9


def test_sweep_forms_are_the_issues_four_natural_forms():
    """Issue 19's sweep: 24 distinct prompts per form, each inside the grammar; the colourless
    form asks for every shape in 8 different cells."""
    from ldm_rt.demo.evaluate import SWEEP_FORMS, sweep_prompts

    assert len(SWEEP_FORMS) == 4
    for form in SWEEP_FORMS:
        prompts = sweep_prompts(form)
        assert len(set(prompts)) == 24, form
        specs = [parse_caption(p) for p in prompts]
        assert all(len(s.objects) == 1 and s.background is None for s in specs), form
    (no_colour,) = [f for f in SWEEP_FORMS if "{colour}" not in f]
    specs = [parse_caption(p).objects[0] for p in sweep_prompts(no_colour)]
    assert all(o.colour is None and o.cell is not None for o in specs)
    for shape in SHAPES:
        assert len({o.cell for o in specs if o.shape == shape}) == 8, shape
    assert any(p.endswith(".") and "," in p for p in sweep_prompts(SWEEP_FORMS[2]))
