"""`ldm-rt serve --ray`: a local Ray instance (no GPU), 2 replicas of the tiny model behind Ray
Serve's proxy on 127.0.0.1. One server for the module: starting Ray and two replicas is the cost."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")

from serve_helpers import Server, concurrently, generate, get, pngs  # noqa: E402

pytestmark = pytest.mark.slow


def _pid(replica: str) -> int:
    return int(replica.rsplit("-", 1)[1])


@pytest.fixture(scope="module")
def ray_server(tiny_model_dir, tmp_path_factory):
    os.environ.pop("RAY_ADDRESS", None)
    srv = Server("--ray", "--replicas", "2", "--cpus-per-replica", "0.5", "--model-dir", str(tiny_model_dir),
                 "--max-wait-ms", "50", ready_timeout=240,
                 log_path=tmp_path_factory.mktemp("serve-ray") / "server.log")
    srv.replicas = set()
    deadline = time.monotonic() + 120
    while len(srv.replicas) < 2 and time.monotonic() < deadline:  # both replicas up
        status, headers, _ = get(srv.port, "/readyz")
        if status == 200:
            srv.replicas.add(headers["x-ldm-rt-replica"])
        time.sleep(0.05)
    yield srv
    srv.stop(timeout=120)


def test_requests_spread_over_both_replicas(ray_server):
    answers = concurrently(lambda **kw: generate(ray_server.port, **kw),
                           [dict(prompt="a red circle", seed=i, steps=20) for i in range(12)])
    assert [a[0] for a in answers] == [200] * 12
    assert len({a[1]["x-ldm-rt-replica"] for a in answers}) == 2
    assert all(len(pngs(a[2])) == 1 for a in answers)


def test_a_killed_replica_loses_no_request_silently(ray_server):
    def call(seed):
        try:
            status, headers, _ = generate(ray_server.port, prompt="a red circle", seed=seed, steps=1500, timeout=180)
            return status, headers.get("x-ldm-rt-replica"), time.monotonic()
        except OSError as exc:  # a connection closed without an answer: lost
            return exc, None, time.monotonic()

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(call, seed) for seed in range(12)]
        time.sleep(1.5)  # under load: both replicas hold a batch of 3, several seconds each
        victim = sorted(ray_server.replicas)[0]
        os.kill(_pid(victim), signal.SIGKILL)
        killed = time.monotonic()
        results = [f.result(timeout=240) for f in futures]
    statuses = [r[0] for r in results]
    print("statuses after the kill:", statuses)
    assert all(isinstance(s, int) for s in statuses), statuses  # every request got an answer
    assert set(statuses) <= {200, 500, 502, 503} and 200 in statuses
    assert statuses.count(200) < 12  # the kill hit requests in flight (else this test tests nothing)
    assert all(t < killed for _, replica, t in results if replica == victim)  # no answer from the dead
    deadline = time.monotonic() + 60
    while generate(ray_server.port, prompt="a red circle", steps=2, timeout=60)[0] != 200:  # serving on
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_sigterm_stops_ray_serve(ray_server):
    assert ray_server.stop(timeout=120) == 0
    with pytest.raises(OSError):
        get(ray_server.port, "/healthz", timeout=2)
