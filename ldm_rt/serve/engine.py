"""The model side of the service: checks a request, runs a batch of compatible requests as one
`Pipeline.generate` call, and encodes PNGs. Everything here is synchronous and runs on the
service's single model thread (see `batcher`), never on the event loop, except `check`.

Images equal `ldm-rt run`'s: a request alone in its batch is exactly `run`'s call (same bytes);
in a batch, each request's noise is drawn from its own seed (`seeded_latents`) and concatenated,
so only the batched matmuls/convolutions can differ, in the last bit of fp32: measured on the
demo model (CPU, fp32), at most 1 of 255 in a few pixels (see README `serve`).
"""

from __future__ import annotations

import io
import logging
import re
import time
from dataclasses import dataclass, field

from ldm_rt.errors import InputError, LdmRtError

log = logging.getLogger("ldm_rt.serve")

MAX_N = 10  # images per request, as OpenAI's images API
MAX_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class ImageRequest:
    """One checked request, all defaults resolved (so that equal settings batch together)."""

    prompt: str
    n: int
    height: int
    width: int
    seed: int
    steps: int
    guidance: float
    negative_prompt: str | None

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one denoising loop: same latent shape, same
        schedule, same guidance. Without CFG (g <= 1) the guidance value and the negative prompt
        play no part; with CFG each row carries its own negative prompt, so those mix freely."""
        return (self.height, self.width, self.steps, self.guidance if self.guidance > 1.0 else "no-cfg")


@dataclass
class Outcome:
    """What the model thread answers for one request: PNGs, or an error and its HTTP status."""

    pngs: list[bytes] = field(default_factory=list)
    error: str | None = None
    status: int = 200
    batch_images: int = 0  # images in the generate call that drew these (set by the batcher)


@dataclass
class BatchReport:
    outcomes: list[Outcome]
    images: int  # images in the batched call
    timings: dict[str, float]  # seconds per stage of the batched call


def parse_size(size: str) -> tuple[int, int]:
    """'WxH' -> (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", size)
    if not m:
        raise InputError(f"size {size!r} must be WIDTHxHEIGHT in pixels, e.g. '128x128'.")
    return int(m.group(1)), int(m.group(2))


def encode_png(image, info=None) -> bytes:
    """The bytes `ldm-rt run` writes: PIL's PNG defaults and, given `info`, the same recipe chunks
    (`ldm_rt.png_info`)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


class Engine:
    """Owns the Pipeline. `load` and `warm_up` run once before the service is ready."""

    def __init__(self, model_dir=None, backend: str = "torch", device=None, dtype=None):
        self.model_dir, self.backend, self.device, self.dtype = model_dir, backend, device, dtype
        self.pipe = None

    def load(self) -> None:
        from ldm_rt.model_dir import default_model_dir
        from ldm_rt.pipeline import Pipeline

        start = time.perf_counter()
        self.pipe = Pipeline.from_pretrained(self.model_dir or default_model_dir(), backend=self.backend,
                                             device=self.device, dtype=self.dtype)
        log.info("model %s loaded (backend %s, %s %s) in %.2f s", self.model_dir or "built-in demo", self.backend,
                 self.pipe.device, self.pipe.precision.value, time.perf_counter() - start)

    def warm_up(self) -> None:
        """One image at the default size and steps (first calls allocate, compile, capture)."""
        start = time.perf_counter()
        vocabulary = self.pipe.defaults.get("vocabulary")  # a word the model knows: no warning
        prompt = "0" if getattr(self.pipe.config.transformer, "class_conditional", False) else (vocabulary[0] if vocabulary else "a")
        self.pipe.generate(prompt, seed=0)
        log.info("warm-up in %.2f s", time.perf_counter() - start)

    # -- checks (cheap, on the event loop) --------------------------------------------------------

    def check(self, prompt, n=1, size=None, seed=None, steps=None, guidance=None, negative_prompt=None) -> ImageRequest:
        """The pipeline's own checks (InputError with one sentence), before the request is queued,
        so that one bad request never fails the batch it would have joined."""
        from ldm_rt.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS
        from ldm_rt.seeds import resolve_seed

        pipe = self.pipe
        defaults = pipe.defaults
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt must be a non-empty string.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted.")
        if not 1 <= n <= MAX_N:
            raise InputError(f"n must be between 1 and {MAX_N}, got {n}.")
        if size is None:
            width = defaults.get("width", pipe.default_size)
            height = defaults.get("height", pipe.default_size)
        else:
            width, height = parse_size(size)
        pipe.latent_shape(n, height, width)  # InputError on a size the VAE/patch grid cannot take
        steps = defaults.get("steps", DEFAULT_STEPS) if steps is None else steps
        guidance = float(defaults.get("guidance", DEFAULT_GUIDANCE) if guidance is None else guidance)
        if int(steps) != steps or steps < 1:
            raise InputError(f"steps must be a whole number >= 1, got {steps}.")
        if not guidance >= 0 or guidance == float("inf"):
            raise InputError(f"guidance must be a finite number >= 0, got {guidance}.")
        if getattr(pipe.config.transformer, "class_conditional", False):
            from ldm_rt.imagenet import class_index

            class_index(prompt, pipe.config.transformer.num_classes)
            if negative_prompt:
                raise InputError("a class-conditional model takes no negative prompt: guidance steers away from "
                                 "the null class.")
        seed = resolve_seed(seed)  # 0..2**64-1; none given: a fresh one, as `run` without --seed
        pipe.family.check_size(pipe.config, n, height, width, guidance, pipe.device)  # the limit `run` applies
        return ImageRequest(prompt, n, height, width, seed, int(steps), guidance, negative_prompt or None)

    # -- generation (the model thread) ------------------------------------------------------------

    def run_batch(self, requests: list[ImageRequest]) -> BatchReport:
        """One `generate` call for requests that share a `batch_key`. If it fails, each request
        runs alone, so that the error lands on the request that caused it."""
        try:
            images, timings = self._generate(requests)
        except Exception as exc:  # noqa: BLE001 - a failed request must never take the server down
            if len(requests) == 1:
                return BatchReport([_failure(exc)], requests[0].n, {})
            log.warning("batch of %d requests failed (%s); running them one by one", len(requests), exc)
            outcomes = [self.run_batch([r]).outcomes[0] for r in requests]
            return BatchReport(outcomes, sum(r.n for r in requests), {})
        outcomes, i = [], 0
        for r in requests:
            outcomes.append(Outcome(pngs=[encode_png(im, self._png_info(r, k, im)) for k, im in
                                          enumerate(images[i:i + r.n])]))
            i += r.n
        return BatchReport(outcomes, i, timings)

    def _png_info(self, request: ImageRequest, index: int, image):
        """The recipe chunks `ldm-rt run` writes for the same call (model and backend as served)."""
        from ldm_rt.png_info import png_info

        return png_info(prompt=request.prompt, negative_prompt=request.negative_prompt or "", seed=request.seed,
                        steps=request.steps, guidance=request.guidance, height=image.height, width=image.width,
                        model=str(self.model_dir or "built-in demo"), backend=self.backend,
                        batch=(index, request.n) if request.n > 1 else None)

    def _generate(self, requests: list[ImageRequest]):
        import torch

        from ldm_rt.pipeline import seeded_latents

        pipe, first = self.pipe, requests[0]
        common = dict(steps=first.steps, guidance=first.guidance, height=first.height, width=first.width)
        if len(requests) == 1:  # exactly `ldm-rt run`'s call
            result = pipe.generate(first.prompt, negative_prompt=first.negative_prompt, seed=first.seed,
                                   num_images=first.n, **common)
            return result.images, result.timings
        # Each prompt repeated n times, as generate does with num_images; each request's noise
        # drawn from its own seed, as its unbatched call would draw it.
        prompts = [r.prompt for r in requests for _ in range(r.n)]
        negatives = [r.negative_prompt or "" for r in requests for _ in range(r.n)]
        latents = torch.cat([seeded_latents(pipe.latent_shape(r.n, r.height, r.width), r.seed) for r in requests])
        result = pipe.generate(prompts, negative_prompt=negatives if any(negatives) else None, latents=latents,
                               **common)
        return result.images, result.timings


def _failure(exc: Exception) -> Outcome:
    from ldm_rt.errors import NonFiniteError

    if isinstance(exc, NonFiniteError):  # names the stage: "denoising produced NaN or Inf values."
        return Outcome(error=str(exc), status=500)
    if isinstance(exc, LdmRtError):
        return Outcome(error=str(exc), status=400)
    log.exception("generation failed", exc_info=exc)
    return Outcome(error=f"generation failed: {type(exc).__name__}: {exc}", status=500)
