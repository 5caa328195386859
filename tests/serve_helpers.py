"""A real `ldm-rt serve` on 127.0.0.1 for the tests: start, wait for /readyz, talk HTTP, stop.
Every wait is bounded; only loopback addresses."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`python -m ldm_rt.cli serve ARGS` on a free port, one torch thread (the cores are shared)."""

    def __init__(self, *args: str, ready_timeout: float = 120.0, log_path=None):
        self.port = free_port()
        # PYTHONSAFEPATH: the repo root's kernels/ and export/ must not shadow packages (see conftest.py)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1")
        self.log = open(log_path, "w+b") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "ldm_rt.cli", "serve", "--host", HOST, "--port",
                                      str(self.port), *args], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if get(self.port, "/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready in {ready_timeout} s: {self.output()}")

    def output(self) -> str:
        if self.log is subprocess.DEVNULL:
            return ""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def request(port: int, method: str, path: str, body=None, timeout: float = 60.0, raw: bytes | None = None):
    """-> (status, headers dict (lower-case names), body: parsed JSON or text)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"content-type": "application/json"} if data else {})
        resp = conn.getresponse()
        text = resp.read().decode()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        if headers.get("content-type", "").startswith("application/json"):
            return resp.status, headers, json.loads(text)
        return resp.status, headers, text
    finally:
        conn.close()


def get(port, path, timeout=10.0):
    return request(port, "GET", path, timeout=timeout)


def generate(port, timeout=60.0, **body):
    return request(port, "POST", "/v1/images/generations", body, timeout=timeout)


def concurrently(fn, calls: list[dict], timeout: float = 120.0) -> list:
    """fn(**kwargs) for each kwargs at once, on threads; results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(fn, **kw) for kw in calls]
        return [f.result(timeout=timeout) for f in futures]


def pngs(answer) -> list[bytes]:
    return [base64.b64decode(d["b64_json"]) for d in answer["data"]]


def png_array(data: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def metric(port, name: str, labels: str = "") -> float:
    """The value of one sample in /metrics (0 when absent)."""
    text = get(port, "/metrics")[2]
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    m = re.search(r"^" + pattern + "$", text, re.M)
    return float(m.group(1)) if m else 0.0
