"""bench/kernel_bench.py: argument parsing, and the one-sentence refusal without CUDA (the timing
itself needs a GPU and is never run in tests)."""

import pytest
import torch

from bench_scripts import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("kernel_bench")


def test_defaults_are_the_issue_grid(bench, tmp_path):
    args = bench.parse_args(["attention", "--out", str(tmp_path)])
    assert args.dtype == ["fp16", "bf16"] and args.batch == 2 and args.seq == [256, 1024, 4096]
    assert args.heads == [(16, 72), (8, 128), (24, 64)]
    assert (args.tokens, args.hidden) == (4096, 1152)


def test_options_parse(bench, tmp_path):
    args = bench.parse_args(["all", "--out", str(tmp_path), "--dtype", "bf16", "--seq", "77", "--heads", "4x96",
                             "--iters", "3", "--no-compile"])
    assert args.op == "all" and args.dtype == ["bf16"] and args.seq == [77] and args.heads == [(4, 96)]
    assert args.iters == 3 and args.no_compile


@pytest.mark.parametrize("argv", [
    ["attention"],  # --out is required
    ["matmul", "--out", "x"],
    ["attention", "--out", "x", "--heads", "16-72"],
    ["attention", "--out", "x", "--dtype", "fp32"],
    ["adaln", "--out", "x", "--iters", "0"],
])
def test_bad_arguments_exit_with_usage(bench, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda_in_one_sentence(bench, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main(["adaln", "--out", str(tmp_path / "out")])
    assert str(exc.value).startswith("error: ") and "no CUDA GPU" in str(exc.value)
    assert not (tmp_path / "out").exists()
