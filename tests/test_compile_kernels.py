"""bench/compile_kernels.py: every kernel launch of the triton backend compiles for sm_90a with
the real Triton compiler and ptxas (no GPU needed), within an H100's shared memory and without
register spills. The interpreter tests (test_kernels.py) never lower a kernel, so a kernel
that cannot launch on a GPU would pass them.

The checks run in a subprocess: this test session sets TRITON_INTERPRET=1 (conftest.py), and
kernels defined under it are interpreted functions, which cannot be compiled."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
if platform.machine() != "x86_64":
    pytest.skip("Triton's bundled ptxas is an x86-64 binary", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "compile_kernels.py"


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, **kwargs)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile")
    # Both DiT-XL/2 variants: the text DiT (RoPE fused into self-attention, cross-attention with
    # the text mask) and the class DiT (sin-cos positions, no cross-attention).
    done = run([str(SCRIPT), "--presets", "dit-xl-2", "dit-xl-2-256-class", "--resolutions", "256",
                "--out", str(out)], timeout=900)
    return done, json.loads((out / "compile_kernels.json").read_text())


def test_backend_launches_compile_for_hopper_within_limits(report):
    done, data = report
    assert done.returncode == 0, done.stdout + done.stderr
    assert "launches compile for sm_90a within H100 limits" in done.stdout
    for row in data["launches"]:
        assert "error" not in row and row["problems"] == [], row
        assert row["arch"] == "sm_90a" and 0 < row["shared_bytes"] <= 232448 and 0 < row["registers"] <= 255
        assert row["spill_stores"] == row["spill_loads"] == 0
        if row["kernel"].endswith("_attention_kernel"):
            # q, k, v, out move as 16-byte vectors and async copies, never element by element
            # (DiT-XL's head stride of 72 hid their alignment from the compiler until the
            # launcher told it: kernels/flash_attention.py, aligned_elements)
            ops = row["memory_ops"]
            assert "ld.global.b16" not in ops and "st.global.b16" not in ops, (row["label"], ops)
            assert ops.get("cp.async.cg.shared.global", 0) > 0 and ops.get("st.global.v4.b32", 0) > 0, ops
            # both matmuls (q k^T and p v) on Hopper's warpgroup MMA, none on the older mma.sync
            mma = row["mma_ops"]
            assert mma and all(op.startswith("wgmma.mma_async") for op in mma), (row["label"], mma)


def test_every_kind_of_launch_the_backend_makes_is_checked(report):
    _, data = report
    seen = {(row["kernel"].split(".")[-1], row["pointers"]["out_ptr"],
             tuple((k, row["constexprs"][k]) for k in ("ROPE", "HAS_MASK", "GATED", "HAS_GATE") if k in row["constexprs"]))
            for row in data["launches"]}
    for dtype in ("*fp16", "*bf16"):
        # self-attention with fused RoPE (text DiT), plain (class DiT), cross-attention with the text mask
        for flags in ((("ROPE", True), ("HAS_MASK", False)), (("ROPE", False), ("HAS_MASK", False)),
                      (("ROPE", False), ("HAS_MASK", True))):
            assert ("_attention_kernel", dtype, flags) in seen, (dtype, flags)
        # adaLN alone, fused with the gated residual, and with the ungated cross-attention residual
        for flags in ((("GATED", False), ("HAS_GATE", False)), (("GATED", True), ("HAS_GATE", True)),
                      (("GATED", True), ("HAS_GATE", False))):
            assert ("_adaln_kernel", dtype, flags) in seen, (dtype, flags)
    fused = [row for row in data["launches"] if row["constexprs"].get("ROPE")]
    assert all(row["pointers"]["cos_ptr"] == "*fp32" for row in fused)  # the DiT's tables stay fp32


CHECK_TOO_BIG = """
import dataclasses, importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("compile_kernels", sys.argv[1])
check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = check
spec.loader.exec_module(check)
from ldm_rt.kernels import flash_attention
launches = []
with check.recording(launches):
    q = torch.randn(1, 1, 512, 256, dtype=torch.float16)
    flash_attention.attention(q, q, q)
big = dataclasses.replace(launches[0], num_stages=3, constexprs=tuple(
    (k, 128 if k in ("BLOCK_M", "BLOCK_N") else v) for k, v in launches[0].constexprs))
row = check.compile_launch(big)
print(json.dumps(dict(row, problems=check.problems(row))))
"""


def test_the_check_reports_a_launch_that_needs_too_much_shared_memory():
    """The measurement can fail: 128 x 128 tiles at head dim 256 with 3 stages do not fit."""
    done = run(["-c", CHECK_TOO_BIG, str(SCRIPT)], timeout=600)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["shared_bytes"] > 232448
    assert any("shared memory" in p for p in row["problems"])


def test_refuses_to_compile_interpreted_kernels():
    code = ("import os, sys, importlib.util; os.environ['TRITON_INTERPRET'] = '1'\n"
            "spec = importlib.util.spec_from_file_location('ck', sys.argv[1]); ck = importlib.util.module_from_spec(spec)\n"
            "sys.modules['ck'] = ck; spec.loader.exec_module(ck); ck._kernels()")
    done = run(["-c", code, str(SCRIPT)], timeout=120)
    assert done.returncode != 0 and "TRITON_INTERPRET is set" in done.stderr


def test_flux_step_launches_compile_for_hopper_within_limits(tmp_path):
    """FLUX.1-dev's widths (24 heads of 128, width 3072), 512 T5 + 256 image tokens in one joint
    sequence: the fused-RoPE attention at head dim 128, the adaLN and qk-norm kernels fit an H100 block,
    without spills, with 16-byte loads and wgmma (the DiT presets above run head dim 72 only)."""
    done = run([str(SCRIPT), "--presets", "flux-dev", "--resolutions", "256", "--out", str(tmp_path)], timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "compile_kernels.json").read_text())["launches"]
    kinds = {(row["kernel"].split(".")[-1], row["pointers"]["out_ptr"], row["constexprs"].get("HEAD_DIM"),
              row["constexprs"].get("ROPE"), row["constexprs"].get("GATED")) for row in rows}
    for dtype in ("*fp16", "*bf16"):
        assert {("_attention_kernel", dtype, 128, True, None), ("_adaln_kernel", dtype, None, None, False),
                ("_adaln_kernel", dtype, None, None, True), ("_rms_norm_kernel", dtype, None, None, None)} <= kinds, kinds
    for row in rows:
        assert row["problems"] == [] and row["shared_bytes"] <= 232448 and 0 < row["registers"] <= 255, row
        if row["kernel"].endswith("_attention_kernel"):
            assert "ld.global.b16" not in row["memory_ops"] and row["memory_ops"].get("cp.async.cg.shared.global")
            assert row["mma_ops"] and all(op.startswith("wgmma.mma_async") for op in row["mma_ops"]), row["mma_ops"]
