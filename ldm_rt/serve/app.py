"""The FastAPI app and its uvicorn runner.

API (the shape of OpenAI's images API, plus ldm-rt's sampling settings):
- `POST /v1/images/generations` {prompt, n, size "WxH", response_format "b64_json", seed, steps,
  guidance, negative_prompt} -> {created, seed, data: [{b64_json}]}; 400 with one sentence on bad
  input, 429 + Retry-After when the queue is full, 503 while loading or shutting down, 500 naming
  the stage on NaN/Inf.
- `GET /healthz` (the process answers), `GET /readyz` (model loaded and warmed up, not
  draining), `GET /metrics` (Prometheus text).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from ldm_rt.errors import InputError
from ldm_rt.serve.batcher import Batcher, QueueFull, ShuttingDown
from ldm_rt.serve.engine import Engine
from ldm_rt.serve.metrics import CONTENT_TYPE_LATEST, Metrics

log = logging.getLogger("ldm_rt.serve")

DISCONNECT_POLL_S = 0.05


@dataclass(frozen=True)
class Settings:
    model_dir: Path | None = None
    backend: str = "torch"
    device: str | None = None
    dtype: str | None = None
    max_batch: int = 4
    max_wait_ms: float = 20.0
    max_queue: int = 64
    warm_up: bool = True

    def check(self) -> None:
        if self.max_batch < 1:
            raise InputError(f"--max-batch must be >= 1, got {self.max_batch}.")
        if self.max_wait_ms < 0:
            raise InputError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}.")
        if self.max_queue < 1:
            raise InputError(f"--max-queue must be >= 1, got {self.max_queue}.")


class GenerationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    model: str | None = None  # accepted, as OpenAI clients send it; the server serves one model
    user: str | None = None


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 429: "rate_limit_error", 503: "unavailable"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def _validation_sentence(exc: RequestValidationError) -> str:
    """FastAPI's list of errors -> one sentence about the first one."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON."
    if loc == ["response_format"]:
        return "response_format must be 'b64_json': this server returns images inline, not as URLs."
    if first.get("type") == "extra_forbidden":
        return f"unknown field {loc[-1]!r}; the fields are {', '.join(GenerationBody.model_fields)}."
    field = ".".join(loc) or "body"
    return f"{field}: {first.get('msg', 'invalid value')}."


class ReplicaHeader:
    """Adds `x-ldm-rt-replica` to every response. A plain ASGI middleware: Starlette's
    BaseHTTPMiddleware wraps `receive` so that `Request.is_disconnected` never sees the client go."""

    def __init__(self, app, replica_id: str):
        self.app, self.header = app, (b"x-ldm-rt-replica", replica_id.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class State:
    def __init__(self, settings: Settings, replica_id: str):
        self.settings = settings
        self.replica_id = replica_id
        self.metrics = Metrics(settings.max_batch)
        self.engine = Engine(settings.model_dir, settings.backend, settings.device, settings.dtype)
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.on_fatal = None  # set by the runner: stop the server when the model cannot load


def create_app(settings: Settings, replica_id: str | None = None, engine: Engine | None = None) -> FastAPI:
    """The app. It loads and warms up the model after it starts (readyz answers 503 until then),
    unless `engine` comes loaded already (a Ray replica loads in its constructor, so that Ray
    routes requests to it only once it can serve them)."""
    settings.check()
    state = State(settings, replica_id or f"{socket.gethostname()}-{os.getpid()}")
    if engine is not None:
        state.engine = engine

    async def load():
        try:
            if state.engine.pipe is None:
                await state.batcher.run_in_model_thread(state.engine.load)
                if settings.warm_up:
                    await state.batcher.run_in_model_thread(state.engine.warm_up)
        except Exception as exc:  # noqa: BLE001 - reported, and the server stops
            state.load_error = str(exc)
            log.error("error: the model did not load: %s", exc)
            if state.on_fatal is not None:
                state.on_fatal()
            return
        state.ready = True
        state.metrics.ready.set(1)
        log.info("ready: max batch %d, max wait %g ms, max queue %d", settings.max_batch, settings.max_wait_ms,
                 settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher = Batcher(state.engine.run_batch, settings.max_batch, settings.max_wait_ms / 1000,
                                settings.max_queue, state.metrics)
        state.batcher.start()
        loading = asyncio.get_running_loop().create_task(load())
        yield
        state.draining = True
        state.metrics.ready.set(0)
        await loading
        await state.batcher.drain()
        log.info("drained: every accepted request was answered")

    app = FastAPI(title="ldm-rt", lifespan=lifespan)
    app.state.ldm = state

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        if request.url.path == "/v1/images/generations":
            state.metrics.requests.labels("400").inc()
        return error(400, _validation_sentence(exc))

    app.add_middleware(ReplicaHeader, replica_id=state.replica_id)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "replica": state.replica_id}

    @app.get("/readyz")
    async def readyz():
        if state.ready and not state.draining:
            return {"status": "ready", "replica": state.replica_id}
        reason = "draining" if state.draining else ("failed: " + state.load_error if state.load_error else "loading")
        return JSONResponse({"status": reason, "replica": state.replica_id}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/images/generations")
    async def generations(body: GenerationBody, request: Request):
        start = time.monotonic()
        response = await _generate(body, request)
        state.metrics.requests.labels(str(response.status_code)).inc()
        state.metrics.latency.observe(time.monotonic() - start)
        return response

    async def _generate(body: GenerationBody, request: Request) -> Response:
        if state.draining:
            return error(503, "the server is shutting down; send the request to another replica.")
        if not state.ready:
            return error(503, "the model is still loading; retry when /readyz answers 200.", {"Retry-After": "5"})
        try:
            checked = state.engine.check(body.prompt, n=body.n, size=body.size, seed=body.seed, steps=body.steps,
                                         guidance=body.guidance, negative_prompt=body.negative_prompt)
        except InputError as exc:
            return error(400, str(exc))
        try:
            job = state.batcher.submit(checked)
        except QueueFull as exc:
            return error(429, str(exc), {"Retry-After": str(exc.retry_after)})
        except ShuttingDown:
            return error(503, "the server is shutting down; send the request to another replica.")
        while True:  # wait for the batch, dropping the job if the client goes away before it runs
            done, _ = await asyncio.wait({job.future}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                dropped = state.batcher.cancel(job)
                log.info("client disconnected; request %s", "dropped before it ran" if dropped else "was running")
                return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        try:
            outcome = job.future.result()
        except Exception as exc:  # noqa: BLE001 - the batcher's last resort
            return error(500, f"generation failed: {exc}")
        if outcome.error is not None:
            return error(outcome.status, outcome.error)
        headers = {"x-ldm-rt-batch-size": str(outcome.batch_images)}
        return JSONResponse({"created": int(time.time()), "seed": checked.seed,
                             "data": [{"b64_json": base64.b64encode(p).decode("ascii")} for p in outcome.pngs]},
                            headers=headers)

    return app


def serve_forever(settings: Settings, host: str = "127.0.0.1", port: int = 8000, drain_timeout_s: float = 120.0,
                  log_level: str = "info") -> None:
    """Run the app on uvicorn until SIGINT/SIGTERM: then stop accepting (readyz 503), answer every
    accepted request, and return. Raises LdmRtError if the model cannot load."""
    import uvicorn

    from ldm_rt.errors import LdmRtError

    app = create_app(settings)
    state: State = app.state.ldm

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True  # new requests get 503 while the accepted ones finish
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once it has shut down, so the process would die of it
            # (exit -15, or a KeyboardInterrupt traceback on Ctrl+C); a drained server exits 0.
            getattr(self, "_captured_signals", []).clear()

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                   timeout_graceful_shutdown=drain_timeout_s))

    def fatal():
        server.should_exit = True

    state.on_fatal = fatal
    server.run()
    if state.load_error is not None:
        raise LdmRtError(f"the model did not load: {state.load_error}")
    log.info("stopped")
