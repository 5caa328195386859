"""Dynamic batching on the event loop; the model runs on one worker thread.

A request waits in a bounded queue. The batcher takes the oldest request and every later one
with the same `batch_key`, up to `max_batch` images, waiting at most `max_wait` seconds from the
oldest one's arrival for more to come (while the model is busy, requests pile up and the next
batch leaves at once). Requests of another shape wait for their own batch: shapes never mix.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s.")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass(eq=False)
class Job:
    request: object  # engine.ImageRequest
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    started: bool = False


class Batcher:
    def __init__(self, run_batch, max_batch: int, max_wait_s: float, max_queue: int, metrics):
        self.run_batch = run_batch  # list of requests -> engine.BatchReport, on the model thread
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.metrics = metrics
        self.pending: list[Job] = []
        self.closing = False
        self.batch_seconds = None  # running mean of one batch's wall time, for Retry-After
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ldm-rt-model")
        self._wakeup = asyncio.Event()
        self._task = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="ldm-rt-batcher")

    async def run_in_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def submit(self, request) -> Job:
        """Queue a checked request; QueueFull when `max_queue` requests already wait."""
        if self.closing:
            raise ShuttingDown()
        if len(self.pending) >= self.max_queue:
            raise QueueFull(self.retry_after())
        job = Job(request, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self.metrics.queue_depth.set(len(self.pending))
        self._wakeup.set()
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not started (its client went away); True if it was dropped."""
        if job.started or job not in self.pending:
            return False
        self.pending.remove(job)
        self.metrics.queue_depth.set(len(self.pending))
        self.metrics.dropped.inc()
        if not job.future.done():
            job.future.cancel()
        self._wakeup.set()
        return True

    def retry_after(self) -> int:
        """Seconds until the queue has room: the batches ahead of a new request times a batch's time."""
        per_batch = self.batch_seconds or 1.0
        return max(1, math.ceil(per_batch * (len(self.pending) / self.max_batch + 1)))

    async def drain(self) -> None:
        """Stop taking requests, finish every accepted one, stop the model thread."""
        self.closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self.executor.shutdown(wait=True)

    # -- the loop ------------------------------------------------------------------------------

    def _take(self, head: Job) -> list[Job]:
        key, batch, images = head.request.batch_key, [head], head.request.n
        for job in self.pending[1:]:
            if job.request.batch_key == key and images + job.request.n <= self.max_batch:
                batch.append(job)
                images += job.request.n
        return batch

    async def _wait(self, timeout: float | None) -> None:
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _loop(self) -> None:
        while True:
            if not self.pending:
                if self.closing:
                    return
                await self._wait(None)
                continue
            head = self.pending[0]
            batch = self._take(head)
            left = head.arrived + self.max_wait_s - time.monotonic()
            if sum(j.request.n for j in batch) < self.max_batch and left > 0 and not self.closing:
                await self._wait(left)  # more may come (or the head may be cancelled): look again
                continue
            for job in batch:
                self.pending.remove(job)
                job.started = True
                self.metrics.queue_wait.observe(time.monotonic() - job.arrived)
            self.metrics.queue_depth.set(len(self.pending))
            await self._run(batch)

    async def _run(self, batch: list[Job]) -> None:
        m = self.metrics
        start = time.perf_counter()
        m.running.set(1)
        try:
            report = await self.run_in_model_thread(self.run_batch, [j.request for j in batch])
        except Exception as exc:  # noqa: BLE001 - run_batch answers errors itself; this is a last resort
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            m.running.set(0)
        seconds = time.perf_counter() - start
        self.batch_seconds = seconds if self.batch_seconds is None else 0.7 * self.batch_seconds + 0.3 * seconds
        m.batch_images.observe(report.images)
        m.batch_requests.observe(len(batch))
        for stage, s in report.timings.items():
            m.stage.labels(stage).observe(s)
        for job, outcome in zip(batch, report.outcomes):
            m.images.inc(len(outcome.pngs))
            outcome.batch_images = report.images
            if not job.future.done():
                job.future.set_result(outcome)
