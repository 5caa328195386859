"""`ldm-rt serve`: an HTTP image-generation service (OpenAI images API shape) with dynamic
batching and backpressure, on FastAPI + uvicorn (extra `serve`), scaling out as a Ray Serve
deployment (extra `ray`).

- `engine`: the model side (sync, one worker thread): request checks, batched generation, PNGs.
- `batcher`: the asyncio side: a bounded queue that groups compatible requests into one batch.
- `metrics`: Prometheus counters and histograms, one registry per app.
- `app`: the FastAPI app and the uvicorn runner.
- `ray_serve`: the same app as a Ray Serve deployment.
"""
