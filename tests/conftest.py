import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# `python -m pytest` puts the working directory on sys.path. At the repository root that makes the
# source folders kernels/ and export/ (installed as ldm_rt.kernels and ldm_rt.export) importable as
# top-level `kernels` and `export`, shadowing PyPI packages of those names: transformers (5.25)
# depends on Hugging Face's `kernels` and imports it while diffusers loads, and would get ours.
# ldm_rt itself comes from the installed (editable) package, so the root is not needed.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT]

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton reads this variable
# when a kernel is defined (`@triton.jit`, at the import of kernels/<op>.py, which ldm_rt.kernels
# defers to the first kernel call), so it must be set before any test runs a kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests skip themselves on machines without CUDA, so a plain `pytest` passes anywhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete `tiny` model directory with seeded random weights (read-only: copy to modify)."""
    from ldm_rt.model_dir import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (exports and onnxruntime runs of tiny models gain
    nothing from threads, and OpenMP's spinning threads slow down when the 2 cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ReplayingStepRunner:
    """A `Runtime.run_step` that behaves as CUDA-graph replay does, on the CPU.

    The first call with a (key, input signature) fixes the step function; every later call with
    the same pair runs *that first function* on the new tensors, as a graph replays the kernels
    it captured on refilled input buffers. So a pipeline that baked anything into its step
    function that the key and the tensors do not carry (a number of one schedule, the guidance
    scale, a dtype) draws a wrong image here, as it would on the GPU.
    """

    def __init__(self):
        self.captured = {}

    def __call__(self, key, step, *tensors):
        signature = tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else ("V", t) for t in tensors)
        return self.captured.setdefault((key, signature), step)(*tensors)


@pytest.fixture
def replaying_runner():
    return ReplayingStepRunner()
