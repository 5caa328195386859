"""`ldm-rt serve --ray`: the same FastAPI app as a Ray Serve deployment, one model per replica.

Each replica loads the model in its constructor (so Ray routes to it only once it can serve) and
runs the app, with its own batcher and queue, behind Ray Serve's HTTP proxy; Ray spreads the
requests over the replicas, restarts a dead one, and scales between the autoscaling bounds.
Every response names its replica in `x-ldm-rt-replica` (`<ray replica id>-<pid>`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

from ray import serve

from ldm_rt.errors import InputError
from ldm_rt.serve.app import Settings, create_app
from ldm_rt.serve.engine import Engine

log = logging.getLogger("ldm_rt.serve")

APP_NAME = "ldm-rt"


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    gpus_per_replica: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_replica: float = 1.0
    min_replicas: int | None = None  # both bounds given: autoscaling instead of `replicas`
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray instance
    drain_timeout_s: float = 120.0

    def autoscaling(self, settings: Settings) -> dict | None:
        bounds = (self.min_replicas, self.max_replicas)
        if bounds == (None, None):
            if self.target_ongoing_requests is not None:
                raise InputError("--target-ongoing-requests needs --min-replicas and --max-replicas.")
            return None
        if None in bounds or not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise InputError(f"autoscaling needs 0 <= --min-replicas <= --max-replicas, >= 1; got {bounds}.")
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or settings.max_batch}

    def check(self, settings: Settings) -> None:
        if self.replicas < 1:
            raise InputError(f"--replicas must be >= 1, got {self.replicas}.")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise InputError(f"--gpus-per-replica must be >= 0, got {self.gpus_per_replica}.")
        self.autoscaling(settings)


@serve.ingress()
class ImageService:
    """One replica: a loaded model and the app around it."""

    def __init__(self, settings: Settings):
        context = serve.get_replica_context()
        self.replica_id = f"{context.replica_id.unique_id}-{os.getpid()}"
        self.settings = settings
        self.engine = Engine(settings.model_dir, settings.backend, settings.device, settings.dtype)
        self.engine.load()
        if settings.warm_up:
            self.engine.warm_up()

    def __serve_build_asgi_app__(self):
        return create_app(self.settings, replica_id=self.replica_id, engine=self.engine)


def build(settings: Settings, options: RayOptions, gpus: float = 0.0):
    """The Ray Serve application (bind it with serve.run)."""
    settings.check()
    options.check(settings)
    autoscaling = options.autoscaling(settings)
    deployment = serve.deployment(
        ImageService,
        name="ImageService",
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": gpus},
        # Our batcher holds the queue: Ray passes a replica what it can take (its queue + a batch)
        # and keeps at most --max-queue more per caller, answering 503 beyond that.
        max_ongoing_requests=settings.max_queue + settings.max_batch,
        max_queued_requests=settings.max_queue,
        graceful_shutdown_timeout_s=options.drain_timeout_s,
        **({"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": options.replicas}),
    )
    return deployment.bind(settings)


def run_ray(settings: Settings, options: RayOptions, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start (or join) Ray, run the deployment behind Ray Serve's proxy on host:port, and block
    until SIGINT/SIGTERM; then delete the app (Ray drains its replicas) and disconnect."""
    import ray

    settings.check()
    options.check(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    joined = bool(options.address or os.environ.get("RAY_ADDRESS"))
    # A local instance keeps all of Ray's own traffic on the loopback interface.
    local = {} if joined else {"_node_ip_address": "127.0.0.1"}
    ray.init(address=options.address, ignore_reinit_error=True, include_dashboard=False, **local)
    gpus = options.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if gpus == 0 and settings.device not in (None, "cpu") and str(settings.device).startswith("cuda"):
        raise InputError("--device cuda needs --gpus-per-replica >= 1 (Ray hides GPUs from a replica without one).")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(settings, options, gpus), name=APP_NAME, route_prefix="/")
        replicas = (f"{options.min_replicas}..{options.max_replicas} (autoscaling)" if options.min_replicas is not None
                    else str(options.replicas))
        log.info("ready: Ray Serve on http://%s:%d, %s replicas, %g GPU each", host, port, replicas, gpus)
        stop.wait()
        log.info("stopping: Ray drains the replicas' accepted requests")
    finally:
        try:
            if joined:
                serve.delete(APP_NAME)  # leave the cluster's Serve instance to its other apps
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    log.info("stopped")
