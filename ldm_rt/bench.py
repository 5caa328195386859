"""`ldm-rt bench`: per-stage and end-to-end latency of every backend against its baselines, in one run.

One *run* is (backend, dtype, resolution). Per run, seven stages are timed:

| stage | what is called | batch |
| --- | --- | --- |
| `text_encoder` | the text encoder on token ids (tokenization not timed) | 2 x images (CFG) |
| `denoise_step` | one whole CFG step: the DiT on both halves batched, guidance, scheduler update | 2 x images (CFG) |
| `denoise_loop` | `Pipeline.denoise`: `--steps` DiT calls + scheduler | images |
| `vae_encode` | `Pipeline.encode` (VAE encoder + the seeded sample + scaling): image-to-image's extra stage | images |
| `vae_decode` | `Pipeline.decode` (scaling + VAE decoder) | images |
| `end_to_end` | `Pipeline.generate`: tokenize, encode, denoise, decode, to PIL | images |
| `img2img` | `Pipeline.generate(image=, strength=0.6)`: `end_to_end` plus the VAE encode, 60% of the steps | images |

A model with condition channels (issue 17) gets its image roles as seeded random images in every
stage that runs the DiT (the condition encoded once for `denoise_step`/`denoise_loop`).

Backends: `torch` (eager, the baseline every speed-up is taken against), `compile` (the torch
backend with `torch.compile(mode="reduce-overhead")` on the DiT; `compile-max-autotune` with
`mode="max-autotune"`, added by `--max-autotune`), `triton`, `onnxruntime`, `tensorrt`, and `diffusers`: the libraries' own
implementations of the same architectures with the same weights (transformers `CLIPTextModel`,
diffusers `AutoencoderKL`, and diffusers `DiTTransformer2DModel` for class-conditional DiTs),
swapped into the same pipeline so the scheduler and the loop are shared.

Timing: the first call of each stage is timed on its own and reported as a one-time cost
(compile, autotune, CUDA-graph capture, lazy initialisation), then `warmup` untimed calls, then
`iters` timed calls (`loop_iters` for the two long stages), reported as median and p90. On CUDA
each call is bracketed by CUDA events; on the CPU by `time.perf_counter`. Backend construction
(moving weights, ONNX export, TensorRT engine build) is reported as `load_s`. A device is one
per run of the command, so CPU and GPU figures never share a results file.

A backend that cannot run here (missing extra, no CUDA, a dtype it refuses) or that fails is
recorded as skipped with the reason, and the other backends still run.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ldm_rt import __version__
from ldm_rt.errors import InputError, LdmRtError, MissingDependencyError
from ldm_rt.model_dir import writable_dir

STAGES = ("text_encoder", "denoise_step", "denoise_loop", "vae_encode", "vae_decode", "end_to_end", "img2img")
LONG_STAGES = ("denoise_loop", "end_to_end", "img2img")
IMG2IMG_STRENGTH = 0.6  # diffusers' Flux/SD3 img2img default
BACKENDS = ("torch", "compile", "triton", "onnxruntime", "tensorrt", "diffusers")
BASELINE = "torch"
DTYPES = ("fp32", "fp16", "bf16")
GUIDANCE = 4.0  # CFG on, so the DiT batch is 2 x images
RESULTS_FILE = "results.json"
CHART_FILE = "latency.png"
SCHEMA = "ldm-rt-bench/1"
TRITON_CPU_REASON = ("CPU timings of the Triton interpreter are not meaningful (TRITON_INTERPRET=1 runs each "
                     "kernel in Python); run on a CUDA GPU.")


# ----------------------------------------------------------------------------------- timing


def summarize(times_ms: list[float]) -> dict[str, float]:
    """median, p10/p90 (nearest rank), MAD (median absolute deviation), min and mean of per-call
    milliseconds, and `spread` = (p90 - p10) / median, which `add_speedups` uses to flag a ratio."""
    ms = sorted(times_ms)
    if not ms:
        raise ValueError("no timings to summarize")
    median = statistics.median(ms)
    p10, p90 = ms[max(0, math.ceil(0.1 * len(ms)) - 1)], ms[max(0, math.ceil(0.9 * len(ms)) - 1)]
    return {"median_ms": median, "p10_ms": p10, "p90_ms": p90,
            "mad_ms": statistics.median(abs(x - median) for x in ms), "spread": (p90 - p10) / median if median else 0.0,
            "min_ms": ms[0], "mean_ms": statistics.fmean(ms), "iters": len(ms)}


# A ratio of medians is flagged when either side's (p90 - p10) / median exceeds this: the calls
# varied by more than half the median, so the medians (and their ratio) move from run to run
# (issue 19: a 5-call torch step measured 443 ms once, 29-36 ms in reruns, a "16x" that was noise).
NOISY_SPREAD = 0.5


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on CUDA, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def wall_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock milliseconds of one call, synchronising CUDA: for one-time costs, which are
    mostly host work (compilation, capture) that CUDA events would not attribute cleanly."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def time_calls(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> dict[str, float]:
    """`warmup` untimed calls, then `iters` timed ones: median, p90, min, mean (ms)."""
    for _ in range(warmup):
        fn()
    return summarize([time_once(fn, device) for _ in range(iters)])


def measure_stage(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> tuple[float, dict]:
    """(first call ms, stats of `iters` calls after `warmup` more): the first call is a one-time cost."""
    first = wall_ms(fn, device)
    return first, time_calls(fn, device, iters, warmup)


# ----------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BenchSettings:
    backends: tuple[str, ...]
    resolutions: tuple[int, ...]
    dtypes: tuple[str, ...]
    batch: int = 1
    steps: int = 30
    warmup: int = 3
    iters: int = 20
    loop_iters: int = 5
    seed: int = 0


def parse_list(text: str | None, what: str) -> list[str]:
    items = [s.strip() for s in (text or "").split(",") if s.strip()]
    if not items:
        raise InputError(f"{what} {text!r} is empty; give a comma-separated list.")
    return items


def parse_backends(text: str | None, max_autotune: bool = False) -> tuple[str, ...]:
    names = list(BACKENDS) if text is None else parse_list(text, "--backends")
    for name in names:
        if name not in BACKENDS:
            raise InputError(f"unknown backend {name!r} in --backends; choose from {', '.join(BACKENDS)}.")
    if max_autotune:
        names.append("compile-max-autotune")
    return tuple(dict.fromkeys(names))  # order kept, duplicates dropped


def parse_dtypes(text: str | None, device: torch.device) -> tuple[str, ...]:
    if text is None:
        return ("fp16", "bf16") if device.type == "cuda" else ("fp32",)
    names = parse_list(text, "--dtype")
    for name in names:
        if name not in DTYPES:
            raise InputError(f"unknown dtype {name!r} in --dtype; choose from {', '.join(DTYPES)}.")
    return tuple(dict.fromkeys(names))


def parse_resolutions(text: str | None, config) -> tuple[int, ...]:
    """Image sides in pixels; each a size the model's family takes (`Family.latent_shape`)."""
    from ldm_rt import families

    family = families.for_config(config)
    if text is None:
        return (family.default_size(config),)
    out = []
    for item in parse_list(text, "--resolutions"):
        try:
            px = int(item)
        except ValueError:
            raise InputError(f"--resolutions {item!r} is not a whole number of pixels.") from None
        try:
            family.latent_shape(config, 1, px, px)
        except InputError as exc:
            raise InputError(f"--resolutions {px}: {str(exc).replace('height ', 'side ', 1)}") from None
        out.append(px)
    return tuple(dict.fromkeys(out))


def check_counts(batch: int, steps: int, warmup: int, iters: int, loop_iters: int | None) -> None:
    for name, value, low in (("--batch", batch, 1), ("--steps", steps, 1), ("--iters", iters, 1),
                             ("--warmup", warmup, 0), ("--loop-iters", loop_iters, 1)):
        if value is not None and value < low:
            raise InputError(f"{name} must be >= {low}, got {value}.")


# ----------------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    from ldm_rt.env import _version as version

    return version(dist)


def versions() -> dict[str, str | None]:
    return {
        "ldm-rt": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "cuda (torch build)": torch.version.cuda, "triton": _version("triton"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"), "tensorrt": _version("tensorrt"),
        "diffusers": _version("diffusers"), "transformers": _version("transformers"), "onnx": _version("onnx"),
        "matplotlib": _version("matplotlib"),
    }


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    """The processor's model name ("AMD EPYC ..."), where the OS tells it; else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        driver_api = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
        return {
            "type": "cuda", "name": props.name, "index": index, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "driver": _nvidia_driver(),
            "cuda_driver_api": None if not driver_api else f"{driver_api // 1000}.{driver_api % 1000 // 10}",
            "cuda_runtime": torch.version.cuda, "timing": "CUDA events around each call, after warm-up",
        }
    return {
        "type": "cpu", "name": _cpu_model(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "timing": "wall clock (time.perf_counter) around each call, after warm-up; CPU figures, not GPU",
    }


def device_label(info: dict) -> str:
    return f"CPU ({info['name']}, {info['torch_threads']} threads)" if info["type"] == "cpu" else f"GPU {info['name']}"


# ----------------------------------------------------------------------------------- the model


def load_components(model_dir: Path | None, preset: str | None, seed: int = 0):
    """(Components, description). A preset gets seeded non-zero random weights, as `init-model`
    writes them (`random_components`, kept in memory: nothing is written to disk)."""
    from ldm_rt.model_dir import default_model_dir, load_model_dir

    if model_dir is not None and preset is not None:
        raise InputError("--model-dir and --preset exclude each other; pass one.")
    if preset is not None:
        from ldm_rt import families

        family, config = families.preset(preset)
        return family.random_components(config, seed), f"preset {preset} (seeded random weights, seed {seed})"
    path = model_dir if model_dir is not None else default_model_dir()
    return load_model_dir(path), f"model directory {path}" + ("" if model_dir is not None else " (built-in demo)")


class _Skip(Exception):
    """A backend or stage that does not apply here; the message is the reason."""


class _HFTextEncoder:
    """transformers' CLIPTextModel with the backend call signature: ids -> (states, pooled)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids):
        out = self.model(input_ids=input_ids)
        return out.last_hidden_state, out.pooler_output


class _HFVae:
    def __init__(self, model):
        self.model = model

    def decode(self, z):
        return self.model.decode(z).sample


def transformers_text_encoder(ours):
    """transformers CLIPTextModel holding our text encoder's weights (strictly: every key)."""
    from ldm_rt.errors import require

    transformers = require("transformers", "test", "the transformers CLIPTextModel baseline")
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**ours.config.to_dict())).eval()
    theirs = set(hf.state_dict())
    sd = {(k if k in theirs else k.removeprefix("text_model.")): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer, not a weight
    if missing or unexpected:
        raise LdmRtError(f"transformers CLIPTextModel keys differ from ours: missing {missing[:3]}, "
                         f"unexpected {list(unexpected)[:3]}.")
    return hf.requires_grad_(False)


def diffusers_vae(ours):
    from ldm_rt.errors import require

    diffusers = require("diffusers", "diffusers", "the diffusers AutoencoderKL baseline")
    config = {k: v for k, v in ours.config.to_dict().items() if not k.startswith("_")}
    hf = diffusers.AutoencoderKL(**config).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    return hf.requires_grad_(False)


def make_pipeline(backend: str, components, device: torch.device, dtype: str):
    """A Pipeline for `backend` on a private copy of `components`; raises _Skip or LdmRtError."""
    from ldm_rt.backends import check_backend
    from ldm_rt.pipeline import Pipeline
    from ldm_rt.precision import Precision

    if backend == "triton" and device.type == "cpu":
        raise _Skip(TRITON_CPU_REASON)
    if backend in ("onnxruntime", "tensorrt", "triton"):  # refused before the copy (seconds at DiT-XL/2 size)
        check_backend(backend, device, Precision.parse(dtype))
    parts = copy.deepcopy(components)  # backends move and cast modules in place
    if backend in ("torch", "triton", "onnxruntime", "tensorrt"):
        return Pipeline(parts, backend=backend, device=device, dtype=dtype)
    if backend.startswith("compile"):
        pipe = Pipeline(parts, backend="torch", device=device, dtype=dtype)
        mode = "reduce-overhead" if backend == "compile" else "max-autotune"
        pipe.transformer = torch.compile(pipe.transformer, mode=mode)  # compiled on the first call
        return pipe
    if backend == "diffusers":
        pipe = Pipeline(parts, backend="torch", device=device, dtype=dtype)
        def like(theirs, ours):  # the device and dtype the torch backend gave our module (VAE upcast included)
            return theirs.to(device=device, dtype=next(ours.parameters()).dtype)

        if pipe.text_encoder is not None:
            pipe.text_encoder = _HFTextEncoder(like(transformers_text_encoder(pipe.text_encoder), pipe.text_encoder))
        pipe.vae = _HFVae(like(diffusers_vae(pipe.vae), pipe.vae))
        ours = pipe.transformer
        twin = pipe.family.diffusers_transformer(ours, lambda theirs: like(theirs, ours))
        if isinstance(twin, str):  # no diffusers twin: its stages are skipped; free our copy
            pipe.transformer, pipe.no_transformer_reason = None, twin
        else:
            pipe.transformer = twin
        del parts
        gc.collect()
        return pipe
    raise InputError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}.")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (_Skip, LdmRtError)):
        return str(exc)
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"failed: {type(exc).__name__}: {(lines[0] if lines else '')[:300]}"


NO_TEXT_ENCODER = "class-conditional model: no text encoder (class labels index a table)"


@torch.no_grad()
def stage_calls(pipe, px: int, settings: BenchSettings) -> dict[str, Callable[[], object] | str]:
    """stage -> a zero-argument call, or the reason the stage does not apply."""
    b, device, family = settings.batch, pipe.device, pipe.family
    g = torch.Generator("cpu").manual_seed(settings.seed)
    noise = torch.randn(pipe.latent_shape(b, px, px), generator=g).to(device)  # (B, C, h, w) fp32
    latents = family.pack(pipe.config, noise)  # the transformer's layout
    # denoise_step: step 0 of the pipeline's loop, through the backend's run_step (a CUDA graph on triton)
    scheduler = family.scheduler(pipe.scheduler, settings.steps, family.image_seq_len(pipe.config, latents))
    calls: dict[str, Callable[[], object] | str] = {}
    vocabulary = pipe.defaults.get("vocabulary")
    prompts = family.sample_prompts(pipe.config, b)
    if vocabulary and all(isinstance(p, str) for p in prompts):
        prompts = [" ".join(vocabulary[:3])] * b  # words the model knows; fits tiny's 32 tokens
    conditioning = family.encode(pipe, family.prepare(pipe, prompts, None, 1, {}), GUIDANCE)  # the CFG batch
    if pipe.text_encoder is None:
        calls["text_encoder"] = NO_TEXT_ENCODER
    else:
        tokens = pipe.tokenizer([""] * b + prompts)
        ids = tokens.input_ids.to(device)  # (2B, M)
        calls["text_encoder"] = lambda: pipe.text_encoder(ids)
    pixels = torch.rand((b, 3, px, px), generator=g)  # [0, 1], what generate's image= takes
    roles = family.condition_inputs(pipe.config) if family.condition_channels(pipe.config) else ()
    images = {}
    for role in roles:  # a model with condition channels: seeded random images for its roles
        images[role] = (torch.rand((b, 1, px, px), generator=g) < 0.5).float() if role == "mask_image" else pixels
    if roles and pipe.transformer is not None:
        condition = family.encode_condition(pipe, {r: x if r == "mask_image" else 2 * x - 1 for r, x in images.items()},
                                            torch.Generator("cpu").manual_seed(settings.seed))
        conditioning = (*conditioning, condition.float().to(device))
    step_fn = pipe.step(scheduler, GUIDANCE) if pipe.transformer is not None else None
    step = lambda: step_fn(latents, 0, *conditioning)  # noqa: E731
    loop = lambda: pipe.denoise(latents, *conditioning, steps=settings.steps, guidance=GUIDANCE)  # noqa: E731
    common = dict(steps=settings.steps, guidance=GUIDANCE, height=px, width=px, seed=settings.seed)
    e2e = lambda: pipe.generate(prompts, **common, **images)  # noqa: E731
    start = {**images, "image": pixels}
    img2img = lambda: pipe.generate(prompts, **common, **start, strength=IMG2IMG_STRENGTH)  # noqa: E731
    if pipe.transformer is None:
        reason = pipe.no_transformer_reason
        calls.update(denoise_step=reason, denoise_loop=reason, end_to_end=reason, img2img=reason)
    else:
        calls.update(denoise_step=step, denoise_loop=loop, end_to_end=e2e, img2img=img2img)
        if roles and "image" not in roles:
            calls["img2img"] = "this model is conditioned without a start image (no image role): no image-to-image"
    calls["vae_encode"] = lambda: pipe.encode(2 * pixels - 1, torch.Generator("cpu").manual_seed(settings.seed))
    calls["vae_decode"] = lambda: pipe.decode(noise)
    return {stage: calls[stage] for stage in STAGES}


# ----------------------------------------------------------------------------------- the run


@dataclass
class Run:
    backend: str
    dtype: str
    resolution: int
    status: str = "ok"  # ok | skipped
    reason: str | None = None
    stages: dict[str, dict] = field(default_factory=dict)  # stage -> stats, or {"skipped": reason}
    one_time: dict[str, Any] = field(default_factory=dict)
    peak_memory_mib: float | None = None
    speedup: dict[str, dict[str, float]] = field(default_factory=dict)
    noisy: dict[str, list[str]] = field(default_factory=dict)  # vs -> stages whose ratio the spread makes meaningless


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_backend(backend: str, dtype: str, components, device: torch.device, settings: BenchSettings,
                  progress=None) -> list[Run]:
    """Every resolution of one (backend, dtype); never raises for a backend's own failure."""
    runs = [Run(backend, dtype, px) for px in settings.resolutions]
    _reset_memory(device)
    try:
        start = time.perf_counter()
        pipe = make_pipeline(backend, components, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        load_s = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - recorded as the skip reason, never fatal
        for run in runs:
            run.status, run.reason = "skipped", _reason(exc)
        if progress is not None:
            progress.update(len(runs))
        return runs
    for run in runs:
        run.one_time = {"load_s": load_s, "first_call_ms": {}}
        _reset_memory(device)
        try:
            calls = stage_calls(pipe, run.resolution, settings)
        except Exception as exc:  # noqa: BLE001
            run.status, run.reason = "skipped", _reason(exc)
            calls = {}
        for stage, call in calls.items():
            if isinstance(call, str):
                run.stages[stage] = {"skipped": call}
                continue
            iters = settings.loop_iters if stage in LONG_STAGES else settings.iters
            warmup = min(settings.warmup, 1) if stage in LONG_STAGES else settings.warmup
            try:
                with torch.no_grad():
                    first, stats = measure_stage(call, device, warmup, iters)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at 512 px: the other stages count
                run.stages[stage] = {"skipped": _reason(exc)}
                if os.environ.get("LDM_RT_BENCH_TRACEBACK"):
                    traceback.print_exc()
                continue
            run.stages[stage] = stats
            run.one_time["first_call_ms"][stage] = first
        if device.type == "cuda":
            run.peak_memory_mib = torch.cuda.max_memory_allocated(device) / 2**20
        if progress is not None:
            progress.update(1)
    del pipe
    _reset_memory(device)
    return runs


def add_speedups(runs: list[Run]) -> None:
    """speedup[vs][stage] = baseline median / this median, same dtype and resolution, this run."""
    def median(run, stage):
        s = run.stages.get(stage, {})
        return s.get("median_ms")

    def spread(run, stage):
        return run.stages.get(stage, {}).get("spread", 0.0)

    by_key = {(r.backend, r.dtype, r.resolution): r for r in runs if r.status == "ok"}
    for run in runs:
        if run.status != "ok":
            continue
        eager = by_key.get((BASELINE, run.dtype, run.resolution))
        compiled = [r for (b, d, px), r in by_key.items() if b.startswith("compile") and (d, px) == (run.dtype,
                                                                                                   run.resolution)]
        for stage in STAGES:
            mine = median(run, stage)
            if not mine:
                continue
            if eager and median(eager, stage):
                run.speedup.setdefault("vs_torch_eager", {})[stage] = median(eager, stage) / mine
                if max(spread(run, stage), spread(eager, stage)) > NOISY_SPREAD:
                    run.noisy.setdefault("vs_torch_eager", []).append(stage)
            best = [r for r in compiled if median(r, stage)]
            if best:
                fastest = min(best, key=lambda r: median(r, stage))
                run.speedup.setdefault("vs_best_compile", {})[stage] = median(fastest, stage) / mine
                if max(spread(run, stage), spread(fastest, stage)) > NOISY_SPREAD:
                    run.noisy.setdefault("vs_best_compile", []).append(stage)


def run_bench(components, settings: BenchSettings, device: torch.device, progress: bool = True) -> list[Run]:
    from tqdm.auto import tqdm

    total = len(settings.dtypes) * len(settings.backends) * len(settings.resolutions)
    runs: list[Run] = []
    with tqdm(total=total, desc="bench", unit="config", disable=not progress, leave=False) as bar:
        for dtype in settings.dtypes:
            for backend in settings.backends:
                bar.set_postfix_str(f"{backend} {dtype}")
                runs.extend(bench_backend(backend, dtype, components, device, settings, bar))
    add_speedups(runs)
    return runs


def model_summary(components, description: str) -> dict[str, Any]:
    c = components.config
    dit = c.transformer
    shape_keys = ("depth", "hidden_size", "num_heads", "num_layers", "num_single_layers", "num_attention_heads",
                  "attention_head_dim", "patch_size", "in_channels")  # DiT's, then FLUX.1's
    return {
        "source": description, "class_conditional": getattr(dit, "class_conditional", False),
        "dit": {k: getattr(dit, k) for k in shape_keys if hasattr(dit, k)},
        "text_encoder": None if c.text_encoder is None else {"hidden_size": c.text_encoder.hidden_size,
                                                             "layers": c.text_encoder.num_hidden_layers},
        "vae": {"scale_factor": c.vae.scale_factor, "block_out_channels": list(c.vae.block_out_channels),
                "force_upcast": c.vae.force_upcast},
        "parameters_millions": {name: sum(p.numel() for p in m.parameters()) / 1e6
                                for name, m in components.modules().items()},
    }


def results_dict(runs: list[Run], settings: BenchSettings, device: torch.device, model: dict, command: str) -> dict:
    info = device_info(device)
    return {
        "schema": SCHEMA, "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "device": info, "versions": versions(), "model": model,
        "settings": {**asdict(settings), "dit_batch": 2 * settings.batch, "guidance": GUIDANCE,
                     "baseline": BASELINE},
        "stages": {
            "text_encoder": "text encoder on token ids, batch 2 x images (CFG)",
            "denoise_step": "one whole CFG step: the DiT on [uncond; cond] batched (2 x images), guidance, scheduler update",
            "denoise_loop": "the full denoising loop (steps DiT calls + scheduler), loop_iters timed calls",
            "vae_decode": "latent scaling + VAE decoder, batch = images",
            "end_to_end": "Pipeline.generate: tokenize, encode, denoise, decode, to PIL; loop_iters timed calls",
        },
        "notes": [
            "median_ms / p90_ms over the timed calls; one_time.first_call_ms is the first call of each stage "
            "(compile, autotune, CUDA-graph capture, lazy init), one_time.load_s the backend's construction "
            "(weights to device, ONNX export, engine build)",
            "speedup.vs_torch_eager = torch eager median / this median, same dtype and resolution, same run",
            f"noisy[vs] = stages whose ratio is not meaningful: (p90 - p10) / median above {NOISY_SPREAD} in the "
            "row or its baseline",
            "peak_memory_mib: torch.cuda.max_memory_allocated over the run's stages (torch's allocator only: "
            "onnxruntime's and TensorRT's own allocations are not counted); null on the CPU",
        ],
        "runs": [asdict(r) for r in runs],
    }


# ----------------------------------------------------------------------------------- output


def format_table(results: dict) -> list[str]:
    s = results["settings"]
    lines = [
        f"ldm-rt bench: {results['model']['source']} on {device_label(results['device'])}; "
        f"batch {s['batch']} image(s) (DiT batch {s['dit_batch']} with CFG), {s['steps']} steps; "
        f"{'CUDA events' if results['device']['type'] == 'cuda' else 'wall clock'}",
        f"{'px':>5} {'dtype':<5} {'backend':<21} {'stage':<13} {'median ms':>11} {'p10 ms':>11} {'p90 ms':>11} "
        f"{'vs torch':>9} {'first call ms':>14}",
    ]
    flagged = False
    for run in results["runs"]:
        head = f"{run['resolution']:>5} {run['dtype']:<5} {run['backend']:<21}"
        if run["status"] != "ok":
            lines.append(f"{head} skipped: {run['reason']}")
            continue
        for stage, stats in run["stages"].items():
            if "skipped" in stats:
                lines.append(f"{head} {stage:<13} skipped: {stats['skipped']}")
                continue
            ratio = run["speedup"].get("vs_torch_eager", {}).get(stage)
            noisy = stage in run.get("noisy", {}).get("vs_torch_eager", [])
            flagged |= noisy
            first = run["one_time"]["first_call_ms"].get(stage)
            shown = "" if ratio is None else f"{ratio:.2f}x" + ("?" if noisy else "")
            lines.append(f"{head} {stage:<13} {stats['median_ms']:>11.3f} {stats.get('p10_ms', float('nan')):>11.3f} "
                         f"{stats['p90_ms']:>11.3f} {shown:>9} {first:>14.1f}")
        extra = f"load {run['one_time']['load_s']:.2f} s"
        if run["peak_memory_mib"] is not None:
            extra += f", peak GPU memory {run['peak_memory_mib']:.0f} MiB"
        lines.append(f"{head} {extra}")
    if flagged:
        lines.append(f"?: (p90 - p10) / median above {NOISY_SPREAD:.0%} in this row or its baseline: the ratio is "
                     "not meaningful; rerun with more --iters / --loop-iters or on a quieter machine.")
    return lines


def write_chart(results: dict, path: Path) -> Path:
    """Per-stage bars (median ms, log scale) per backend, one panel per (resolution, dtype), each
    bar labelled with its speed-up over torch eager. Needs matplotlib (the `bench` extra)."""
    from ldm_rt.errors import require

    matplotlib = require("matplotlib", "bench", "the benchmark chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import textwrap

    runs = results["runs"]
    panels = list(dict.fromkeys((r["resolution"], r["dtype"]) for r in runs))
    backends = list(dict.fromkeys(r["backend"] for r in runs))
    colors = plt.get_cmap("tab10")  # one colour per backend across panels
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(9.0, 1.9 * len(STAGES) + 0.4 * len(backends)),
                                                      4.6 * len(panels) + 0.8), squeeze=False)
    for ax, (px, dtype) in zip(axes[:, 0], panels):
        panel = [r for r in runs if (r["resolution"], r["dtype"]) == (px, dtype)]
        shown = [r for r in panel if r["status"] == "ok" and any("median_ms" in v for v in r["stages"].values())]
        width = 0.8 / max(1, len(shown))
        for j, run in enumerate(shown):
            xs, ys, labels = [], [], []
            for i, stage in enumerate(STAGES):
                stats = run["stages"].get(stage, {})
                if "median_ms" in stats:
                    xs.append(i + (j - (len(shown) - 1) / 2) * width)
                    ys.append(stats["median_ms"])
                    ratio = run["speedup"].get("vs_torch_eager", {}).get(stage)
                    labels.append("" if ratio is None else f"{ratio:.2f}x")
            bars = ax.bar(xs, ys, width, label=run["backend"], color=colors(backends.index(run["backend"]) % 10))
            ax.bar_label(bars, labels=labels, fontsize=7, rotation=90, padding=2)
        ax.set_yscale("log")
        ax.set_xticks(range(len(STAGES)), [s.replace("_", " ") for s in STAGES])
        ax.set_ylabel("median ms (log)")
        ax.set_title(f"{px} px, {dtype}", fontsize=10)
        ax.margins(y=0.3)
        if shown:
            ax.legend(fontsize=8, ncols=min(len(shown), 4), loc="upper left")
        notes = [f"{r['backend']} skipped: {r['reason']}" for r in panel if r["status"] != "ok"]
        for r in shown:  # skipped stages, one line per backend and reason
            grouped: dict[str, list[str]] = {}
            for stage, v in r["stages"].items():
                if "skipped" in v:
                    grouped.setdefault(v["skipped"], []).append(stage)
            notes += [f"{r['backend']} {', '.join(stages)}: {why}" for why, stages in grouped.items()]
        if notes:
            text = "\n".join(textwrap.shorten(n, 170, placeholder="...") for n in notes)
            ax.text(0.0, -0.12, text, transform=ax.transAxes, fontsize=6.5, va="top")
    s = results["settings"]
    fig.suptitle(f"ldm-rt bench on {device_label(results['device'])} - {results['model']['source']}\n"
                 f"batch {s['batch']} (DiT {s['dit_batch']}), {s['steps']} steps; labels: speed-up vs torch eager",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench(model_dir: Path | None, preset: str | None, out: Path, backends: str | None = None,
          resolutions: str | None = None, batch: int = 1, dtype: str | None = None, steps: int | None = None,
          warmup: int = 3, iters: int = 20, loop_iters: int | None = None, device: str | None = None,
          max_autotune: bool = False, seed: int = 0, command: str = "", progress: bool = True) -> dict:
    """The whole `ldm-rt bench`: checks every argument before any timing, runs, writes results.json
    and the chart into `out`. Returns the results dict plus `chart` (path, or the reason there is none)."""
    from ldm_rt.pipeline import DEFAULT_STEPS, resolve_device

    check_counts(batch, 1 if steps is None else steps, warmup, iters, loop_iters)
    if model_dir is not None and preset is not None:
        raise InputError("--model-dir and --preset exclude each other; pass one.")
    names = parse_backends(backends, max_autotune)
    dev = resolve_device(device)
    dtypes = parse_dtypes(dtype, dev)
    out = writable_dir(out)
    components, description = load_components(model_dir, preset, seed)
    px = parse_resolutions(resolutions, components.config)
    settings = BenchSettings(
        backends=names, resolutions=px, dtypes=dtypes, batch=batch,
        steps=steps if steps is not None else int(components.defaults.get("steps", DEFAULT_STEPS)),
        warmup=warmup, iters=iters, loop_iters=loop_iters if loop_iters is not None else min(iters, 5), seed=seed,
    )
    runs = run_bench(components, settings, dev, progress=progress)
    results = results_dict(runs, settings, dev, model_summary(components, description), command)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    try:
        chart: str = str(write_chart(results, out / CHART_FILE))
    except MissingDependencyError as exc:
        chart = f"no chart: {exc}"
    return {**results, "chart": chart, "out": str(out)}
