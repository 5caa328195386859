#!/usr/bin/env bash
# Every GPU measurement issues 5, 7 and 8 still need, planned for one session's 15 minutes of
# device time (the machine's start, a minute or more, counts too): one call of the device tool's
# `run` that works to a deadline, then a short second call for the steps the first did not reach.
#
# Here, once: ../shared/tools/device-wheels.sh  (diffusers into .whl/: the GPU machine has no network)
# Call 1, run with timeout_s 600 and carry [".whl"]:
#     bash bench/gpu_session.sh
# Call 2, at once (the machine stays warm only 30 s), if the tool's reply shows the machine still
# warm and lease.budget_left_s B >= 90: timeout_s B - 20 and
#     DEADLINE=<B - 35> bash bench/gpu_session.sh
#   On the still-warm machine it runs only the steps not yet finished (their record and the
#   compile caches live in /tmp there); on a fresh machine it starts again from the top.
#   Steps can be named: bash bench/gpu_session.sh bench-512 dit-diffusers
# Each call writes $OUT/gpu_session-N.tgz (bench/results/... and logs/, with logs/summary.tsv);
# unpack it at the repository root and record the figures in bench/RESULTS.md (python
# bench/report.py prints the tables). DRY_RUN=1 prints the plan and runs nothing (works here;
# DRY_STEP_S=N makes each step take N seconds, to try the deadline).
#
# Order: the correctness tests first, while ten background processes fill the torch.compile
# (inductor) and Triton caches on disk for every kernel and DiT-XL/2 configuration the steps time, using
# the 16 CPU cores (the compiles are CPU-bound); the timed steps wait for them, so nothing else
# shares the GPU while they time. Those warm-up runs record the cold-start costs (first call:
# torch.compile's compile, Triton JIT, CUDA-graph capture) with empty caches, but under
# contention: an upper bound. The timed runs then report warm-cache start-up costs.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
DEADLINE="${DEADLINE:-585}"  # seconds this call may take; the device tool's limit is 600
DRY_RUN="${DRY_RUN:-0}"
WARM_LIMIT="${WARM_LIMIT:-240}"  # seconds each warm-up process may take
WARM_KEEP="${WARM_KEEP:-300}"    # seconds of the deadline kept for the timed steps: warm-ups are stopped then
out="${OUT:-/tmp/out}"
state="${GPU_SESSION_STATE:-/tmp/ldm_rt_gpu}"  # which steps finished, across the calls on one machine
mkdir -p "$out" "$state" bench/results logs
touch "$state/done"
call=$(( $(cat "$state/calls" 2>/dev/null || echo 0) + 1 ))
echo "$call" >"$state/calls"
export PYTHONUNBUFFERED=1
# No working directory on sys.path: at the root, kernels/ would stand in for Hugging Face's
# `kernels` package, which transformers imports (README, Layout).
export PYTHONSAFEPATH=1

ALL_STEPS=(env pytest-gpu kernels-attention kernels-adaln kernels-rope bench-256 bench-512 dit-diffusers bench-demo
           profile-512)
declare -A LIMIT=([env]=20 [pytest-gpu]=150 [kernels-attention]=110 [kernels-adaln]=60 [kernels-rope]=40
                  [bench-256]=170 [bench-512]=200 [dit-diffusers]=240 [bench-demo]=90
                  [profile-512]=120 [bench-512-max-autotune]=540)
TIMED=" kernels-attention kernels-adaln kernels-rope bench-256 bench-512 dit-diffusers bench-demo profile-512 "
TIMED+="bench-512-max-autotune "  # steps that must have the GPU to themselves
NEEDS_WARM="${TIMED/bench-512-max-autotune /}"  # max-autotune is timed for its cold compile: no warm-up
all=torch,compile,triton,onnxruntime,tensorrt,diffusers

command_of() {  # the shell command of a step
    case "$1" in
    env) echo 'nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"; ldm_rt env' ;;
    pytest-gpu) echo 'python3 -m pytest -m gpu -v -rs --tb=short --durations=10 -p no:cacheprovider tests' ;;
    kernels-attention) echo 'python3 bench/kernel_bench.py attention --out bench/results/kernels-attention' ;;
    kernels-adaln) echo 'python3 bench/kernel_bench.py adaln --out bench/results/kernels-adaln' ;;
    kernels-rope) echo 'python3 bench/kernel_bench.py rope --out bench/results/kernels-rope' ;;
    bench-256) echo "bench_dit 256 $all bench/results/dit-xl-2-256" ;;
    bench-512) echo "bench_dit 512 $all bench/results/dit-xl-2-512" ;;
    bench-512-max-autotune) echo "bench_dit 512 torch,triton bench/results/dit-xl-2-512-max-autotune --dtype fp16 --max-autotune" ;;
    dit-diffusers) echo 'python3 bench/dit_diffusers.py --iters 50 --warmup 10 --out bench/results/dit-diffusers' ;;
    bench-demo) echo "ldm_rt bench --backends $all --out bench/results/demo-gpu" ;;
    profile-512) echo 'python3 bench/profile_step.py --preset dit-xl-2 --resolution 512 --dtype fp16 --out bench/results/profile-512' ;;
    *) return 1 ;;
    esac
}

left() { echo $(( DEADLINE - (SECONDS - T0) )); }

summary() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>logs/summary.tsv; }

pack() {
    tar czf "$out/gpu_session-$call.tgz" bench/results logs 2>/dev/null
    ls -la "$out"
}
trap pack EXIT

if [ "$#" -gt 0 ]; then
    steps=("$@")
else
    steps=()
    for s in "${ALL_STEPS[@]}"; do grep -qx "$s" "$state/done" || steps+=("$s"); done
fi
for s in "${steps[@]}"; do command_of "$s" >/dev/null || { echo "unknown step $s; steps: ${ALL_STEPS[*]} bench-512-max-autotune"; exit 2; }; done
echo "call $call: deadline ${DEADLINE}s; steps: ${steps[*]:-none left}"
[ -s logs/summary.tsv ] || summary call step exit seconds limit

# The project and the carried wheels (diffusers), with no network: see ../shared/tools/device-wheels.sh.
if [ "$DRY_RUN" != 1 ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        [ -d /tmp/site/diffusers ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site"
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
fi
echo "setup done at $((SECONDS - T0))s"

# `ldm-rt` without relying on the console script's folder being on PATH there.
ldm_rt() { python3 -c 'import sys; from ldm_rt.cli import main; sys.exit(main())' "$@"; }
bench_dit() {  # bench_dit PX BACKENDS OUT [more ldm-rt bench options]
    local px="$1" backends="$2" dir="$3"; shift 3
    ldm_rt bench --preset dit-xl-2 --backends "$backends" --resolutions "$px" --dtype fp16,bf16 --batch 1 \
        --steps 50 --warmup 3 --iters 20 --loop-iters 3 --out "$dir" "$@"
}
export -f ldm_rt bench_dit

warm_pids=()
warm_commands() {  # what fills the caches: every compile and JIT the timed steps will ask for
    local dir=bench/results/cold-start px dt
    echo "python3 bench/kernel_bench.py all --iters 1 --warmup 0 --out $dir/kernels"
    echo "ldm_rt bench --backends compile,triton --steps 2 --warmup 0 --iters 1 --loop-iters 1 --out $dir/demo"
    for px in 256 512; do
        for dt in fp16 bf16; do
            echo "ldm_rt bench --preset dit-xl-2 --backends compile,triton --resolutions $px --dtype $dt --batch 1 --steps 2 --warmup 0 --iters 1 --loop-iters 1 --out $dir/dit-xl-2-$px-$dt"
            echo "python3 bench/dit_diffusers.py --sizes $px --dtypes $dt --iters 1 --warmup 0 --steps 0 --backends triton --out $dir/dit-diffusers-$px-$dt"
        done
    done
}

warm_start() {  # in the background, two threads each: 10 processes on the 16 cores
    [ -e "$state/warm.done" ] && return
    local i=0 c
    while IFS= read -r c; do
        i=$((i + 1))
        echo "warm-up $i: $c"
        [ "$DRY_RUN" = 1 ] && continue
        OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=2 timeout --kill-after=10 "$WARM_LIMIT" bash -c "$c" \
            >"logs/warm-$i.log" 2>&1 &
        warm_pids+=($!)
    done < <(warm_commands)
    echo "warm-up: ${#warm_pids[@]} processes started at $((SECONDS - T0))s"
}

warm_wait() {  # the GPU to ourselves again before anything is timed
    [ "${#warm_pids[@]}" -eq 0 ] && return
    local start=$SECONDS pid
    echo "waiting for the warm-up processes (at $((SECONDS - T0))s)"
    for pid in "${warm_pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            # keep WARM_KEEP seconds for the timed steps, whatever the warm-up still wants
            if [ "$(left)" -lt "$WARM_KEEP" ]; then kill -- "$pid" 2>/dev/null; fi
            sleep 1
        done
    done
    warm_pids=()
    touch "$state/warm.done"
    echo "warm-up finished after $((SECONDS - start))s of waiting (at $((SECONDS - T0))s)"
    summary "$call" warm-up-wait done "$((SECONDS - start))" -
}

run_step() {  # time-limited, logged to logs/NAME.log; a failure never ends the call
    local name="$1" command start limit rc
    command=$(command_of "$name")
    limit=$(( $(left) - 15 ))
    [ "$limit" -gt "${LIMIT[$name]}" ] && limit=${LIMIT[$name]}
    if [ "$limit" -lt 30 ] && [ "$limit" -lt "${LIMIT[$name]}" ]; then
        echo "=== $name: not started, ${limit}s left before the deadline"
        summary "$call" "$name" not-started 0 "$limit"
        return
    fi
    echo "=== $name (limit ${limit}s, at $((SECONDS - T0))s): $command"
    start=$SECONDS
    if [ "$DRY_RUN" = 1 ]; then sleep "${DRY_STEP_S:-0}"; rc=0; else
        timeout --kill-after=10 "$limit" bash -c "$command" 2>&1 | tee "logs/$name.log"
        rc=${PIPESTATUS[0]}
    fi
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "logs/$name.log"
    summary "$call" "$name" "$rc" "$((SECONDS - start))" "$limit"
    # a step cut by its time limit (124, or 137 when killed) may run again in the next call
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || echo "$name" >>"$state/done"
}

for s in "${steps[@]}"; do
    case "$NEEDS_WARM" in *" $s "*) warm_start; break ;; esac
done
for s in "${steps[@]}"; do
    case "$TIMED" in *" $s "*) warm_wait ;; esac
    run_step "$s"
done
echo "call $call done at $((SECONDS - T0))s; left undone: $(for s in "${ALL_STEPS[@]}"; do grep -qx "$s" "$state/done" || printf '%s ' "$s"; done)"
