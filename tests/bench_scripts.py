"""Shared test helper: import a script of bench/ by path (bench/ is not a package, and is kept off
sys.path: its scripts are run as `python bench/NAME.py`)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_script(name: str):
    """bench/<name>.py as a module, under a private name (`bench_<name>`) so nothing shadows it."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
