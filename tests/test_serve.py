"""`ldm-rt serve`: real servers on 127.0.0.1 (subprocesses started here, every wait bounded)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import HOST, Server, concurrently, generate, get, metric, png_array, pngs, request  # noqa: E402

from ldm_rt.errors import InputError  # noqa: E402
from ldm_rt.parity import IMAGE_PSNR_DB, psnr  # noqa: E402

# max-queue 3 < max-batch 4: a burst fills the queue before a batch leaves (test_burst_gets_429)
SERVER_ARGS = ("--max-batch", "4", "--max-wait-ms", "400", "--max-queue", "3")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = Server("--model-dir", str(tiny_model_dir), *SERVER_ARGS,
                 log_path=tmp_path_factory.mktemp("serve") / "server.log")
    yield srv
    srv.stop()


def test_health_ready_metrics(server):
    status, headers, body = get(server.port, "/healthz")
    assert status == 200 and body["status"] == "ok"
    assert headers["x-ldm-rt-replica"]
    assert get(server.port, "/readyz")[:1] == (200,)
    status, headers, text = get(server.port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("ldm_rt_requests_total", "ldm_rt_queue_depth", "ldm_rt_batch_size_bucket", "ldm_rt_ready 1.0"):
        assert name in text


def test_generation_api_shape(server):
    status, headers, body = generate(server.port, prompt="a red circle", n=3, size="20x12", seed=5, steps=2)
    assert status == 200, body
    assert set(body) == {"created", "seed", "data"} and body["seed"] == 5
    assert abs(body["created"] - time.time()) < 120
    images = [png_array(p) for p in pngs(body)]
    assert len(images) == 3 and all(a.shape == (12, 20, 3) for a in images)  # size is WIDTHxHEIGHT
    assert headers["x-ldm-rt-batch-size"] == "3"
    # without a seed the server draws one and says which
    status, _, body = generate(server.port, prompt="a red circle", steps=1)
    assert status == 200 and isinstance(body["seed"], int)


def test_same_seed_same_png_as_run(server, tiny_model_dir, tmp_path):
    settings = dict(prompt="a blue square", negative_prompt="green", seed=11, steps=3, guidance=3.5)
    status, headers, body = generate(server.port, n=2, size="24x16", **settings)
    assert status == 200 and headers["x-ldm-rt-batch-size"] == "2"  # alone in its batch
    out = tmp_path / "run.png"
    subprocess.run([sys.executable, "-m", "ldm_rt.cli", "run", "--model-dir", str(tiny_model_dir),
                    "--prompt", settings["prompt"], "--negative-prompt", settings["negative_prompt"],
                    "--seed", "11", "--steps", "3", "--guidance", "3.5", "--num-images", "2", "--width", "24",
                    "--height", "16", "--out", str(out)],
                   check=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONSAFEPATH="1"),
                   capture_output=True)
    assert pngs(body) == [(tmp_path / "run-0.png").read_bytes(), (tmp_path / "run-1.png").read_bytes()]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """PNG bytes of an unbatched `Pipeline.generate` (what `ldm-rt run` calls), one torch thread
    as the server."""
    import torch

    from ldm_rt.pipeline import Pipeline
    from ldm_rt.serve.engine import encode_png

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(tiny_model_dir, device="cpu")
    yield lambda **kw: [encode_png(im) for im in pipe.generate(**kw).images]
    torch.set_num_threads(threads)


def test_concurrent_requests_share_one_batch(server, reference):
    count, total = metric(server.port, "ldm_rt_batch_size_count"), metric(server.port, "ldm_rt_batch_size_sum")
    calls = [dict(prompt="a red circle", seed=21, steps=4, size="16x16"),
             dict(prompt="two green squares", seed=22, steps=4, size="16x16", negative_prompt="red"),
             dict(prompt="a red circle", seed=23, steps=4, size="32x16")]  # another shape: its own batch
    answers = concurrently(lambda **kw: generate(server.port, **kw), calls)
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [a[1]["x-ldm-rt-batch-size"] for a in answers] == ["2", "2", "1"]
    assert metric(server.port, "ldm_rt_batch_size_count") == count + 2  # one batch of 2, one of 1
    assert metric(server.port, "ldm_rt_batch_size_sum") == total + 3
    assert metric(server.port, "ldm_rt_batch_requests_bucket", 'le="1.0"') >= 1
    # Each batched image is its own unbatched run's, up to the last bit of batched fp32 matmuls.
    for call, (_, _, body) in zip(calls, answers):
        width, height = map(int, call.pop("size").split("x"))
        [ref] = reference(**call, height=height, width=width)
        got, want = png_array(pngs(body)[0]), png_array(ref)
        assert psnr(*map(_tensor, (got, want))) >= IMAGE_PSNR_DB["fp32"]
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


def _tensor(a):
    import torch

    return torch.from_numpy(a.astype(np.float64))


BAD_BODIES = [
    (dict(prompt="a red circle", size="16"), "size '16' must be WIDTHxHEIGHT"),
    (dict(prompt="a red circle", size="18x16"), "width 18 must be a positive multiple of 4"),
    (dict(prompt="a red circle", n=0), "n must be between 1 and 10"),
    (dict(prompt="a red circle", n=11), "n must be between 1 and 10"),
    (dict(prompt="a red circle", n="two"), "n: "),
    (dict(prompt="a red circle", steps=0), "steps must be a whole number >= 1"),
    (dict(prompt="a red circle", guidance=-1.5), "guidance must be a finite number >= 0"),
    (dict(prompt="   "), "prompt must be a non-empty string"),
    (dict(size="16x16"), "prompt: Field required"),
    (dict(prompt="a red circle", response_format="url"), "response_format must be 'b64_json'"),
    (dict(prompt="a red circle", quality="hd"), "unknown field 'quality'"),
    (dict(prompt="a red circle", seed=-3), "seed -3 is out of range"),
    (dict(prompt="a red circle", seed=2**64), "a seed is an integer from 0 to 2**64-1"),
    (dict(prompt="a red circle", size="100000x16"), "width 100000 is larger than this model takes"),
]


@pytest.mark.parametrize("body,message", BAD_BODIES, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD_BODIES)])
def test_bad_input_is_400_with_one_sentence(server, body, message):
    status, _, answer = request(server.port, "POST", "/v1/images/generations", body)
    assert status == 400, answer
    text = answer["error"]["message"]
    assert message in text and "\n" not in text and text.endswith(".")


def test_invalid_json_is_400(server):
    status, _, answer = request(server.port, "POST", "/v1/images/generations", raw=b"{not json")
    assert status == 400 and answer["error"]["message"] == "the request body is not valid JSON."


def test_burst_gets_429_with_retry_after(server):
    # 12 at once: 3 wait in the queue (its bound) for the 400 ms batching window, the rest are refused
    answers = concurrently(lambda **kw: generate(server.port, **kw),
                           [dict(prompt="a red circle", seed=i, steps=2) for i in range(12)])
    codes = sorted(a[0] for a in answers)
    assert set(codes) == {200, 429} and codes.count(200) >= 3, codes
    for status, headers, body in answers:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and "queue is full" in body["error"]["message"]
        else:
            assert len(pngs(body)) == 1
    assert get(server.port, "/readyz")[0] == 200  # and the server is fine


def test_client_that_disconnects_is_dropped_before_it_runs(server):
    dropped, images = metric(server.port, "ldm_rt_dropped_requests_total"), metric(server.port, "ldm_rt_images_total")
    body = b'{"prompt": "a red circle", "steps": 2}'
    with socket.create_connection((HOST, server.port), timeout=10) as s:
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.1)  # it waits in the 400 ms batching window
    deadline = time.monotonic() + 10
    while metric(server.port, "ldm_rt_dropped_requests_total") == dropped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server.port, "ldm_rt_dropped_requests_total") == dropped + 1
    time.sleep(0.5)
    assert metric(server.port, "ldm_rt_images_total") == images  # it never cost compute


def test_nan_is_500_naming_the_stage_and_the_server_lives(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model = shutil.copytree(tiny_model_dir, tmp_path / "nan-vae")
    path = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    weights["decoder.conv_out.bias"] = weights["decoder.conv_out.bias"] * float("nan")
    save_file(weights, path)
    srv = Server("--model-dir", str(model), "--no-warm-up", log_path=tmp_path / "server.log")
    try:
        for _ in range(2):  # a failed request never takes the server down
            status, _, body = generate(srv.port, prompt="a red circle", steps=2)
            assert status == 500 and body["error"]["message"] == "VAE decoding produced NaN or Inf values."
        assert get(srv.port, "/healthz")[0] == 200
        assert metric(srv.port, "ldm_rt_requests_total", 'code="500"') == 2
    finally:
        srv.stop()


def test_sigterm_finishes_accepted_requests_then_exits(tiny_model_dir, tmp_path):
    srv = Server("--model-dir", str(tiny_model_dir), "--max-batch", "1", "--max-wait-ms", "0",
                 log_path=tmp_path / "server.log")
    try:
        def slow(seed):  # about a second each on the tiny model, one at a time (max batch 1)
            return generate(srv.port, prompt="a red circle", seed=seed, steps=300, timeout=120)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(slow, seed) for seed in range(3)]
            deadline = time.monotonic() + 30
            while metric(srv.port, "ldm_rt_queue_depth") < 2 and time.monotonic() < deadline:
                time.sleep(0.02)  # all three accepted: one running, two queued
            srv.proc.send_signal(signal.SIGTERM)
            answers = [f.result(timeout=120) for f in futures]
        assert [a[0] for a in answers] == [200, 200, 200]
        assert all(len(pngs(a[2])) == 1 for a in answers)
        assert srv.proc.wait(60) == 0
        log = srv.output()
        assert "drained: every accepted request was answered" in log
        with pytest.raises(OSError):  # no longer listening
            get(srv.port, "/healthz", timeout=2)
    finally:
        srv.stop()


def test_serve_without_the_extra_names_it(tmp_path):
    code = ("import sys; sys.modules['fastapi'] = None; from ldm_rt.cli import main; "
            "main(['serve'], prog_name='ldm-rt')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: ldm-rt serve needs the 'fastapi' package, which is not installed: pip install 'ldm-rt[serve]'"]


@pytest.mark.parametrize("args,message", [
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0."),
    (["--replicas", "2"], "--replicas only apply with --ray."),
])
def test_bad_flags_are_one_line(args, message):
    from click.testing import CliRunner

    from ldm_rt.cli import main

    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 1 and result.output.strip() == f"error: {message}"


def test_load_bench_runs(tiny_model_dir, tmp_path):
    from bench_scripts import load_bench_script

    bench = load_bench_script("serve_load")
    result = bench.main(["--model-dir", str(tiny_model_dir), "--concurrency", "1,3", "--requests", "2",
                         "--max-batch", "4", "--steps", "2", "--out", str(tmp_path)])
    rows = {(r["mode"], r["concurrency"]): r for r in result["rows"]}
    assert set(rows) == {(m, c) for m in ("batched", "unbatched") for c in (1, 3)}
    assert all(r["failed"] == 0 and r["requests"] == 2 * r["concurrency"] and r["p99_s"] >= r["p50_s"] > 0
               for r in rows.values())
    assert rows[("unbatched", 3)]["mean_batch"] == 1.0
    assert (tmp_path / "results.json").is_file() and len(result["table"]) == 2 + 4


def test_engine_serves_a_flux_directory(tmp_path):
    """The service asks the model's family for its size checks, so a FLUX.1 directory serves too
    (engine only, no server: the HTTP layer is family-blind)."""
    from click.testing import CliRunner

    from ldm_rt.cli import main
    from ldm_rt.serve.engine import Engine

    assert CliRunner().invoke(main, ["init-model", str(tmp_path / "m"), "--preset", "flux-tiny"]).exit_code == 0
    engine = Engine(tmp_path / "m")
    engine.load()
    with pytest.raises(InputError, match="multiple of 16"):
        engine.check("a cat", size="40x40")
    report = engine.run_batch([engine.check("a cat", n=2, size="48x32", seed=3, steps=2)])
    outcome = report.outcomes[0]
    assert outcome.error is None and len(outcome.pngs) == 2
    assert Image.open(io.BytesIO(outcome.pngs[0])).size == (48, 32)


@pytest.fixture(scope="module")
def flux_tiny_dir(tmp_path_factory):
    from ldm_rt.model_dir import init_model

    return init_model(tmp_path_factory.mktemp("flux") / "tiny", "flux-tiny", seed=3)


def test_http_serves_a_flux_directory(flux_tiny_dir, tmp_path):
    """A FLUX.1 directory through the HTTP app: a request draws `Pipeline.generate`'s pixels (the
    same seed, steps, embedded guidance), two concurrent ones share one batch (each its own noise,
    FLUX.1's packing of the caller's latents), and a size Flux cannot take is a 400 with the
    family's sentence. No warm-up: its default 1024 px x 28 steps is long on the CPU."""
    import torch

    from ldm_rt.pipeline import Pipeline

    srv = Server("--model-dir", str(flux_tiny_dir), "--no-warm-up", "--max-batch", "4", "--max-wait-ms", "400",
                 log_path=tmp_path / "server.log")
    try:
        status, _, answer = request(srv.port, "POST", "/v1/images/generations", dict(prompt="a fox", size="40x40"))
        assert status == 400 and "multiple of 16" in answer["error"]["message"], answer
        calls = [dict(prompt="a red fox", seed=3, steps=2, size="48x32", guidance=2.5),
                 dict(prompt="a blue owl", seed=4, steps=2, size="48x32", guidance=2.5)]
        status, headers, body = generate(srv.port, n=2, **calls[0])
        assert status == 200 and headers["x-ldm-rt-batch-size"] == "2", body
        alone = [png_array(p) for p in pngs(body)]
        together = concurrently(lambda **kw: generate(srv.port, **kw), calls)
        assert [a[0] for a in together] == [200, 200]
        assert [a[1]["x-ldm-rt-batch-size"] for a in together] == ["2", "2"]  # one batch of two requests
    finally:
        srv.stop()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs
    try:
        pipe = Pipeline.from_pretrained(flux_tiny_dir, device="cpu")
        refs = []
        for call in calls:
            width, height = map(int, call["size"].split("x"))
            kwargs = dict(seed=call["seed"], steps=2, guidance=2.5, height=height, width=width)
            refs.append([np.asarray(im) for im in pipe.generate(call["prompt"], num_images=2 if not refs else 1,
                                                                 **kwargs).images])
    finally:
        torch.set_num_threads(threads)
    assert alone[0].shape == (32, 48, 3) and alone[0].std() > 5
    assert all(np.array_equal(a, b) for a, b in zip(alone, refs[0]))  # an unbatched request is run's call
    for (_, _, answer), ref in zip(together, (refs[0][0], refs[1][0])):
        got = png_array(pngs(answer)[0])  # batched: up to the last bit of batched fp32 matmuls
        assert psnr(_tensor(got), _tensor(ref)) >= IMAGE_PSNR_DB["fp32"]
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2
