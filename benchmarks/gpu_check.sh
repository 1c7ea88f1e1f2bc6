#!/usr/bin/env bash
# benchmarks/gpu_check.sh [OUT_DIR] [--dry-run]
#
# The one-command check of npgpt's CUDA path (issue 13) for a machine with an NVIDIA GPU and no network,
# whose Python already has CuPy (cupy-cuda12x or cupy-cuda13x), NumPy, PyTorch, transformers, tiktoken,
# safetensors, ml_dtypes, matplotlib, tqdm and pytest. Nothing is downloaded: npgpt is installed into a
# throwaway venv that sees the system's packages (pip install --no-deps --no-index --no-build-isolation
# -e .), or, if that fails, run from a copy of the package with its kernels on PYTHONPATH.
#
# In order, each part under its own time limit (a hang costs that part only), about 8 minutes in all
# ($NPGPT_CHECK_SECONDS, default 480; a limit shrinks when the later parts would not fit otherwise):
#   install 90 s; nvidia-smi 20 s; npgpt info 40 s; NPGPT_REQUIRE_CUDA=1 pytest -m cuda 170 s (a CUDA
#   test cannot pass by skipping); npgpt gradcheck --device cuda 45 s; 20 steps of `npgpt train --preset
#   nano` on CuPy in five settings against NumPy 75 s; the benchmark table, what is left (at least 30 s;
#   benchmarks/gpu_bench.py: 124M, B=16 and 8 at T=1024, fp32 without TF32, TF32, bf16, npgpt with the
#   kernels off and NPGPT_CUDA_KERNELS=all against PyTorch eager and torch.compile, most important first).
# PYTHON=... picks the interpreter (default python3).
# Writes OUT_DIR (default gpu-check/): report.md (the report), logs.txt (every part's output),
# bench.jsonl and bench.md (the benchmark's figures and table); prints a one-screen summary last. The
# report and the logs are rewritten after every part (the part in flight writes OUT_DIR/running.log), so
# a check killed from outside still leaves what it had done.
# Exit status: 0 when every part passed, 1 otherwise (the report says which).
#
# --dry-run: the same script on a machine without a GPU, each part made small and CPU-only (pytest only
# collects the CUDA tests, the GPU runs become CPU runs, the benchmark uses a tiny model): it checks that
# every command parses and runs and that the report is written (tests/test_gpu_check.py does this).
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
BUDGET="${NPGPT_CHECK_SECONDS:-480}"
START=$(date +%s)
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/npgpt-gpu-check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
rm -f "$OUT/report.md" "$OUT/logs.txt" "$OUT/bench.jsonl" "$OUT/bench.md" "$OUT/running.log"
: >"$WORK/parts.tsv"

# Nothing may reach the network: pip only from the checkout, Hugging Face libraries offline (the torch
# twin builds GPT-2 from a config, no weights are fetched), npgpt's BPE ranks ship with the package.
export PYTHONUNBUFFERED=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export NPGPT_CACHE_DIR="$WORK/token-cache" MPLBACKEND=Agg
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"  # torch beside CuPy's pool
unset NPGPT_CUDA_KERNELS NPGPT_DEVICE NPGPT_DIST

left() { echo $((BUDGET - ($(date +%s) - START))); }

# run_part NAME BUDGET RESERVE COMMAND...: COMMAND under `timeout`, its output in $WORK/NAME.log; the
# limit is BUDGET seconds, or less so that RESERVE seconds (the least the later parts need) stay.
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
    (cd "$WORK" && timeout --kill-after=15 "$limit" "$@") >>"$log" 2>&1
    rc=$?
    mv -f "$log" "$WORK/$name.log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >>"$WORK/parts.tsv"
    if ((rc == 124 || rc == 137)); then
        echo "[gpu_check] $name: TIMED OUT after ${limit}s (its log so far is in logs.txt)"
    else
        echo "[gpu_check] $name: exit $rc in $(($(date +%s) - t0))s"
    fi
    interim_report
    return 0
}

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
        "$venv/bin/python" -m pip install --no-deps --no-index --no-build-isolation -e "$ROOT" &&
        (cd "$WORK" && "$venv/bin/python" -c "import npgpt.cli, npgpt.cuda.kernels; from npgpt.cuda.sources import kernel_dir; kernel_dir(); $CHECK_IMPORTS"); then
        echo "$venv/bin/python" >"$WORK/python"
        echo "installed: editable (pip -e, no deps, no index) in a venv over the system packages"
        return 0
    fi
    echo "the editable install failed; running from a copy of the package with its kernels on PYTHONPATH"
    rm -rf "$WORK/site" && mkdir -p "$WORK/site" && cp -r "$ROOT/npgpt" "$WORK/site/npgpt" &&
        rm -rf "$WORK/site/npgpt/kernels" && cp -r "$ROOT/kernels" "$WORK/site/npgpt/kernels" || return 1
    (cd "$WORK" && PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import npgpt.cli; from npgpt.cuda.sources import kernel_dir; kernel_dir(); $CHECK_IMPORTS") || return 1
    echo "$PY" >"$WORK/python"
    echo "fallback" >"$WORK/fallback"
    echo "installed: fallback, a copy of npgpt/ and kernels/ on PYTHONPATH"
}
# what the parts need besides npgpt: a Python that lacks them is no Python for this check
NEEDED="numpy tiktoken safetensors tqdm matplotlib pytest"
((DRY)) || NEEDED="$NEEDED cupy torch transformers ml_dtypes"
CHECK_IMPORTS="import ${NEEDED// /, }"
export -f install_npgpt
export WORK ROOT PY CHECK_IMPORTS NEEDED
run_part install 90 260 bash -c install_npgpt
if [[ ! -s "$WORK/python" ]]; then
    echo "[gpu_check] npgpt could not be installed or imported; see $OUT/logs.txt"
    cat "$WORK/install.log" 2>/dev/null
    "$PY" "$ROOT/benchmarks/gpu_check_tools.py" report "$WORK" "$OUT" >/dev/null 2>&1 || cp "$WORK/install.log" "$OUT/logs.txt"
    exit 1
fi
VPY="$(cat "$WORK/python")"
[[ -e "$WORK/fallback" ]] && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
echo "[gpu_check] python: $VPY ($("$VPY" -c 'import sys; print(sys.version.split()[0])'))"

# --- the parts ------------------------------------------------------------------------------------------------
if ((DRY)); then
    DEVICE=cpu
    PYTEST_ARGS=(-m cuda --collect-only -q)
    TEST_FILES=("$ROOT/tests")
    GRADCHECK_ARGS=(--device cpu --only "gelu")
    TRAIN_ARGS=(--device cpu --max-steps 2 --model-args "--emb-dim 32 --n-heads 2 --n-layers 1 --context-length 16")
    BENCH_ARGS=(--device cpu --preset nano --vocab-size 97 --emb-dim 32 --n-heads 2 --n-layers 1 --context-length 16
        --batch-sizes 2 --compile-batch-sizes --precisions fp32 bf16 --steps 1 --warmup 1)
else
    DEVICE=cuda
    export NPGPT_REQUIRE_CUDA=1  # a CUDA test that would skip fails instead, saying why CUDA is not usable
    PYTEST_ARGS=(-m cuda -v -rfE -p no:cacheprovider --durations=10)
    # The fast paths' own tests first and NCCL's (subprocesses under mpiexec) last, so a part that runs out
    # of time loses the least: pytest runs files in the order given (a folder would be alphabetical).
    FIRST=(test_cuda_blas.py test_cuda_kernels.py test_engine.py test_gpu_training.py)
    LAST=(test_distributed.py)
    TEST_FILES=()
    for f in "${FIRST[@]}"; do TEST_FILES+=("$ROOT/tests/$f"); done
    for f in "$ROOT"/tests/test_*.py; do
        case " ${FIRST[*]} ${LAST[*]} " in *" $(basename "$f") "*) ;; *) TEST_FILES+=("$f") ;; esac
    done
    for f in "${LAST[@]}"; do TEST_FILES+=("$ROOT/tests/$f"); done
    GRADCHECK_ARGS=(--device cuda)
    TRAIN_ARGS=(--device cuda --max-steps 20)
    BENCH_ARGS=(--device cuda)
fi

if command -v nvidia-smi >/dev/null; then
    run_part nvidia-smi 20 250 nvidia-smi
else  # a failure on a GPU machine; expected in a dry run
    echo "nvidia-smi: not found" >"$WORK/nvidia-smi.log"
    printf 'nvidia-smi\t%s\t0\t0\n' "$((DRY ? 0 : 127))" >>"$WORK/parts.tsv"
fi
run_part info 40 240 "$VPY" -m npgpt info --device "$DEVICE"
run_part pytest 170 160 "$VPY" -m pytest "${TEST_FILES[@]}" --rootdir "$ROOT" "${PYTEST_ARGS[@]}"
unset NPGPT_REQUIRE_CUDA
run_part gradcheck 45 130 "$VPY" -m npgpt gradcheck "${GRADCHECK_ARGS[@]}"
run_part train 75 80 "$VPY" "$ROOT/benchmarks/gpu_check_tools.py" train "$WORK" "${TRAIN_ARGS[@]}"
BENCH_SECONDS=$(($(left) - 30))
((BENCH_SECONDS < 30)) && BENCH_SECONDS=30
run_part bench $((BENCH_SECONDS + 20)) 10 "$VPY" "$ROOT/benchmarks/gpu_bench.py" --out "$OUT/bench.jsonl" \
    --deadline "$BENCH_SECONDS" "${BENCH_ARGS[@]}"

# --- the report, and the summary last ---------------------------------------------------------------------------
"$VPY" "$ROOT/benchmarks/gpu_check_tools.py" report "$WORK" "$OUT" || {
    echo "[gpu_check] the report could not be written; raw logs:"
    for f in "$WORK"/*.log; do echo "===== $f"; tail -n 20 "$f"; done | tee "$OUT/logs.txt"
}
echo "[gpu_check] $(($(date +%s) - START)) s in all; report: $OUT/report.md, logs: $OUT/logs.txt"
awk -F'\t' '$2 != 0 { bad = 1 } END { exit bad }' "$WORK/parts.tsv"
