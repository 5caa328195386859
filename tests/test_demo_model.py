"""The shipped demo model: size, loading, what it draws (scored by the no-learning classifier on
held-out captions, with the CLI's defaults), and the bad prompts a new user will type."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ldm_rt.cli import main
from ldm_rt.demo.evaluate import DIVERSITY_PROMPTS, diversity, evaluate
from ldm_rt.model_dir import DEMO_MODEL_DIR, default_model_dir, load_model_dir
from ldm_rt.pipeline import Pipeline

MAX_MB = 30.0


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(default_model_dir(), device="cpu")


def test_the_demo_model_ships_in_the_package_and_is_small():
    assert default_model_dir() == DEMO_MODEL_DIR
    files = [p for p in DEMO_MODEL_DIR.rglob("*") if p.is_file()]
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    assert size_mb <= MAX_MB, size_mb
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 3, weights
    components = load_model_dir(DEMO_MODEL_DIR)
    assert components.defaults["height"] == components.defaults["width"] == 128


@pytest.fixture(scope="module")
def accuracy(pipe):
    """>= 36 generations over several seeds with the run defaults (54 held-out single-object
    captions in 5 seeded batches, 24 two-object captions in 2)."""
    torch.set_num_threads(2)
    result = evaluate(pipe, n_single=54, n_two=24, seed=0)
    print("\ndemo model accuracy:", {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})
    assert result["n_single"] == 54 and result["n_two"] == 24
    return result


# The shipped model (16000 DiT steps on the 2-core CPU) measures colour 1.0, position 1.0,
# shape 0.981 and two-object 0.917 (README, *Demo model*).
def test_heldout_captions_meet_the_issue_targets(accuracy):
    assert accuracy["colour"] >= 0.90, accuracy
    assert accuracy["position"] >= 0.90, accuracy
    assert accuracy["shape"] >= 0.80, accuracy


def test_two_object_captions_meet_the_issue_aim(accuracy):
    """Both colours present, each object's centroid in its own cell (the issue aims at 70%)."""
    assert accuracy["two_object"] >= 0.70, accuracy


def test_seeds_vary_as_the_dataset_does(pipe):
    """Issue 19 saw seeds differ by 2-4/255 and asked whether that is mode collapse. It is not:
    the dataset's own images of one caption differ that little (jitter <= 4% of the side, sizes
    22-35%). A collapsed model would put every seed's object at one centre and size; this one's
    spread over 16 seeds must be at least a quarter of the dataset's, in centre and in size,
    for a trained pair and two held-out ones (README, *Demo model*, for the measured ratios)."""
    torch.set_num_threads(2)
    result = diversity(pipe, DIVERSITY_PROMPTS[:3], n_seeds=16)
    for prompt, r in result.items():
        model, data = r["model"], r["data"]
        print(f"\n{prompt}: centre std {model['centre_std']:.4f} (data {data['centre_std']:.4f}), "
              f"size std {model['size_std']:.4f} (data {data['size_std']:.4f})")
        assert model["n_foreground"] == data["n_foreground"] == 16, r
        assert model["centre_std"] >= 0.25 * data["centre_std"], r
        assert model["size_std"] >= 0.25 * data["size_std"], r


def test_the_shipped_tokenizer_is_the_one_the_text_encoder_was_trained_with():
    """The BPE build is not reproducible (ties), so export must ship the run's own tokenizer; a
    rebuilt one once gave the word "at" another id than the text encoder had learned."""
    from ldm_rt.tokenizer import CLIPTokenizer

    run_tokenizer = DEMO_MODEL_DIR.parent / "checkpoints" / "demo" / "tokenizer"
    if not run_tokenizer.is_dir():
        pytest.skip("the training checkpoints are in the repository, not in the wheel")
    shipped = load_model_dir(DEMO_MODEL_DIR).tokenizer
    assert shipped.vocab == CLIPTokenizer.from_dir(run_tokenizer, shipped.max_length).vocab


def test_ldm_rt_run_without_model_dir_draws_the_prompt(tmp_path):
    """The README's first command, in a fresh process (imports included), timed."""
    out = tmp_path / "red.png"
    t0 = time.perf_counter()
    # --seed 0: without it each run draws a fresh seed (issue 19), and this checks one known image
    proc = subprocess.run([sys.executable, "-m", "ldm_rt.cli", "run", "--prompt", "a red circle on the left",
                           "--seed", "0", "--out", str(out)], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    print(f"\nldm-rt run (demo model, defaults, fresh process): {seconds:.2f} s")
    assert proc.returncode == 0, proc.stderr
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (128, 128, 3)
    from ldm_rt.demo.classify import classify

    got = classify(image)
    assert (got.colour, got.cell) == ("red", 3), got


@pytest.mark.parametrize(
    "prompt, warning",
    [
        ("", None),
        ("a zebra riding a bicycle", "does not know the word(s) bicycle, riding, zebra"),
        ("a large red circle", "the word(s) large (its captions use"),
        ("a large red circle", "words, listed in README.md, section 'Demo model' > 'Vocabulary and grammar'"),
        ("a red circle on a blue background", "knows no background colour blue (only white, gray, black"),
        ("a red circle on the left " * 20, "prompt truncated"),
        ("A RED Circle, on the LEFT!!", None),
    ],
)
def test_bad_prompts_still_draw_an_image(prompt, warning, tmp_path):
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["run", "--prompt", prompt, "--steps", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (128, 128)
    if warning:
        assert f"warning: " in result.output and warning in result.output, result.output
    else:
        assert "does not know" not in result.output, result.output


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_onnxruntime_draws_the_torch_image_on_the_demo_model(size, tmp_path_factory, monkeypatch):
    """Issue 6's end-to-end check on the demo model: one dynamic fp32 export (cached across the
    two sizes), onnxruntime's image against the torch backend's, same seed: PSNR >= 40 dB."""
    from ldm_rt.parity import IMAGE_PSNR_DB, psnr

    monkeypatch.setenv("LDM_RT_CACHE", str(tmp_path_factory.getbasetemp() / "ldm-rt-cache"))
    h, w = size
    prompt = "a blue circle in the top right corner on a black background"
    images = {}
    for backend in ("torch", "onnxruntime"):
        pipe = Pipeline.from_pretrained(default_model_dir(), backend=backend, device="cpu", dtype="fp32")
        images[backend] = torch.from_numpy(np.array(pipe(prompt, steps=6, seed=3, height=h, width=w)[0]))
    value = psnr(images["onnxruntime"].float(), images["torch"].float())
    print(f"\ndemo model {h}x{w}: onnxruntime vs torch image PSNR {value:.1f} dB")
    assert value >= IMAGE_PSNR_DB["fp32"], value
