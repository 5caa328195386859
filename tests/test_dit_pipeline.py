"""Class-conditional DiT end to end (issue 8): our Pipeline against diffusers' DiTPipeline on a
tiny random model, `ldm-rt convert` / `ldm-rt run` on DiTPipeline and original-layout checkpoints,
bad inputs, and the ONNX export with class labels as the conditioning input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bench_scripts import load_bench_script
from cli_helpers import invoke
from ldm_rt.configs import PRESETS
from ldm_rt.dit_checkpoints import to_diffusers, to_original
from ldm_rt.model_dir import load_model_dir, random_components
from ldm_rt.parity import IMAGE_PSNR_DB, psnr
from ldm_rt.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")

TINY = PRESETS["tiny-class"]
CLASSES = [207, 0]


@pytest.fixture(scope="module")
def dit_pipeline_dir(tmp_path_factory):
    """A diffusers DiTPipeline directory (save_pretrained) with random non-zero weights, per-block
    embedders tied as in the published weights, and the published DDIMScheduler settings."""
    components = random_components(TINY, seed=0)
    dit, vae = components.transformer, components.vae
    c = dit.config
    hf = diffusers.DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_channels,
        out_channels=c.output_channels, num_layers=c.depth, sample_size=c.sample_size, patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes,
    ).eval()
    hf.load_state_dict(to_diffusers(dit.state_dict(), c), strict=True)
    hf_vae = diffusers.AutoencoderKL(**{k: v for k, v in vae.config.to_dict().items() if not k.startswith("_")})
    hf_vae.load_state_dict(vae.state_dict(), strict=True)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                                        clip_sample=False)
    root = tmp_path_factory.mktemp("dit") / "dit-pipeline"
    diffusers.DiTPipeline(transformer=hf.eval(), vae=hf_vae.eval(), scheduler=scheduler).save_pretrained(root)
    return root




@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_pipeline_equals_diffusers_dit_pipeline(dit_pipeline_dir, guidance):
    reference = diffusers.DiTPipeline.from_pretrained(dit_pipeline_dir)
    ref = reference(class_labels=CLASSES, guidance_scale=guidance, num_inference_steps=7, output_type="pt",
                    generator=torch.Generator("cpu").manual_seed(3)).images  # (B, 3, H, W) in [0, 1]
    ours = Pipeline.from_pretrained(dit_pipeline_dir, device="cpu", dtype="fp32")
    assert ours.scheduler["_class_name"] == "DDIMScheduler" and ours.defaults == {"steps": 50, "guidance": 4.0}

    # the float image, before 8-bit rounding
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(3))
    image = ours.decode(ours.denoise_class(latents, torch.tensor(CLASSES), 7, guidance))
    image = (image / 2 + 0.5).clamp(0, 1)
    assert ref.std() > 0.05
    assert (image - ref).abs().max().item() <= 1e-5

    # the PNG path: class names and indices as prompts
    images = ours.generate(["golden retriever", "0"], guidance=guidance, steps=7, seed=3).images
    ref8 = (ref.permute(0, 2, 3, 1).numpy() * 255).round()
    got8 = np.stack([np.asarray(i) for i in images]).astype(np.float64)
    assert psnr(torch.from_numpy(got8), torch.from_numpy(ref8)) >= 50.0


def test_class_steps_replay_safely_under_one_capture_per_shape(dit_pipeline_dir, replaying_runner):
    """As test_pipeline's twin: one captured class-conditional step (DDIM, learned sigma, CFG on
    some channels) serves other step counts and guidance scales exactly."""
    eager = Pipeline.from_pretrained(dit_pipeline_dir, device="cpu", dtype="fp32")
    replayed = Pipeline.from_pretrained(dit_pipeline_dir, device="cpu", dtype="fp32")
    replayed.run_step = replaying_runner
    for kwargs in (dict(steps=3, guidance=4.0), dict(steps=5, guidance=1.5), dict(steps=4, guidance=3.0)):
        want = np.asarray(eager.generate(CLASSES, seed=7, **kwargs).images[1])
        got = np.asarray(replayed.generate(CLASSES, seed=7, **kwargs).images[1])
        assert np.array_equal(got, want), kwargs
    assert len(replaying_runner.captured) == 1


def test_cfg_changes_the_image(dit_pipeline_dir):
    pipe = Pipeline.from_pretrained(dit_pipeline_dir, device="cpu", dtype="fp32")
    a = np.asarray(pipe(207, guidance=1.0, steps=3)[0]).astype(float)
    b = np.asarray(pipe(207, guidance=4.0, steps=3)[0]).astype(float)
    assert np.abs(a - b).max() > 0


def test_convert_and_run_cli(dit_pipeline_dir, tmp_path):
    # a DiTPipeline directory runs as it is ...
    out = tmp_path / "dog.png"
    result = invoke("run", "--model-dir", dit_pipeline_dir, "--prompt", "golden retriever", "--steps", 2,
                    "--seed", 0, "--out", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (16, 16)

    # ... converts to an ldm-rt directory, which gives the same image
    converted = tmp_path / "converted"
    assert invoke("convert", "--from", "dit-diffusers", dit_pipeline_dir, "--out", converted).exit_code == 0
    assert json.loads((converted / "model_index.json").read_text())["text_encoder"] is None
    out2 = tmp_path / "dog2.png"
    assert invoke("run", "--model-dir", converted, "--prompt", "207", "--steps", 2, "--seed", 0, "--out", out2).exit_code == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(out2)))

    # an original-layout checkpoint (.pt) + a VAE folder -> ldm-rt directory -> same image, up to the
    # conventions that differ (timestep frequencies, MLP eps), so compare with its own run
    components = load_model_dir(dit_pipeline_dir)
    config = components.transformer.config
    checkpoint = tmp_path / "DiT-tiny.pt"
    torch.save(to_original(components.transformer.state_dict(), config), checkpoint)
    from_original = tmp_path / "from-original"
    result = invoke("convert", "--from", "dit-original", checkpoint, "--vae", dit_pipeline_dir / "vae",
                    "--num-heads", config.num_heads, "--out", from_original)
    assert result.exit_code == 0, result.output
    loaded = load_model_dir(from_original).transformer
    assert loaded.config.timestep_freq_shift == 0 and loaded.config.mlp_eps == 1e-6
    assert all(torch.equal(v, components.transformer.state_dict()[k]) for k, v in loaded.state_dict().items())
    out3 = tmp_path / "fish.png"
    result = invoke("run", "--model-dir", from_original, "--prompt", "tench", "--steps", 2,
                    "--guidance-channels", 3, "--out", out3)
    assert result.exit_code == 0, result.output
    assert Image.open(out3).size == (16, 16)


@pytest.mark.parametrize("args, message", [
    (["--prompt", "golden retreiver"], "error: unknown ImageNet class 'golden retreiver'; closest: 'golden retriever (207)'"),
    (["--prompt", "1000"], "error: class index 1000 is out of range; this model has classes 0..999."),
    (["--prompt", "207", "--negative-prompt", "cat"], "error: a class-conditional model takes no negative prompt"),
    (["--prompt", "207", "--guidance-channels", "5"], "error: guidance_channels 5 must be between 1 and the 4"),
])
def test_bad_class_inputs_exit_1_with_one_error_line(dit_pipeline_dir, tmp_path, args, message):
    result = invoke("run", "--model-dir", dit_pipeline_dir, "--steps", 1, "--out", tmp_path / "x.png", *args)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.output
    assert not (tmp_path / "x.png").exists()


def test_convert_bad_inputs(tmp_path):
    result = invoke("convert", "--from", "dit-original", tmp_path / "missing.pt", "--vae", tmp_path, "--out",
                    tmp_path / "o")
    assert result.exit_code == 1 and "error: checkpoint" in result.output and "does not exist" in result.output
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = invoke("convert", "--from", "dit-original", tmp_path / "junk.pt", "--vae", tmp_path, "--out",
                    tmp_path / "o")
    assert result.exit_code == 1 and "is not a readable torch checkpoint" in result.output
    result = invoke("convert", "--from", "dit-original", tmp_path / "junk.pt", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "needs --vae DIR" in result.output


def test_class_model_export_and_onnxruntime(dit_pipeline_dir, tmp_path):
    """The class-conditional DiT exports with class_labels as its conditioning input, dynamic
    batch and latent size, and onnxruntime runs it (null class and a non-square size included)."""
    pytest.importorskip("onnxruntime")
    from ldm_rt.backends.onnxruntime_backend import OrtComponent
    from ldm_rt.errors import InputError
    from ldm_rt.export.onnx_export import export_model
    from ldm_rt.export.specs import component_specs

    components = load_model_dir(dit_pipeline_dir)
    with pytest.raises(InputError, match="this model has no text_encoder"):
        export_model(components, tmp_path / "none", ["text_encoder"])
    manifest = export_model(components, tmp_path / "onnx", ["transformer"], log=lambda _: None)
    spec = component_specs(components.config)["transformer"]
    assert spec.input_names == ["latents", "timestep", "class_labels"]
    assert manifest["components"]["transformer"]["inputs"][2] == {"name": "class_labels", "dtype": "int64",
                                                                 "dims": ["batch"]}
    graph = OrtComponent(tmp_path / "onnx" / "transformer.onnx", spec, torch.device("cpu"), ["CPUExecutionProvider"])
    for batch, h, w in ((3, 8, 8), (2, 12, 6)):
        latents, t, labels = spec.sample_inputs(batch, h, w, seed=batch)
        labels[0] = components.transformer.config.num_classes  # the null class
        with torch.no_grad():
            ref = components.transformer(latents, t, class_labels=labels)
        out = graph(latents, t, labels)[0]
        assert out.shape == ref.shape == (batch, 8, h, w)
        assert (out - ref).abs().max().item() <= 1e-4
        assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_bench_script_smoke_on_cpu(tmp_path):
    """bench/dit_diffusers.py (a GPU benchmark) parses its arguments and runs end to end on the CPU
    with the tiny config; its numbers mean nothing here, only that it runs and writes its JSON."""
    bench = load_bench_script("dit_diffusers")
    assert bench.parse_args(["--out", "x"]).dtypes == "fp16,bf16"
    report = bench.main(["--tiny", "--device", "cpu", "--dtypes", "fp32", "--sizes", "16", "--iters", "1",
                         "--warmup", "0", "--steps", "1", "--no-compile", "--backends", "torch", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "dit_diffusers.json").read_text()) == json.loads(json.dumps(report))
    assert [r["impl"] for r in report["latency"]] == ["diffusers eager", "ldm-rt torch whole CFG step"]
    assert report["images"][0]["psnr_torch_vs_diffusers"] >= 50
    # bench/report.py renders it for RESULTS.md: latency rows with the speed-up, then the PSNRs
    render = load_bench_script("report")
    text = render.report([tmp_path / "dit_diffusers.json"])
    (ours,) = [r for r in report["latency"] if r["impl"].startswith("ldm-rt")]
    (up,) = report["speedup"]
    assert (f"| 16 | fp32 | ldm-rt torch whole CFG step | {render._ms(ours)} | {up['speedup']:.2f}x vs diffusers eager "
            f"| {ours['first_call_ms'] / 1000:.2f} |") in text
    psnrs = [v for k, v in report["images"][0].items() if k.startswith("psnr_")]
    assert "| 16 | fp32 | 1 | " + " | ".join(f"{v:.1f}" for v in psnrs) + " |" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU interpreter path")
def test_class_model_on_triton_backend_matches_torch_backend_on_cpu(dit_pipeline_dir):
    """Issue 8's class-conditional DiT (sin-cos positions, no RoPE, no cross-attention, learned
    sigma) through the Triton kernels in the interpreter: the same image as the torch backend."""
    from ldm_rt import kernels

    assert kernels.interpreting()
    kwargs = dict(guidance=4.0, steps=3, seed=3)
    ref = Pipeline.from_pretrained(dit_pipeline_dir, device="cpu", dtype="fp32").generate(CLASSES, **kwargs).images
    ours = Pipeline.from_pretrained(dit_pipeline_dir, backend="triton", device="cpu", dtype="fp32")
    got = ours.generate(CLASSES, **kwargs).images
    for a, b in zip(got, ref):
        db = psnr(torch.from_numpy(np.asarray(a, dtype=np.float64)), torch.from_numpy(np.asarray(b, dtype=np.float64)))
        assert db >= IMAGE_PSNR_DB["fp32"], f"triton class image PSNR {db:.1f} dB against the torch backend"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_class_model_on_triton_backend_on_cuda(dit_pipeline_dir, dtype):
    """The class model's CFG steps replayed from CUDA graphs, against the fp32 torch backend."""
    kwargs = dict(guidance=4.0, steps=8, seed=3)
    ref = Pipeline.from_pretrained(dit_pipeline_dir, device="cuda", dtype="fp32").generate(CLASSES, **kwargs).images
    got = Pipeline.from_pretrained(dit_pipeline_dir, backend="triton", device="cuda", dtype=dtype).generate(
        CLASSES, **kwargs).images
    for a, b in zip(got, ref):
        db = psnr(torch.from_numpy(np.asarray(a, dtype=np.float64)), torch.from_numpy(np.asarray(b, dtype=np.float64)))
        assert db >= IMAGE_PSNR_DB[dtype], f"triton {dtype} class image PSNR {db:.1f} dB against fp32 torch"
