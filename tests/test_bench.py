"""`ldm-rt bench` on the CPU: results.json schema, the chart, skipped backends, argument errors,
and that the diffusers/transformers baselines hold the same weights as ours. Speed is never asserted."""

import dataclasses
import json
import math
import sys

import pytest
import torch
from PIL import Image

from bench_scripts import load_bench_script
from cli_helpers import invoke
from ldm_rt import bench

CMD = ["bench", "--preset", "tiny", "--backends", "torch,onnxruntime,triton,tensorrt", "--resolutions", "32",
       "--iters", "2", "--warmup", "1", "--steps", "2"]




@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDM_RT_CACHE", str(tmp_path_factory.mktemp("cache")))  # a fresh ONNX export
        result = invoke(*CMD, "--out", out)
    assert result.exit_code == 0, result.output
    return out, result.output, json.loads((out / "results.json").read_text())


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_results_json_has_every_stage_of_every_runnable_backend(tiny_run):
    _, _, results = tiny_run
    assert results["schema"] == bench.SCHEMA
    assert results["device"]["type"] == "cpu" and "wall clock" in results["device"]["timing"]
    assert results["command"] == "ldm-rt bench " + " ".join(CMD[1:]) + f" --out {tiny_run[0]}"
    for dist in ("torch", "triton", "onnxruntime", "tensorrt", "diffusers", "ldm-rt"):
        assert dist in results["versions"]
    assert results["versions"]["torch"] == torch.__version__
    s = results["settings"]
    assert (s["batch"], s["dit_batch"], s["steps"], s["iters"], s["warmup"], s["resolutions"]) == (1, 2, 2, 2, 1, [32])
    runs = {r["backend"]: r for r in results["runs"]}
    assert list(runs) == ["torch", "onnxruntime", "triton", "tensorrt"]  # none dropped, in the asked order
    for name in ("torch", "onnxruntime"):
        run = runs[name]
        assert run["status"] == "ok" and run["dtype"] == "fp32" and run["resolution"] == 32
        assert list(run["stages"]) == list(bench.STAGES)
        for stage, stats in run["stages"].items():
            assert _positive(stats["median_ms"]) and _positive(stats["p90_ms"]), (name, stage, stats)
            assert stats["p90_ms"] >= stats["median_ms"] >= stats["min_ms"]
            assert stats["iters"] == 2
            assert _positive(run["one_time"]["first_call_ms"][stage])
        assert run["one_time"]["load_s"] > 0 and run["peak_memory_mib"] is None  # no GPU memory on the CPU
        ratios = run["speedup"]["vs_torch_eager"]
        assert set(ratios) == set(bench.STAGES) and all(_positive(v) for v in ratios.values())
    assert all(v == 1.0 for v in runs["torch"]["speedup"]["vs_torch_eager"].values())
    ort = runs["onnxruntime"]
    for stage in bench.STAGES:  # the ratio is computed from the two medians, not invented
        assert ort["speedup"]["vs_torch_eager"][stage] == pytest.approx(
            runs["torch"]["stages"][stage]["median_ms"] / ort["stages"][stage]["median_ms"])


def test_unavailable_backends_are_listed_as_skipped_with_the_reason(tiny_run):
    _, output, results = tiny_run
    runs = {r["backend"]: r for r in results["runs"]}
    assert runs["tensorrt"]["status"] == "skipped" and "pip install 'ldm-rt[tensorrt]'" in runs["tensorrt"]["reason"]
    assert runs["triton"]["status"] == "skipped" and "not meaningful" in runs["triton"]["reason"]
    assert runs["tensorrt"]["stages"] == {} and runs["triton"]["stages"] == {}
    table = [line for line in output.splitlines() if "skipped:" in line]
    assert any("tensorrt" in line and "ldm-rt[tensorrt]" in line for line in table)
    assert any("triton" in line and "not meaningful" in line for line in table)
    for stage in bench.STAGES:
        assert any("torch " in line and stage in line for line in output.splitlines())


def _load_report():
    return load_bench_script("report")


def test_report_renders_the_run_as_markdown(tiny_run, capsys):
    """bench/report.py: the tables for RESULTS.md come from results.json, figures copied by a program."""
    out, _, results = tiny_run
    report = _load_report()
    assert report.main([str(out / "results.json"), "--focus", "onnxruntime"]) == 0
    text = capsys.readouterr().out
    assert "**CPU: " in text and f"`{results['command']}`" in text
    assert "| stage | torch ms | onnxruntime ms | onnxruntime vs torch | onnxruntime vs best compile |" in text
    runs = {r["backend"]: r for r in results["runs"]}
    for stage in bench.STAGES:
        torch_ms, ort_ms = (runs[b]["stages"][stage] for b in ("torch", "onnxruntime"))
        ratio = runs["onnxruntime"]["speedup"]["vs_torch_eager"][stage]
        flag = " (noisy)" if stage in runs["onnxruntime"]["noisy"].get("vs_torch_eager", []) else ""
        row = f"| {stage} | {report._ms(torch_ms)} | {report._ms(ort_ms)} | {ratio:.2f}x{flag} |  |"
        assert row in text, row
    assert "- skipped: tensorrt fp32 32 px: " in text and "- skipped: triton fp32 32 px: " in text
    assert report.main([str(out / "missing.json")]) == 2


def test_chart_is_a_real_png(tiny_run):
    out, output, _ = tiny_run
    path = out / bench.CHART_FILE
    assert f"wrote {path}" in output
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 300
        assert len(image.convert("L").getcolors(1 << 16) or []) > 10  # bars and text, not a blank canvas


def test_missing_matplotlib_is_one_sentence_and_results_are_still_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    result = invoke("bench", "--preset", "tiny", "--backends", "torch", "--resolutions", "16", "--iters", "1",
                    "--warmup", "0", "--steps", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "pip install 'ldm-rt[bench]'" in result.output
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["status"] == "ok"
    assert not (tmp_path / bench.CHART_FILE).exists()


@pytest.mark.parametrize("extra, message", [
    (["--backends", "torch,jax"], "unknown backend 'jax'"),
    (["--resolutions", "30"], "must be a positive multiple of 4 (VAE factor 2 x patch size 2)"),
    (["--resolutions", "abc"], "not a whole number"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--model-dir", "somewhere"], "exclude each other"),
    (["--preset", "nope"], "nope"),
])
def test_bad_arguments_are_one_error_line(tmp_path, extra, message):
    args = ["bench", "--preset", "tiny", "--backends", "torch", "--out", tmp_path / "out", *extra]
    if extra[0] == "--preset":
        args = ["bench", "--backends", "torch", "--out", tmp_path / "out", *extra]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not (tmp_path / "out" / "results.json").exists()


def test_unwritable_out_is_one_error_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("bench", "--preset", "tiny", "--backends", "torch", "--out", blocker / "sub")
    assert result.exit_code == 1
    assert result.output.startswith("error: cannot create output directory") and result.output.count("\n") == 1


def test_a_failing_backend_is_recorded_and_the_run_goes_on(monkeypatch):
    from ldm_rt.model_dir import random_components
    from ldm_rt.configs import ModelConfig

    real = bench.make_pipeline

    def broken(backend, *args):
        if backend == "onnxruntime":
            raise RuntimeError("boom\nsecond line")
        return real(backend, *args)

    monkeypatch.setattr(bench, "make_pipeline", broken)
    settings = bench.BenchSettings(backends=("onnxruntime", "torch"), resolutions=(16,), dtypes=("fp32",),
                                   steps=1, warmup=0, iters=1, loop_iters=1)
    runs = bench.run_bench(random_components(ModelConfig.from_name("tiny")), settings, torch.device("cpu"),
                           progress=False)
    assert [r.status for r in runs] == ["skipped", "ok"]
    assert runs[0].reason == "failed: RuntimeError: boom"


def test_diffusers_baselines_hold_our_weights():
    """The baselines are the libraries' own modules with our weights: with diffusers' DiT
    conventions in our config, their outputs equal ours (fp32)."""
    from ldm_rt.configs import ModelConfig
    from ldm_rt.model_dir import random_components

    config = ModelConfig.from_name("tiny-class")
    dit = dataclasses.replace(config.transformer, timestep_freq_shift=1, mlp_norm_eps=1e-5)
    parts = random_components(dataclasses.replace(config, transformer=dit), seed=3)
    pipe = bench.make_pipeline("diffusers", parts, torch.device("cpu"), "fp32")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t, y = torch.tensor([10.0, 500.0, 999.0]), torch.tensor([1, 7, 1000])
    z = torch.randn(2, 4, 8, 6, generator=g)
    with torch.no_grad():
        assert type(pipe.transformer).__name__ == "_HFDiT"
        torch.testing.assert_close(pipe.transformer(x, t, class_labels=y), parts.transformer(x, t, class_labels=y),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(pipe.vae.decode(z), parts.vae.decode(z), atol=1e-5, rtol=0)

    low = bench.make_pipeline("diffusers", parts, torch.device("cpu"), "bf16")  # the baselines follow --dtype
    assert {p.dtype for p in low.transformer.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in low.vae.model.parameters()} == {torch.bfloat16}

    text = random_components(ModelConfig.from_name("tiny"), seed=5)
    hf = bench.transformers_text_encoder(text.text_encoder)
    ids = torch.randint(0, 998, (2, 32), generator=g)
    ids[:, -1] = text.text_encoder.config.eos_token_id
    with torch.no_grad():
        ours_states, _ = text.text_encoder(ids)
        torch.testing.assert_close(hf(input_ids=ids).last_hidden_state, ours_states, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend, dtype, reason", [
    ("tensorrt", "fp32", "tensorrt"),  # not installed here (or, with it, no GPU)
    ("onnxruntime", "bf16", "cannot run bf16 graphs"),
])
def test_backends_refused_before_the_model_is_copied(backend, dtype, reason, monkeypatch):
    """A DiT-XL/2 copy takes seconds: a backend that cannot run is refused before `make_pipeline` copies."""
    from ldm_rt.model_dir import random_components
    from ldm_rt.configs import ModelConfig
    from ldm_rt.errors import LdmRtError

    components = random_components(ModelConfig.from_name("tiny"), 0)
    copies = []
    monkeypatch.setattr(bench.copy, "deepcopy", lambda x: copies.append(x) or x)
    with pytest.raises(LdmRtError, match=reason):
        bench.make_pipeline(backend, components, torch.device("cpu"), dtype)
    assert copies == []


def test_summary_reports_the_spread():
    times = [10.0 + i for i in range(9)] + [100.0]  # nine steady calls and one outlier
    stats = bench.summarize(times)
    assert (stats["median_ms"], stats["p10_ms"], stats["p90_ms"]) == (14.5, 10.0, 18.0)
    assert stats["mad_ms"] == 2.5 and stats["spread"] == pytest.approx(8.0 / 14.5)


def test_a_ratio_whose_spread_makes_it_meaningless_is_flagged():
    """Issue 19: a torch step of 443 ms in one 5-call run (29-36 ms in reruns) gave a '16x'."""
    steady = bench.summarize([30.0, 31.0, 29.5, 30.5, 30.2])
    wild = bench.summarize([29.0, 443.0, 450.0, 36.0, 440.0])
    runs = [bench.Run("torch", "fp32", 32, stages={"denoise_step": wild, "vae_decode": steady}),
            bench.Run("onnxruntime", "fp32", 32, stages={"denoise_step": steady, "vae_decode": steady})]
    bench.add_speedups(runs)
    assert runs[1].noisy == {"vs_torch_eager": ["denoise_step"]}
    results = {"settings": {"batch": 1, "steps": 2, "dit_batch": 2}, "model": {"source": "tiny"},
               "device": {"type": "cpu", "name": "x", "torch_threads": 1}, "runs": [dataclasses.asdict(r) | {"one_time": {"first_call_ms": {
                   "denoise_step": 1.0, "vae_decode": 1.0}, "load_s": 0.1}} for r in runs]}
    lines = bench.format_table(results)
    step = next(l for l in lines if "onnxruntime" in l and "denoise_step" in l)
    vae = next(l for l in lines if "onnxruntime" in l and "vae_decode" in l)
    assert "x?" in step and "x?" not in vae and lines[-1].startswith("?: (p90 - p10) / median above 50%")


def test_missing_diffusers_names_its_own_extra(monkeypatch):
    from ldm_rt.errors import MissingDependencyError
    from ldm_rt.model_dir import random_components
    from ldm_rt.configs import ModelConfig

    monkeypatch.setitem(sys.modules, "diffusers", None)
    vae = random_components(ModelConfig.from_name("tiny"), 0).vae
    with pytest.raises(MissingDependencyError, match=r"pip install 'ldm-rt\[diffusers\]'"):
        bench.diffusers_vae(vae)
