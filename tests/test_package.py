"""Packaging: kernels/ and export/ install inside ldm_rt, in a wheel and in an editable install;
`ldm-rt run` on the torch backend imports no optional dependency."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ldm_rt.model_dir import DEMO_SR_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = out.glob("ldm_rt-*.whl")
    return path


def test_wheel_has_no_top_level_kernels_or_export(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert "kernels" not in top and "export" not in top, sorted(top)
    assert "ldm_rt/kernels/__init__.py" in names
    assert "ldm_rt/export/__init__.py" in names
    assert "ldm_rt/models/dit.py" in names
    assert "ldm_rt/demo/shapes.py" in names
    # the built-in demo model ships in the wheel; training checkpoints do not
    for part in ("model_index.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert f"ldm_rt/demo/model/{part}" in names, part
        if (DEMO_SR_MODEL_DIR / "model_index.json").is_file():  # the 2x super-resolution demo beside it
            assert f"ldm_rt/demo/sr_model/{part}" in names, part
    assert not [n for n in names if n.startswith("ldm_rt/demo/checkpoints/")]


def test_wheel_holds_every_package_folder(wheel):
    """The package list in pyproject.toml is explicit (kernels/ and export/ are mapped): a new
    folder left out of it would be missing from the wheel while an editable install still works."""
    names = set(zipfile.ZipFile(wheel).namelist())
    folders = [p.parent.relative_to(ROOT) for p in (ROOT / "ldm_rt").rglob("__init__.py")]
    missing = [str(f) for f in folders if f"{f.as_posix()}/__init__.py" not in names]
    assert not missing, missing


def test_wheel_installs_and_imports_the_namespaced_packages(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    code = ("import ldm_rt, ldm_rt.kernels, ldm_rt.export; from ldm_rt.model_dir import default_model_dir; "
            "print(ldm_rt.kernels.__file__); print(default_model_dir())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    kernels_file, model_dir = proc.stdout.strip().splitlines()
    assert kernels_file.startswith(str(target)) and model_dir.startswith(str(target)), proc.stdout


def test_editable_install_maps_kernels_and_export():
    import ldm_rt.export
    import ldm_rt.kernels

    for module, folder in ((ldm_rt.kernels, "kernels"), (ldm_rt.export, "export")):
        path = Path(module.__file__).resolve()
        assert path.parent.name in (folder, module.__name__.split(".")[-1])


def test_run_imports_no_optional_dependency(tiny_model_dir, tmp_path):
    code = f"""
import sys, json
from ldm_rt.cli import main
try:
    main(["run", "--model-dir", {str(tiny_model_dir)!r}, "--prompt", "x", "--steps", "1",
          "--out", {str(tmp_path / "a.png")!r}])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
heavy = ["triton", "onnx", "onnxruntime", "tensorrt", "transformers", "diffusers", "ldm_rt.kernels", "ldm_rt.export"]
print(json.dumps([m for m in heavy if m in sys.modules]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def _resolves_into(spec, folder: Path) -> bool:
    """Whether an import spec points at `folder` (a package's __init__.py, or a namespace
    package's search path)."""
    if spec is None:
        return False
    places = [Path(spec.origin).resolve().parent] if spec.origin else []
    places += [Path(p).resolve() for p in (spec.submodule_search_locations or [])]
    return folder.resolve() in places


def test_source_folders_do_not_shadow_top_level_packages():
    """Under `python -m pytest` at the root, kernels/ and export/ must not be importable as
    `kernels`/`export` (conftest drops the root from sys.path): transformers imports Hugging
    Face's `kernels` package while diffusers loads, and our folder would stand in for it. The
    question is whether the name resolves to *our* folder: a real `kernels` package installed in
    a venv inside the checkout (the README's layout, `.venv/`) is under the root and is fine."""
    import importlib.util

    for name in ("kernels", "export"):
        spec = importlib.util.find_spec(name)
        assert not _resolves_into(spec, ROOT / name), (name, spec.origin, spec.submodule_search_locations)


def test_shadow_check_tells_our_folder_from_a_package_in_a_checkout_venv(tmp_path):
    """The check above, on both cases: a `kernels` package in `<root>/.venv/.../site-packages`
    is not ours; the source folder `<root>/kernels` is."""
    import importlib.machinery

    site = ROOT / ".venv" / "lib" / "python3.11" / "site-packages" / "kernels"
    theirs = importlib.machinery.ModuleSpec("kernels", None, origin=str(site / "__init__.py"), is_package=True)
    theirs.submodule_search_locations = [str(site)]
    ours = importlib.machinery.ModuleSpec("kernels", None, origin=str(ROOT / "kernels" / "__init__.py"),
                                          is_package=True)
    ours.submodule_search_locations = [str(ROOT / "kernels")]
    namespace = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
    namespace.submodule_search_locations = [str(ROOT / "kernels")]
    assert not _resolves_into(theirs, ROOT / "kernels")
    assert _resolves_into(ours, ROOT / "kernels") and _resolves_into(namespace, ROOT / "kernels")
    assert not _resolves_into(None, ROOT / "kernels")


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Run the tests"):]
    return section.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()


def test_ci_runs_the_readme_test_command_verbatim():
    """`.ci/run` must run the README's test command as written, venv location included, so a
    missing install step or a venv-inside-the-checkout failure cannot pass CI."""
    command = _readme_test_command()
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, command


def test_bench_scripts_shadow_no_installed_module():
    """`python bench/X.py` puts bench/ first on sys.path, so a script named like an installed
    module (bench/kernels.py was: transformers' `kernels`) breaks every import of that module."""
    import importlib.util

    clashes = {p.name: importlib.util.find_spec(p.stem).origin
               for p in (ROOT / "bench").glob("*.py") if importlib.util.find_spec(p.stem) is not None}
    assert not clashes, clashes
