"""`ldm-rt` end to end: init-model + run, and one clear error for every bad input."""

import shutil
import subprocess
import sys
import json

import pytest
from PIL import Image

from cli_helpers import invoke




def _copy(model_dir, tmp_path):
    return shutil.copytree(model_dir, tmp_path / "model")


def test_init_model_and_run_write_png_of_asked_size(tiny_model_dir, tmp_path):
    out = tmp_path / "cat.png"
    result = invoke("run", "--model-dir", tiny_model_dir, "--prompt", "a red circle", "--height", 24,
                    "--width", 40, "--steps", 3, "--out", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (40, 24)
    assert f"wrote {out}" in result.output
    for stage in ("text encoding", "denoising", "decoding"):
        assert stage in result.output


def test_run_several_images_get_numbered_files(tiny_model_dir, tmp_path):
    out = tmp_path / "img.png"
    result = invoke("run", "--model-dir", tiny_model_dir, "--prompt", "a", "--num-images", 2, "--steps", 1,
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["img-0.png", "img-1.png"]


def test_default_output_name_uses_seed(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("run", "--model-dir", tiny_model_dir, "--prompt", "x", "--steps", 1, "--seed", 7).exit_code == 0
    assert (tmp_path / "ldm-rt-7.png").is_file()


def test_subprocess_error_has_exit_code_and_no_traceback(tmp_path):
    """Through the real console script: one line on stderr, exit 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "ldm_rt.cli", "run", "--model-dir", str(tmp_path / "nope"), "--prompt", "x"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--height", 30], "must be a positive multiple of 4"),
        (["--width", 2], "must be a positive multiple of 4"),
        (["--steps", 0], "steps must be"),
        (["--guidance", -1], "guidance must be a finite number >= 0"),
        (["--guidance", "nan"], "--guidance nan is not a finite number"),
        (["--guidance", "inf"], "--guidance inf is not a finite number"),
        (["--height", 100000], "height 100000 is larger than this model takes: at most"),
        (["--width", 100000], "width 100000 is larger than this model takes: at most"),
        (["--seed", 10**20], "seed 100000000000000000000 is out of range"),
        (["--seed", -1], "seed -1 is out of range"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--device", "tpu"], "not a valid torch device"),
        (["--backend", "tensorrt"], "pip install 'ldm-rt[tensorrt]'"),
        (["--num-images", 0], "num_images must be >= 1"),
        (["--out", "/nonexistent-dir/x.png"], "does not exist"),
        (["--out", "image.jpg"], "must end in .png"),
    ],
)
def test_bad_run_arguments(tiny_model_dir, args, message):
    result = invoke("run", "--model-dir", tiny_model_dir, "--prompt", "x", "--steps", 1, *args)
    assert result.exit_code == 1, result.output
    assert message in result.output


def test_unknown_backend_and_dtype_are_rejected_by_choice(tiny_model_dir):
    for args in (["--backend", "cuda-magic"], ["--dtype", "fp8"]):
        result = invoke("run", "--model-dir", tiny_model_dir, "--prompt", "x", *args)
        assert result.exit_code == 2 and "Invalid value" in result.output


def test_fp16_on_cpu_is_refused(tiny_model_dir):
    result = invoke("run", "--model-dir", tiny_model_dir, "--prompt", "x", "--dtype", "fp16", "--device", "cpu")
    assert result.exit_code == 1 and "fp16 is not supported on the CPU" in result.output


def test_unwritable_output_directory(tiny_model_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = invoke("run", "--model-dir", tiny_model_dir, "--prompt", "x", "--out", locked / "a.png")
        if result.exit_code == 0:  # root ignores permissions: then the write really succeeded
            assert (locked / "a.png").is_file()
        else:
            assert result.exit_code == 1 and "not writable" in result.output
    finally:
        locked.chmod(0o700)


def test_missing_model_dir_and_components(tiny_model_dir, tmp_path):
    result = invoke("run", "--model-dir", tmp_path / "absent", "--prompt", "x")
    assert result.exit_code == 1 and "does not exist" in result.output
    model = _copy(tiny_model_dir, tmp_path)
    shutil.rmtree(model / "vae")
    result = invoke("run", "--model-dir", model, "--prompt", "x")
    assert result.exit_code == 1 and "no 'vae/' component" in result.output
    (model / "model_index.json").unlink()
    result = invoke("run", "--model-dir", model, "--prompt", "x")
    assert result.exit_code == 1 and "not a model directory" in result.output


def test_truncated_and_corrupted_weights(tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir, tmp_path)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    result = invoke("run", "--model-dir", model, "--prompt", "x")
    assert result.exit_code == 1 and "transformer" in result.output and "truncated or corrupted" in result.output
    weights.write_bytes(b"\x00" * 64)
    result = invoke("run", "--model-dir", model, "--prompt", "x")
    assert result.exit_code == 1 and "truncated or corrupted" in result.output


def test_weights_that_do_not_fit_the_config(tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir, tmp_path)
    config_path = model / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["depth"] = 3  # the file holds 2 blocks
    config_path.write_text(json.dumps(config))
    result = invoke("run", "--model-dir", model, "--prompt", "x")
    assert result.exit_code == 1
    assert "transformer: weights do not match" in result.output and "blocks.2." in result.output


def test_unknown_key_in_own_config(tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir, tmp_path)
    config_path = model / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["hiden_size"] = 64
    config_path.write_text(json.dumps(config))
    result = invoke("run", "--model-dir", model, "--prompt", "x")
    assert result.exit_code == 1 and "unknown config key(s) ['hiden_size']" in result.output


def test_init_model_errors(tmp_path):
    result = invoke("init-model", tmp_path / "m", "--preset", "dit-xxl-2")
    assert result.exit_code == 1 and "unknown preset 'dit-xxl-2'" in result.output and "dit-xl-2" in result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = invoke("init-model", tmp_path / "full")
    assert result.exit_code == 1 and "not empty" in result.output
    result = invoke("init-model", tmp_path / "full", "--overwrite")  # not a model dir: kept
    assert result.exit_code == 1 and "refusing to overwrite" in result.output
    assert (tmp_path / "full" / "x").is_file()


def test_init_model_overwrite_replaces_a_model_dir(tmp_path):
    assert invoke("init-model", tmp_path / "m", "--seed", 1).exit_code == 0
    weights = tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    assert invoke("init-model", tmp_path / "m", "--seed", 2, "--overwrite").exit_code == 0
    assert weights.read_bytes() != before


def test_long_prompt_is_truncated_with_a_warning(tiny_model_dir, tmp_path):
    result = invoke("run", "--model-dir", tiny_model_dir, "--prompt", "a very long prompt " * 20, "--steps", 1,
                    "--out", tmp_path / "long.png")
    assert result.exit_code == 0, result.output
    assert "warning: prompt truncated to 32 tokens" in result.output


def test_no_model_dir_without_demo_model_says_what_to_do(monkeypatch, tmp_path):
    from ldm_rt import model_dir

    monkeypatch.setattr(model_dir, "DEMO_MODEL_DIR", tmp_path / "missing")  # an install without it
    result = invoke("run", "--prompt", "x")
    assert result.exit_code == 1 and "ldm-rt init-model" in result.output


def test_env_lists_backends():
    result = invoke("env")
    assert result.exit_code == 0
    for key in ("torch", "cuda available", "triton", "onnxruntime", "tensorrt", "polygraphy", "onnxscript",
                "transformers", "diffusers", "matplotlib"):
        assert key in result.output


def _one_error_line(result):
    assert result.exit_code == 1, result.output
    lines = [l for l in result.output.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("command", [
    ["init-model", "{tmp}/m", "--seed", 2**64],
    ["parity", "--backend", "torch", "--model-dir", "{model}", "--seed", 10**20],
    ["train-demo", "--stage", "vae", "--run-dir", "{tmp}/run", "--steps", 1, "--config", "tiny", "--seed", 2**70],
])
def test_seed_out_of_range_is_one_error_line(command, tiny_model_dir, tmp_path):
    args = [str(a).format(tmp=tmp_path, model=tiny_model_dir) for a in command]
    assert "is out of range; a seed is an integer from 0 to 2**64-1" in _one_error_line(invoke(*args))


@pytest.mark.parametrize("command", [
    ["init-model", "/sys/ldm-rt-m", "--preset", "tiny"],
    ["train-demo", "--stage", "vae", "--run-dir", "/sys/ldm-rt-run", "--steps", 1, "--config", "tiny"],
])
def test_unwritable_directory_is_one_error_line(command):
    line = _one_error_line(invoke(*command))
    assert "/sys/ldm-rt-" in line and ("cannot create" in line or "not writable" in line), line


def test_huge_batch_is_refused_against_free_memory(tiny_model_dir, tmp_path, monkeypatch):
    from ldm_rt import limits

    monkeypatch.setattr(limits, "available_memory", lambda device: 2**14)  # 16 KiB free
    line = _one_error_line(invoke("run", "--model-dir", tiny_model_dir, "--prompt", "x", "--num-images", 3,
                                  "--out", tmp_path / "x.png"))
    assert "3 image(s) of 16x16 would need about" in line and "GiB free on cpu" in line, line
    assert not list(tmp_path.glob("*.png"))


def test_no_seed_draws_a_fresh_printed_seed(tiny_model_dir, tmp_path):
    seeds = []
    for name in ("a.png", "b.png"):
        result = invoke("run", "--model-dir", tiny_model_dir, "--prompt", "x", "--steps", 1, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        line = next(l for l in result.output.splitlines() if l.startswith("seed: "))
        seeds.append(int(line.split()[1]))
        assert Image.open(tmp_path / name).text["seed"] == str(seeds[-1])
    assert seeds[0] != seeds[1]  # 2**-32 odds of a false failure
    again = tmp_path / "again.png"
    assert invoke("run", "--model-dir", tiny_model_dir, "--prompt", "x", "--steps", 1, "--seed", seeds[0],
                  "--out", again).exit_code == 0
    assert Image.open(again).tobytes() == Image.open(tmp_path / "a.png").tobytes()


def test_png_carries_its_recipe(tiny_model_dir, tmp_path):
    out = tmp_path / "r.png"
    result = invoke("run", "--model-dir", tiny_model_dir, "--prompt", "a red circle", "--negative-prompt", "blue",
                    "--steps", 2, "--guidance", 3.5, "--seed", 11, "--height", 12, "--width", 20, "--out", out)
    assert result.exit_code == 0, result.output
    text = Image.open(out).text
    assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "size", "backend")} == {
        "prompt": "a red circle", "negative_prompt": "blue", "seed": "11", "steps": "2", "guidance": "3.5",
        "size": "20x12", "backend": "torch"}
    assert text["model"] == str(tiny_model_dir)
    assert text["parameters"].startswith("a red circle\nNegative prompt: blue\nSteps: 2, CFG scale: 3.5, Seed: 11,")


def test_several_prompts_say_which_file_is_which(tiny_model_dir, tmp_path):
    out = tmp_path / "p.png"
    result = invoke("run", "--model-dir", tiny_model_dir, "--prompt", "first one", "--prompt", "second one",
                    "--steps", 1, "--seed", 0, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'p-0.png'} (16x16): 'first one'" in result.output
    assert f"wrote {tmp_path / 'p-1.png'} (16x16): 'second one'" in result.output
    assert Image.open(tmp_path / "p-1.png").text["prompt"] == "second one"
    assert Image.open(tmp_path / "p-1.png").text["batch_index"] == "1"


def test_overwriting_an_output_says_so(tiny_model_dir, tmp_path):
    out = tmp_path / "o.png"
    args = ("run", "--model-dir", tiny_model_dir, "--prompt", "x", "--steps", 1, "--seed", 0, "--out", out)
    assert "replaced the existing file" not in invoke(*args).output
    assert "replaced the existing file" in invoke(*args).output


@pytest.mark.parametrize("args", [["--backend", "foo"], ["--steps", "abc"], []])
def test_usage_errors_exit_2_with_usage_text(tiny_model_dir, args):
    """What the README says of usage errors (click's): exit code 2, the usage line, one `Error:` line."""
    result = invoke("run", "--model-dir", tiny_model_dir, *(args or ["--steps", 1]), *([] if not args else ["--prompt", "x"]))
    assert result.exit_code == 2 and result.output.startswith("Usage: ") and "Error: " in result.output, result.output


def test_init_model_help_lists_the_presets():
    from ldm_rt.configs import PRESETS

    output = " ".join(invoke("init-model", "--help").output.split())
    assert all(name in output for name in PRESETS), output


def test_train_demo_export_defaults_to_the_run_dir(tmp_path, monkeypatch):
    """Never into the installed package by default; the output says how to make it the built-in model."""
    from ldm_rt.demo import train

    def fake_export(cfg, run_dir, out, use_ema=True):  # the export itself is tested in test_demo_train.py
        out.mkdir(parents=True)
        return out

    monkeypatch.setattr(train, "export", fake_export)
    result = invoke("train-demo", "--stage", "export", "--run-dir", tmp_path / "run", "--config", "tiny")
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'run' / 'model'}" in result.output
    assert "to make it the built-in model" in result.output and str(train.DEFAULT_OUT) in result.output
