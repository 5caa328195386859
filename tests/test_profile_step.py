"""bench/profile_step.py: kernel classes, and a CPU smoke run of the profile (the real one needs a GPU)."""

import json

import pytest

from bench_scripts import load_bench_script


@pytest.fixture(scope="module")
def profile_step():
    return load_bench_script("profile_step")


@pytest.mark.parametrize("name, label", [
    ("_attention_kernel", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72, 128>>", "attention"),
    ("triton_per_fused__softmax_3", "attention"),
    ("_adaln_kernel", "adaln/norm"),
    ("triton_per_fused_add_mul_native_layer_norm_1", "adaln/norm"),
    ("_rope_kernel", "rope"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", "gemm"),
    ("triton_tem_fused_addmm_0", "gemm"),
    ("triton_tem_fused_mm_4", "gemm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise/other"),
    ("triton_poi_fused_cat_2", "elementwise/other"),
    ("aten::mm", "gemm"),
])
def test_kernel_classes(profile_step, name, label):
    assert profile_step.kernel_class(name) == label


def test_cpu_smoke_writes_the_table_and_json(profile_step, tmp_path):
    report = profile_step.main(["--preset", "tiny", "--resolution", "16", "--dtype", "fp32", "--device", "cpu",
                                "--backends", "torch,triton", "--warmup", "0", "--iters", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "profile.json").read_text()) == json.loads(json.dumps(report))
    torch_row = report["backends"]["torch"]
    assert torch_row["ms_per_step"] > 0 and torch_row["time"].startswith("CPU")
    assert abs(sum(torch_row["ms_per_step_by_class"].values()) - torch_row["ms_per_step"]) < 1e-6
    assert {"gemm", "attention"} <= set(torch_row["ms_per_step_by_class"])
    assert "aten::addmm" in (tmp_path / "torch.txt").read_text()
    assert "Triton interpreter" in report["backends"]["triton"]["skipped"]


def test_report_renders_the_profile(profile_step, tmp_path):
    report = profile_step.main(["--preset", "tiny", "--resolution", "16", "--dtype", "fp32", "--device", "cpu",
                                "--backends", "torch,tensorrt", "--warmup", "0", "--iters", "1", "--out", str(tmp_path)])
    render = load_bench_script("report")
    text = render.report([tmp_path / "profile.json"])
    row = report["backends"]["torch"]
    assert f"| torch | {row['ms_per_step']:.3f} | " in text
    assert "- skipped: tensorrt: " in text and "- torch, top kernels: `" in text
