#!/usr/bin/env bash
# Every GPU measurement issues 5, 7 and 8 still need, in three device calls of under 10 minutes
# each (a session has 30 minutes of device time, start-up and transfers included).
#
# Before the first call, here (CPU side, once): ../shared/tools/device-wheels.sh
#   (downloads diffusers into .whl/ for the baselines; the GPU machine has no network).
# Then three calls of the device tool's `run`, each with carry [".whl"]:
#   bash bench/gpu_session.sh 1    # env, `pytest -m gpu`, kernel micro-benchmarks       (~8 min)
#   bash bench/gpu_session.sh 2    # ldm-rt bench, text DiT-XL/2 at 256 and 512 px        (~9 min)
#   bash bench/gpu_session.sh 3    # diffusers' DiT against ldm-rt: step latency, images  (~9 min)
# Each part writes $OUT/partN.tgz (bench/results/... and logs); unpack it at the repository root
# and record the figures in bench/RESULTS.md (`python bench/report.py` prints the tables).
#
# Every command runs under its own `timeout`, summing to less than the call's 600 s, so a slow
# step loses its own figures only and the archive is always written.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:?usage: bash bench/gpu_session.sh 1|2|3}"
out="${OUT:-/tmp/out}"
mkdir -p "$out" bench/results logs
export PYTHONUNBUFFERED=1

# The project and the carried wheels (diffusers), with no network: see ../shared/tools/device-wheels.sh.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD"
fi
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null; then
    # e.g. a setuptools there older than the >= 77 pyproject.toml needs: import from an assembled
    # tree instead (kernels/ and export/ install as ldm_rt.kernels and ldm_rt.export)
    echo "pip install -e . failed; importing ldm_rt from /tmp/src"
    rm -rf /tmp/src && mkdir -p /tmp/src && cp -r ldm_rt /tmp/src/ \
        && ln -s "$PWD/kernels" /tmp/src/ldm_rt/kernels && ln -s "$PWD/export" /tmp/src/ldm_rt/export \
        && export PYTHONPATH="/tmp/src:/tmp/site" || { echo "install failed"; exit 1; }
fi
python3 -c "import ldm_rt.kernels, ldm_rt.export" || { echo "ldm_rt does not import"; exit 1; }
# `ldm-rt` without relying on the console script's folder being on PATH there.
ldm_rt() { python3 -c 'import sys; from ldm_rt.cli import main; sys.exit(main())' "$@"; }
bench_dit() {  # bench_dit NAME PRESET PX BACKENDS
    ldm_rt bench --preset "$2" --backends "$4" --resolutions "$3" --dtype fp16,bf16 --batch 1 --steps 50 \
        --warmup 3 --iters 20 --loop-iters 3 --out "bench/results/$1"
}
export -f ldm_rt bench_dit

step() {  # step SECONDS NAME 'COMMAND': time-limited, logged to logs/NAME.log; a failure never ends the part
    local limit="$1" name="$2" command="$3" start=$SECONDS
    echo "=== $name (limit ${limit}s): $command"
    timeout --kill-after=10 "$limit" bash -c "$command" 2>&1 | tee "logs/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "logs/$name.log"
}

pack() {
    tar czf "$out/part$part.tgz" bench/results logs 2>/dev/null
    ls -la "$out"
}
trap pack EXIT

all=torch,compile,triton,onnxruntime,tensorrt,diffusers
case "$part" in
1)  # 20 + 20 + 150 + 200 + 80 + 60 = 530 s at most
    step 20 env 'nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"'
    step 20 ldm-rt-env 'ldm_rt env'
    step 150 pytest-gpu 'python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests'
    step 200 kernels-attention 'python3 bench/kernel_bench.py attention --out bench/results/kernels-attention'
    step 80 kernels-adaln 'python3 bench/kernel_bench.py adaln --out bench/results/kernels-adaln'
    step 60 kernels-rope 'python3 bench/kernel_bench.py rope --out bench/results/kernels-rope'
    ;;
2)  # 240 + 300 = 540 s at most
    step 240 bench-256 "bench_dit dit-xl-2-256 dit-xl-2 256 $all"
    step 300 bench-512 "bench_dit dit-xl-2-512 dit-xl-2 512 $all"
    ;;
3)  # 540 s at most
    step 540 dit-diffusers 'python3 bench/dit_diffusers.py --iters 50 --warmup 10 --out bench/results/dit-diffusers'
    ;;
*)
    echo "part must be 1, 2 or 3"; exit 2 ;;
esac
