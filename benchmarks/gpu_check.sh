#!/usr/bin/env bash
# benchmarks/gpu_check.sh [OUT_DIR] [--dry-run]
#
# The one-command check of npgpt's CUDA path (issues 13 and 25) for a machine with an NVIDIA GPU and no
# network, whose Python already has CuPy (cupy-cuda12x or cupy-cuda13x, with its [ctk] headers), NumPy,
# PyTorch, transformers, tiktoken, safetensors, ml_dtypes, matplotlib, tqdm and pytest (and mpi4py for
# the NCCL part, whose tests fail saying so without it). Nothing is
# downloaded: npgpt is installed into a throwaway venv that sees the system's packages (pip install
# --no-deps --no-index --no-build-isolation -e .), or, if that fails, run from a copy of the package.
#
# One command of about 9 minutes ($NPGPT_CHECK_SECONDS, default 540). Each part runs under its own time
# limit, so a hang or a slow part costs that part only; a limit shrinks when the later parts' least would
# not fit otherwise. In order, most informative first (the limits: docs/benchmarks.md, "GPU check"):
#   install 60 s; probe 45 s (a first kernel compile and bfloat16 on the GPU: when they fail nothing else
#   can pass, so the check stops there, naming what is missing); nvidia-smi 10 s; npgpt info 20 s;
#   NPGPT_REQUIRE_CUDA=1 pytest -m cuda in three parts (no CUDA test can pass by skipping):
#     pytest-core 190 s: layer parity, the engine, the kernels, cuBLAS, training (test_layers,
#       test_engine, test_cuda_kernels, test_cuda_blas, test_gpu_training);
#     pytest-more 70 s: gradients, the encoder-decoder, fine-tuning, bench, pretrained;
#     pytest-nccl 40 s: test_distributed (one-rank NCCL; the two-GPU tests skip on one GPU, saying so);
#   20 steps of `npgpt train --preset nano` on CuPy in five settings against NumPy, all at once, 60 s; the
#   benchmark table, what is left (at least 80 s; benchmarks/gpu_bench.py: 124M, B=16 and 8 at T=1024,
#   TF32, bf16, fp32, npgpt with the kernels off and all, against PyTorch eager and torch.compile, one
#   twin at a time).
# A GPU machine starts with no CuPy kernel cache, and one process would spend about 10 minutes compiling
# the kernels of the CUDA tests (benchmarks/gpu_compile_budget.py's estimate). So pytest-core and
# pytest-more each run as several pytest processes at once over a split of their tests ("shards",
# benchmarks/gpu_shards.py; gpu_check_tools.py pytest): as many as make the part end soonest by the plan,
# at most one per core and as many as the GPU's free memory holds; they share CuPy's on-disk cache,
# which is safe for concurrent writers. On 16 cores the estimate is 95 s for pytest-core and 32 s for
# pytest-more on a cold cache, and the limits are twice that. Compile time is logged apart from run time:
# benchmarks/gpu_compile_timer.py times CuPy's kernel compiles in every Python process (a .pth file in
# the venv), each shard prints it per test file, and the report gives each part's seconds compiling
# (summed over its shards, and the longest shard's) beside its seconds in all.
# PYTHON=... picks the interpreter (default python3).
# Writes OUT_DIR (default gpu-check/): report.md (the report), logs.txt (every part's output),
# bench.jsonl and bench.md (the benchmark's figures and table); prints a one-screen summary last. The
# report and the logs are rewritten after every part (the part in flight writes OUT_DIR/running.log), and
# a check stopped from outside (SIGTERM, SIGINT, SIGHUP) stops its part (all its shards) and writes them
# before it exits.
# Exit status: 0 when every part passed, 1 otherwise (the report says which).
#
# --dry-run: the same script on a machine without a GPU, each part made small and CPU-only (the probe
# tries the host's bfloat16, pytest-core runs two CUDA tests on the CPU stand-in tests/fake_cupy.py with
# NPGPT_FAKE_CUDA=1 in two shards, the other pytest parts only collect theirs, the GPU runs become CPU
# runs, the benchmark uses a tiny model): it checks that every command parses and runs and that the
# report is written (tests/test_gpu_check.py does this).
set -u -o pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
DRY=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) OUT="$arg" ;;
    esac
done
OUT="${OUT:-gpu-check}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${NPGPT_CHECK_SECONDS:-540}"
START=$(date +%s)
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/npgpt-gpu-check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
rm -f "$OUT/report.md" "$OUT/logs.txt" "$OUT/bench.jsonl" "$OUT/bench.md" "$OUT/running.log"
: >"$WORK/parts.tsv"
export NPGPT_COMPILE_LOG="$WORK/compile.jsonl"  # one line per Python process (gpu_compile_timer.py)

# Nothing may reach the network: pip only from the checkout, Hugging Face libraries offline (the torch
# twin builds GPT-2 from a config, no weights are fetched), npgpt's BPE ranks ship with the package.
export PYTHONUNBUFFERED=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export NPGPT_CACHE_DIR="$WORK/token-cache" MPLBACKEND=Agg
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"  # torch beside CuPy's pool
unset NPGPT_CUDA_KERNELS NPGPT_DEVICE NPGPT_DIST

left() { echo $((BUDGET - ($(date +%s) - START))); }

# run_part NAME BUDGET RESERVE COMMAND...: COMMAND under `timeout`, its output in $WORK/NAME.log; the
# limit is BUDGET seconds, or less so that RESERVE seconds (the least the later parts need) stay. The
# part runs in the background and is waited for, so that a signal to the check reaches on_signal at once.
PART_PID=""
PART_NAME=""
run_part() {
    local name=$1 budget=$2 reserve=$3
    shift 3
    local limit=$(($(left) - reserve))
    ((limit > budget)) && limit=$budget
    ((limit < 10)) && limit=10
    local log="$OUT/running.log" t0 rc
    t0=$(date +%s)
    echo "[gpu_check] $name (limit ${limit}s): $*"
    echo "\$ $*" >"$log"
    (cd "$WORK" && NPGPT_CHECK_PART="$name" exec timeout --kill-after=15 "$limit" "$@") >>"$log" 2>&1 &
    PART_PID=$! PART_NAME=$name PART_T0=$t0 PART_LIMIT=$limit
    wait "$PART_PID"
    rc=$?
    PART_PID=""
    mv -f "$log" "$WORK/$name.log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >>"$WORK/parts.tsv"
    if ((rc == 124 || rc == 137)); then
        echo "[gpu_check] $name: TIMED OUT after ${limit}s (its log so far is in logs.txt)"
    else
        echo "[gpu_check] $name: exit $rc in $(($(date +%s) - t0))s"
    fi
    interim_report
    return "$rc"
}

# Stopped from outside: stop the part in flight, record it as killed, write the report, and exit.
on_signal() {
    trap - TERM INT HUP
    echo "[gpu_check] stopped by a signal${PART_NAME:+ during $PART_NAME}; writing the report"
    if [[ -n "$PART_PID" ]]; then
        kill -TERM "$PART_PID" 2>/dev/null  # `timeout`: it passes the signal on to the part's whole process group
        for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do  # a part in shards stops them and says which had ended
            kill -0 "$PART_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$PART_PID" 2>/dev/null
        wait "$PART_PID" 2>/dev/null
        [[ -f "$OUT/running.log" ]] && mv -f "$OUT/running.log" "$WORK/$PART_NAME.log"
        printf '%s\t%s\t%s\t%s\n' "$PART_NAME" 143 "$(($(date +%s) - PART_T0))" "$PART_LIMIT" >>"$WORK/parts.tsv"
    fi
    "${VPY:-$PY}" "$ROOT/benchmarks/gpu_check_tools.py" report "$WORK" "$OUT" >/dev/null 2>&1 ||
        cp "$WORK/parts.tsv" "$OUT/logs.txt" 2>/dev/null
    echo "[gpu_check] report: $OUT/report.md, logs: $OUT/logs.txt"
    exit 1
}
trap on_signal TERM INT HUP

# report.md and logs.txt as they stand (quietly; the summary is printed once, at the end)
interim_report() {
    "${VPY:-$PY}" "$ROOT/benchmarks/gpu_check_tools.py" report "$WORK" "$OUT" --quiet >/dev/null 2>&1 ||
        cp "$WORK/parts.tsv" "$OUT/logs.txt" 2>/dev/null
    return 0
}

# --- npgpt, installed without the network -------------------------------------------------------------------
install_npgpt() {
    local venv="$WORK/venv" vsite parents missing
    # what the check needs besides npgpt, which nothing may download: say plainly what is missing
    missing=$("$PY" -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' \
        $NEEDED) || return 1
    if [[ -n "$missing" ]]; then
        echo "this Python ($PY) lacks: $missing (the check installs nothing but npgpt; use a Python that has them, PYTHON=...)"
        return 1
    fi
    # --without-pip: the system's pip (visible through --system-site-packages) installs into the venv. The
    # .pth file adds the site directories of $PY itself, for when $PY is a venv's Python (whose packages a
    # venv made from it would not see otherwise).
    parents=$("$PY" -c 'import site; print("\n".join(p for p in site.getsitepackages() + [site.getusersitepackages()] if p))')
    if "$PY" -m venv --system-site-packages --without-pip "$venv" &&
        vsite=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') &&
        echo "$parents" >"$vsite/_npgpt_gpu_check_parents.pth" &&
        printf '%s\nimport gpu_compile_timer; gpu_compile_timer.install()\n' "$ROOT/benchmarks" >"$vsite/_npgpt_compile_timer.pth" &&
        "$venv/bin/python" -m pip install --no-deps --no-index --no-build-isolation -e "$ROOT" &&
        (cd "$WORK" && "$venv/bin/python" -c "$KERNELS_FOUND; import npgpt.cli, npgpt.cuda.kernels; $CHECK_IMPORTS"); then
        echo "$venv/bin/python" >"$WORK/python"
        echo "installed: editable (pip -e, no deps, no index) in a venv over the system packages"
        return 0
    fi
    echo "the editable install failed; running from a copy of the package with its kernels on PYTHONPATH"
    rm -rf "$WORK/site" && mkdir -p "$WORK/site" && cp -r "$ROOT/npgpt" "$WORK/site/npgpt" &&
        rm -rf "$WORK/site/npgpt/kernels" && cp -r "$ROOT/kernels" "$WORK/site/npgpt/kernels" || return 1
    (cd "$WORK" && PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "$KERNELS_FOUND; import npgpt.cli; $CHECK_IMPORTS") || return 1
    echo "$PY" >"$WORK/python"
    echo "fallback" >"$WORK/fallback"
    echo "installed: fallback, a copy of npgpt/ and kernels/ on PYTHONPATH"
}
# what the parts need besides npgpt: a Python that lacks them is no Python for this check
NEEDED="numpy tiktoken safetensors tqdm matplotlib pytest"
((DRY)) || NEEDED="$NEEDED cupy torch transformers ml_dtypes"
CHECK_IMPORTS="import ${NEEDED// /, }"
KERNELS_FOUND="from npgpt.cuda.sources import kernel_dir; kernel_dir()"  # kernels/ is data, found beside npgpt/
export -f install_npgpt
export WORK ROOT PY CHECK_IMPORTS NEEDED KERNELS_FOUND
run_part install 60 400 bash -c install_npgpt  # 400: R_CORE and the probe, nvidia-smi and info
if [[ ! -s "$WORK/python" ]]; then
    echo "[gpu_check] npgpt could not be installed or imported; see $OUT/logs.txt"
    cat "$WORK/install.log" 2>/dev/null
    "$PY" "$ROOT/benchmarks/gpu_check_tools.py" report "$WORK" "$OUT" >/dev/null 2>&1 || cp "$WORK/install.log" "$OUT/logs.txt"
    exit 1
fi
VPY="$(cat "$WORK/python")"
[[ -e "$WORK/fallback" ]] && export PYTHONPATH="$WORK/site:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
echo "[gpu_check] python: $VPY ($("$VPY" -c 'import sys; print(sys.version.split()[0])'))"

# --- the parts ------------------------------------------------------------------------------------------------
# The CUDA tests in three parts, most informative first; within a part pytest runs files in the order given.
CORE=(test_layers.py test_engine.py test_cuda_kernels.py test_cuda_blas.py test_gpu_training.py)
NCCL=(test_distributed.py)
MORE=()
for f in "$ROOT"/tests/test_*.py; do
    case " ${CORE[*]} ${NCCL[*]} " in *" $(basename "$f") "*) ;; *) MORE+=("$(basename "$f")") ;; esac
done
paths() { for f in "$@"; do echo "$ROOT/tests/$f"; done; }
mapfile -t CORE_FILES < <(paths "${CORE[@]}")
mapfile -t MORE_FILES < <(paths "${MORE[@]}")
mapfile -t NCCL_FILES < <(paths "${NCCL[@]}")
PYTEST=(--rootdir "$ROOT" -m cuda -v -rfEs -p no:cacheprovider -p gpu_compile_timer --durations=5)
# each pytest part as shards: several pytest processes at once over a split of its tests (gpu_shards.py)
SHARDED=("$VPY" "$ROOT/benchmarks/gpu_check_tools.py" pytest "$WORK")
if ((DRY)); then
    DEVICE=cpu
    PROBE_ARGS=(--cpu)
    # two CUDA tests really run, on the CPU stand-in, in two shards; the other parts only collect theirs
    CORE_RUN=(env NPGPT_FAKE_CUDA=1 PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}" "${SHARDED[@]}" pytest-core
        --shards 2 -- "${PYTEST[@]}" "$ROOT/tests/test_cuda_blas.py" -k "constants or edges")
    MORE_SHARDS=(--shards 1)
    COLLECT=(--collect-only -q)
    TRAIN_ARGS=(--device cpu --max-steps 2 --model-args "--emb-dim 32 --n-heads 2 --n-layers 1 --context-length 16")
    BENCH_ARGS=(--device cpu --preset nano --vocab-size 97 --emb-dim 32 --n-heads 2 --n-layers 1 --context-length 16
        --batch-sizes 2 --compile-batch-sizes --precisions fp32 bf16 --steps 1 --warmup 1)
else
    DEVICE=cuda
    PROBE_ARGS=(--facts "$WORK/gpu.json")  # the GPU's free memory and compute mode, for --shards auto
    export NPGPT_REQUIRE_CUDA=1  # a CUDA test that would skip fails instead, saying why
    CORE_RUN=("${SHARDED[@]}" pytest-core --shards auto -- "${PYTEST[@]}" "${CORE_FILES[@]}")
    MORE_SHARDS=(--shards auto)
    COLLECT=()
    TRAIN_ARGS=(--device cuda --max-steps 20)
    BENCH_ARGS=(--device cuda)
fi
# R_X: the least that part X and every part after it need; a part's limit leaves the next part's R_ free.
# The pytest parts' limits are twice their estimate on a cold cache over 16 cores (docs/gpu_compile_budget.json,
# "spread": pytest-core 95 s, pytest-more 32 s), for what the estimate cannot know (docs/benchmarks.md).
R_BENCH=80
R_TRAIN=$((R_BENCH + 60))
R_NCCL=$((R_TRAIN + 30))
R_MORE=$((R_NCCL + 40))
R_CORE=$((R_MORE + 120))

if ! run_part probe 45 $((R_CORE + 30)) "$VPY" "$ROOT/benchmarks/gpu_check_tools.py" probe "${PROBE_ARGS[@]}"; then
    echo "[gpu_check] $(grep -h '^PROBE FAILED' "$WORK/probe.log" || tail -n 1 "$WORK/probe.log")"
    echo "[gpu_check] nothing else can pass without it: stopping. Report: $OUT/report.md"
    exit 1
fi
if command -v nvidia-smi >/dev/null; then
    run_part nvidia-smi 10 $((R_CORE + 20)) nvidia-smi
else  # a failure on a GPU machine; expected in a dry run
    echo "nvidia-smi: not found" >"$WORK/nvidia-smi.log"
    printf 'nvidia-smi\t%s\t0\t0\n' "$((DRY ? 0 : 127))" >>"$WORK/parts.tsv"
fi
run_part info 20 "$R_CORE" "$VPY" -m npgpt info --device "$DEVICE"
run_part pytest-core 190 "$R_MORE" "${CORE_RUN[@]}"
run_part pytest-more 70 "$R_NCCL" "${SHARDED[@]}" pytest-more "${MORE_SHARDS[@]}" -- "${PYTEST[@]}" "${MORE_FILES[@]}" "${COLLECT[@]}"
run_part pytest-nccl 40 "$R_TRAIN" "${SHARDED[@]}" pytest-nccl --shards 1 -- "${PYTEST[@]}" "${NCCL_FILES[@]}" "${COLLECT[@]}"
unset NPGPT_REQUIRE_CUDA
TRAIN_LIMIT=$((DRY ? 240 : 60))  # the dry run's six CPU processes take longer than the GPU's
run_part train "$TRAIN_LIMIT" "$R_BENCH" "$VPY" "$ROOT/benchmarks/gpu_check_tools.py" train "$WORK" "${TRAIN_ARGS[@]}"
BENCH_SECONDS=$(($(left) - 25))
((BENCH_SECONDS < R_BENCH)) && BENCH_SECONDS=$R_BENCH
run_part bench $((BENCH_SECONDS + 20)) 5 "$VPY" "$ROOT/benchmarks/gpu_bench.py" --out "$OUT/bench.jsonl" \
    --deadline "$BENCH_SECONDS" "${BENCH_ARGS[@]}"

# --- the report, and the summary last ---------------------------------------------------------------------------
"$VPY" "$ROOT/benchmarks/gpu_check_tools.py" report "$WORK" "$OUT" || {
    echo "[gpu_check] the report could not be written; raw logs:"
    for f in "$WORK"/*.log; do echo "===== $f"; tail -n 20 "$f"; done | tee "$OUT/logs.txt"
}
echo "[gpu_check] $(($(date +%s) - START)) s in all; report: $OUT/report.md, logs: $OUT/logs.txt"
awk -F'\t' '$2 != 0 { bad = 1 } END { exit bad }' "$WORK/parts.tsv"
