"""The parts of benchmarks/gpu_check.sh that are easier in Python: the probe, the pytest parts in shards, the
training comparison, the report.

    python benchmarks/gpu_check_tools.py probe [--cpu] [--facts WORK_DIR/gpu.json]
    python benchmarks/gpu_check_tools.py pytest WORK_DIR PART [--shards auto|N] -- PYTEST_ARGS...
    python benchmarks/gpu_check_tools.py train WORK_DIR [--device cuda] [--max-steps 20]
    python benchmarks/gpu_check_tools.py report WORK_DIR OUT_DIR [--quiet]

`pytest` runs one pytest part as N pytest processes at once ("shards", benchmarks/gpu_shards.py), so that
a cold CuPy kernel cache is compiled on N cores: each is `python -m pytest PYTEST_ARGS -p gpu_shards`
with NPGPT_SHARD=i/N, its own --basetemp, its output in WORK_DIR/PART.shardI.log. --shards auto takes the
fewest processes that the plan says make the part end soonest, at most one per core and as many as the
GPU's free memory holds at gpu_shards.SHARD_GPU_GIB each (one, when the GPU's compute mode admits one
process), and gives each shard cores/N threads for NumPy and torch. It prints each shard's result as it
ends, checks that all shards collected the same tests, and exits with the worst shard's pytest status (0
when all passed). Stopped by a signal (the part's time limit), it stops its shards and says which ended.

`train` runs `npgpt train` on the nano preset (dropout off, the bundled story) once on the CPU (NumPy, the
reference) and on the GPU in five settings, all at once: float32 with TF32 off, the same with
NPGPT_CUDA_KERNELS=all, TF32, bf16, and bf16 with NPGPT_CUDA_KERNELS=all (which leaves bmm). It prints, per
setting, the largest relative difference of the step losses from the CPU's and whether it is within the
setting's bound (those of tests/test_gpu_training.py), and writes them to WORK_DIR/train.json.

`probe` tries once what every later part needs (issue 25): bfloat16 on the host, CuPy, a device, a first
kernel compile (the CUDA headers), bfloat16 on the GPU; the first failure is one line, "PROBE FAILED: ...",
naming what is missing, and exit status 1 (gpu_check.sh then stops). With --facts it writes the GPU's
free memory and compute mode there, for `pytest --shards auto`.

`report` reads what gpu_check.sh left in WORK_DIR (parts.tsv: one line per part with its exit code,
seconds and time limit; PART.log: each part's output, and PART.shardI.log each shard's; PART.shards.json:
how a pytest part was split; train.json; compile.jsonl: the kernel compile time of each Python process,
from gpu_compile_timer.py) and in OUT_DIR (bench.jsonl, bench.md from
gpu_bench.py), writes OUT_DIR/report.md and OUT_DIR/logs.txt (every log, in the order run), and prints
the one-screen summary: each part's result, seconds (and limit) and seconds compiling, which fast paths
the run verified (to turn on by default), the benchmark table, and the issue's targets. gpu_check.sh
runs it quietly after every part too, and when it is stopped by a signal, so that a check killed from
outside leaves a report of the parts that had ended (and names the others as not run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# --- the probe: what every later part needs, tried once ------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:240]}"


def _versions() -> str:
    import numpy as np

    try:
        import ml_dtypes

        ml = ml_dtypes.__version__
    except ImportError:
        ml = "not installed"
    return f"NumPy {np.__version__}, ml_dtypes {ml}"


def probe(args) -> int:
    """Issue 25 (5): a machine without the CUDA headers (CuPy compiles every kernel with NVRTC, which needs
    them) or with a NumPy / ml_dtypes too old for bfloat16 failed every later part separately. Each thing
    the parts need is tried here once, in order; the first that fails stops the check with one line
    naming what is missing and how to get it. --cpu (the dry run) tries the host's bfloat16 only."""
    import numpy as np

    def step(what, fn):
        t0 = time.perf_counter()
        try:
            detail = fn()
        except Exception as e:  # noqa: BLE001 (each becomes the one line below)
            return e
        print(f"  ok: {what} ({time.perf_counter() - t0:.1f} s){': ' + detail if detail else ''}", flush=True)
        return None

    def host_bf16():
        import ml_dtypes

        back = np.arange(3, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
        assert back.tolist() == [0.0, 1.0, 2.0], back
        return _versions()

    failure = step("bfloat16 on the host (ml_dtypes)", host_bf16)
    if failure is not None:
        what = ("ml_dtypes is not installed" if isinstance(failure, ImportError)
                else f"{_versions()} cannot cast to bfloat16 ({_first_line(failure)})")  # fmt: skip
        return _stop(f"{what}: pip install -U 'numpy>=2.1.2' 'ml_dtypes>=0.4' (npgpt's cuda12/cuda13 extras)")
    if args.cpu:
        return 0
    try:
        import cupy
    except Exception as e:  # noqa: BLE001
        return _stop(f"CuPy does not import ({_first_line(e)}): pip install 'npgpt[cuda12]' (or [cuda13])")
    failure = step("a CUDA device", lambda: f"{cupy.cuda.runtime.getDeviceCount()} device(s), CuPy {cupy.__version__}")
    if failure is not None:
        return _stop(f"CuPy imports but no CUDA device answered ({_first_line(failure)}): check the driver (nvidia-smi)")

    def kernel():
        x = cupy.zeros(1, dtype=cupy.float32)
        x += 1  # an elementwise kernel, compiled by NVRTC on first use: needs the CUDA headers
        assert float(x[0]) == 1.0, float(x[0])
        return "NVRTC compiled and ran an elementwise kernel"

    failure = step("a first kernel", kernel)
    if failure is not None:
        text = str(failure)
        headers = re.search(r"header|cannot open source file|\.h\b|include", text, re.I)
        what = ("the CUDA headers are missing, so no kernel compiles" if headers else "no kernel compiles or runs")
        return _stop(f"CuPy {cupy.__version__} {what} ({_first_line(failure)}): pip install 'cupy-cuda12x[ctk]' "
                     "(or -cuda13x[ctk]; npgpt's cuda12/cuda13 extras do), or point CUDA_PATH at a CUDA toolkit")  # fmt: skip

    def device_bf16():
        import ml_dtypes

        x = cupy.arange(3, dtype=cupy.float32).astype(ml_dtypes.bfloat16)
        assert x.dtype == np.dtype(ml_dtypes.bfloat16) and x.astype(cupy.float32).get().tolist() == [0.0, 1.0, 2.0]
        return _versions()

    failure = step("bfloat16 on the GPU", device_bf16)
    if failure is not None:
        return _stop(f"CuPy {cupy.__version__} cannot make bfloat16 arrays with {_versions()} ({_first_line(failure)}): "
                     "pip install -U 'numpy>=2.1.2' 'ml_dtypes>=0.4'")  # fmt: skip
    if getattr(args, "facts", None):
        try:
            write_facts(cupy, Path(args.facts))
        except Exception as e:  # noqa: BLE001 (the shards then go by the cores alone)
            print(f"  (the GPU's free memory and compute mode could not be read: {_first_line(e)})", flush=True)
    return 0


COMPUTE_MODES = {0: "default", 1: "exclusive thread", 2: "prohibited", 3: "exclusive process"}  # cudaComputeMode


def write_facts(cupy, path: Path) -> None:
    """What `pytest --shards auto` needs to know of the GPU: its free memory and its compute mode (in an
    exclusive mode a second process cannot use it), from CuPy's runtime (cupy_backends/cuda/api/runtime.pyx
    at v14.2.0: getDeviceProperties gives 'computeMode', line 246; memGetInfo, line 610)."""
    free, total = cupy.cuda.runtime.memGetInfo()
    mode = int(cupy.cuda.runtime.getDeviceProperties(0).get("computeMode", 0))
    facts = {"free_gib": round(free / 2**30, 1), "total_gib": round(total / 2**30, 1), "compute_mode": mode}
    path.write_text(json.dumps(facts) + "\n")
    print(f"  GPU memory free: {facts['free_gib']} of {facts['total_gib']} GiB; compute mode: "
          f"{COMPUTE_MODES.get(mode, mode)}", flush=True)  # fmt: skip


def _stop(line: str) -> int:
    print(f"PROBE FAILED: {line}", flush=True)
    return 1


# --- a pytest part in shards ----------------------------------------------------------------------------------


def shard_count(args, files: list) -> tuple:
    """(shards, why) for `pytest --shards`: a number as given, or for auto the fewest that make the part end
    soonest by the plan (gpu_shards.shards_needed), at most one per core, --most, and what the GPU takes."""
    if args.shards != "auto":
        return max(1, int(args.shards)), "as asked"
    import gpu_shards
    cores = len(os.sched_getaffinity(0))
    most, why = min(cores, args.most or cores), [f"{cores} cores"]
    facts_path = Path(args.work) / "gpu.json"
    facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}
    if facts.get("compute_mode", 0) in (1, 2, 3):
        most = 1
        why.append(f"the GPU's compute mode is {COMPUTE_MODES[facts['compute_mode']]}: one process at a time")
    elif "free_gib" in facts:
        fit = max(1, int(facts["free_gib"] * 0.9 // gpu_shards.SHARD_GPU_GIB))
        most = min(most, fit)
        why.append(f"{facts['free_gib']} GiB of GPU memory free holds {fit} at {gpu_shards.SHARD_GPU_GIB:.0f} GiB each")
    if args.most:
        why.append(f"at most {args.most} for this part")
    table = gpu_shards.Table.load()
    names = [Path(f).name for f in files]
    ids = sorted((t for t in table.tests if t.split("::")[0] in names), key=lambda t: names.index(t.split("::")[0]))
    if not ids:
        return most, ", ".join(why + ["no test of this part in the kernel table"])
    n, sim = gpu_shards.shards_needed(ids, table, most)
    why.append(f"the plan: {sim['makespan_s']:.0f} s with {n} for the {len(ids)} tests it knows")
    return n, ", ".join(why)


def _outcomes(log: Path) -> str:
    counts = {}
    for outcome in pytest_results(log).values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return ", ".join(f"{v} {k.lower()}" for k, v in counts.items()) or "no test ended"


class _Stopped(Exception):
    pass


def _stop_on(signum, frame):
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # `timeout` signals the process and then its group:
        signal.signal(sig, signal.SIG_IGN)  # the second must not interrupt the stopping
    raise _Stopped(signum)


def pytest_shards(args) -> int:
    """Run one pytest part as shards (see the module's docstring); returns the worst shard's status."""
    work, part = Path(args.work), args.part
    pytest_args = args.pytest_args
    files = [a for a in pytest_args if a.endswith(".py")]
    n, why = shard_count(args, files)
    threads = str(max(1, len(os.sched_getaffinity(0)) // n))
    logs = f"its output: {part}.shard1.log" if n == 1 else f"their output: {part}.shard1.log ... {part}.shard{n}.log"
    print(f"[shards] {part}: {n} pytest process{'es at once' if n > 1 else ''} ({why}); {threads} NumPy/torch "
          f"thread(s) each; {logs}", flush=True)  # fmt: skip
    (work / "pytest-tmp").mkdir(parents=True, exist_ok=True)
    procs, codes, ended, stopped, t0 = [], [None] * n, {}, None, time.monotonic()
    old = {sig: signal.signal(sig, _stop_on) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        for i in range(1, n + 1):
            env = {**os.environ, "NPGPT_SHARD": f"{i}/{n}", "NPGPT_CHECK_SHARD": str(i),
                   "NPGPT_SHARD_RECORD": str(work / f"{part}.shard{i}.json")}  # fmt: skip
            env.pop("CUPY_CACHE_SAVE_CUDA_SOURCE", None)  # the one write to CuPy's cache that is not atomic (gpu_shards.py)
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env.setdefault(var, threads)  # n processes x all cores' threads each would crowd the compiles out
            cmd = [sys.executable, "-m", "pytest", *pytest_args, "-p", "gpu_shards",
                   "--basetemp", str(work / "pytest-tmp" / f"{part}-{i}")]  # fmt: skip
            (work / f"{part}.shard{i}.json").unlink(missing_ok=True)
            with open(work / f"{part}.shard{i}.log", "w") as log:
                log.write(f"$ NPGPT_SHARD={i}/{n} {' '.join(cmd)}\n")
                log.flush()
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        while None in codes:
            for i, p in enumerate(procs):
                if codes[i] is None and p.poll() is not None:
                    codes[i], ended[i] = p.returncode, time.monotonic() - t0
                    print(f"[shards] {part} shard {i + 1}/{n}: exit {codes[i]} after {ended[i]:.0f} s: "
                          f"{_outcomes(work / f'{part}.shard{i + 1}.log')}", flush=True)  # fmt: skip
            time.sleep(0.2)
    except _Stopped as e:
        stopped = e.args[0]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for i in range(n):
            if codes[i] is None:
                print(f"[shards] {part} shard {i + 1}/{n}: STOPPED after {time.monotonic() - t0:.0f} s: "
                      f"{_outcomes(work / f'{part}.shard{i + 1}.log')}", flush=True)  # fmt: skip
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    records = [work / f"{part}.shard{i}.json" for i in range(1, n + 1)]
    seen = [json.loads(r.read_text()) for r in records if r.exists()]
    (work / f"{part}.shards.json").write_text(json.dumps({
        "shards": n, "why": why, "seconds": round(time.monotonic() - t0, 1),
        "per_shard": [{"shard": i + 1, "exit": codes[i], "seconds": round(ended[i], 1) if i in ended else None,
                       "planned_tests": next((r["tests"] for r in seen if r["shard"] == i + 1), None)}
                      for i in range(n)]}) + "\n")  # fmt: skip
    if stopped is not None:
        return 128 + stopped
    digests = {r["digest"] for r in seen}
    if len(digests) > 1 or (len(seen) < n and any(c in (0, 1) for c in codes)):
        print(f"[shards] {part}: the shards did not collect the same tests ({len(seen)} of {n} said what they "
              f"collected, {len(digests)} different lists): a test may have run twice or not at all", flush=True)  # fmt: skip
        return 3
    bad = [c for c in codes if c not in (0, 5)]
    status = max(bad) if bad else (5 if all(c == 5 for c in codes) else 0)
    results = {}
    for i in range(1, n + 1):
        results.update(pytest_results(work / f"{part}.shard{i}.log"))
    counts = ", ".join(f"{list(results.values()).count(o)} {o.lower()}" for o in ("PASSED", "FAILED", "ERROR", "SKIPPED")
                       if o in results.values())  # fmt: skip
    print(f"[shards] {part}: exit {status} in {time.monotonic() - t0:.0f} s: {counts or 'no test ran'}", flush=True)
    return status


# --- the training comparison ----------------------------------------------------------------------------

# name -> (extra `npgpt train` arguments, environment, bound on max |loss / cpu loss - 1| over 20 steps)
SETTINGS = {
    "fp32": (["--no-tf32"], {"NPGPT_CUDA_KERNELS": "none"}, 1e-4),
    "fp32 kernels=all": (["--no-tf32"], {"NPGPT_CUDA_KERNELS": "all"}, 1e-4),
    "tf32": (["--tf32"], {"NPGPT_CUDA_KERNELS": "none"}, 5e-3),
    "bf16": (["--precision", "bf16"], {"NPGPT_CUDA_KERNELS": "none"}, 5e-3),
    "bf16 kernels=all": (["--precision", "bf16"], {"NPGPT_CUDA_KERNELS": "all"}, 5e-3),
}
TRAIN_ARGS = ["--preset", "nano", "--drop-rate", "0", "--batch-size", "4", "--lr", "1e-3", "--no-progress",
              "--sample-tokens", "2", "--eval-batches", "1", "--overwrite"]  # fmt: skip


def step_losses(run_dir: Path) -> list:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if r.get("kind") == "step"]


def train_run(work: Path, name: str, device: str, args: list, env: dict, steps: int, threads: str = "") -> dict:
    out = work / "train" / re.sub(r"\W+", "-", name)
    cmd = [sys.executable, "-m", "npgpt", "train", *TRAIN_ARGS, "--max-steps", str(steps), "--eval-interval", str(steps),
           "--device", device, "--out-dir", str(out), *args]  # fmt: skip
    shared = {var: os.environ.get(var, threads) for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if threads}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **shared, **env})
    run = {"command": " ".join(cmd[1:]), "env": env, "seconds": round(time.perf_counter() - t0, 1), "exit": proc.returncode}
    if proc.returncode:
        run["error"] = (proc.stderr.strip().splitlines() or ["(no message)"])[-1][:300]
        print(f"--- {name}:", proc.stdout[-2000:], proc.stderr[-3000:], sep="\n", flush=True)
    else:
        run["losses"] = step_losses(out)
    return run


def train(args) -> int:
    """The six runs at once (as many as there are cores): on a GPU machine with a cold kernel cache each
    setting compiles its own kernels, and one after another they would take six times as long."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    work = Path(args.work)
    steps = args.max_steps
    model = args.model_args.split()
    runs = {"cpu": ("cpu", ["--no-tf32", *model], {})}
    runs.update((name, (args.device, [*extra, *model], env)) for name, (extra, env, _) in SETTINGS.items())
    cores = len(os.sched_getaffinity(0))
    workers = max(1, min(len(runs), cores))
    print(f"npgpt train --preset nano, {steps} steps: the CPU (NumPy) against {args.device} in {len(SETTINGS)} settings, "
          f"{workers} at a time", flush=True)  # fmt: skip
    results = {}
    with ThreadPoolExecutor(workers) as pool:
        jobs = {pool.submit(train_run, work, name, device, extra, env, steps, str(max(1, cores // workers))): name
                for name, (device, extra, env) in runs.items()}  # fmt: skip
        for job in as_completed(jobs):
            run = results[jobs[job]] = job.result()
            print(f"  ended: {jobs[job]} (exit {run['exit']}, {run['seconds']:.1f} s)", flush=True)
    ref = results["cpu"]
    print(f"  {'cpu (reference)':22s} {'exit ' + str(ref['exit']):8s} {ref['seconds']:6.1f} s", flush=True)
    worst = 0
    for name, (_, _, bound) in SETTINGS.items():
        run = results[name]
        run["bound"] = bound
        if "losses" in run and "losses" in ref and len(run["losses"]) == len(ref["losses"]) == steps:
            run["max_rel_diff"] = max(abs(a / b - 1) for a, b in zip(run["losses"], ref["losses"]))
            run["ok"] = run["max_rel_diff"] <= bound
            verdict = f"max rel diff {run['max_rel_diff']:.1e} (bound {bound:.0e}): " + ("ok" if run["ok"] else "TOO FAR")
        else:
            run["ok"] = False
            verdict = "FAILED: " + run.get("error", f"{len(run.get('losses', []))} step losses")
        worst = max(worst, 0 if run["ok"] else 1)
        print(f"  {name:22s} {'exit ' + str(run['exit']):8s} {run['seconds']:6.1f} s  {verdict}", flush=True)
    (work / "train.json").write_text(json.dumps({"cpu": ref, **{n: results[n] for n in SETTINGS}}, indent=1))
    return worst


# --- the report ----------------------------------------------------------------------------------------------

PARTS = {  # the log name gpu_check.sh gives each part -> what the report calls it
    "install": "install npgpt (no network)",
    "probe": "probe: a first kernel, bfloat16",
    "nvidia-smi": "nvidia-smi",
    "info": "npgpt info",
    "pytest-core": "pytest -m cuda: layers, engine, kernels, cuBLAS, training",
    "pytest-more": "pytest -m cuda: gradients, encoder-decoder, fine-tuning, bench",
    "pytest-nccl": "pytest -m cuda: NCCL (test_distributed)",
    "train": "20 training steps, CuPy against NumPy",
    "bench": "benchmark table (gpu_bench.py)",
}
PYTEST_PARTS = ("pytest-core", "pytest-more", "pytest-nccl")
# Each fast path (npgpt.cuda.KERNEL_NAMES) and the CUDA tests that exercise it, by test id. A path counts as
# verified when its own tests ran and passed, a whole-step test or a training run with it on passed too, and
# nothing that exercised it failed (its tests, those whole-step tests and runs, the benchmark's kernels twin).
FAST_PATH_TESTS = {
    "layernorm": r"test_cuda_kernels\.py::test_layernorm",
    "gelu": r"test_cuda_kernels\.py::test_gelu",
    "cross_entropy": r"test_cuda_kernels\.py::test_cross_entropy",
    "adamw": r"test_cuda_kernels\.py::test_adamw",
    "sq_norm": r"test_cuda_kernels\.py::test_sq_norm",
    "attention": r"test_cuda_kernels\.py::test_attention\[",
    "attention_softmax": r"test_cuda_attention_softmax\.py::",
    "bmm": r"test_cuda_blas\.py::(test_bmm|test_matmul_where_needed|test_constants)",
}
ENGINE_TESTS = {  # whole-step and training tests that cover a fast path together with the others
    "kernels": r"(test_engine\.py::test_cuda_engine_with_its_kernels_matches_numpy\[all\]"
               r"|test_engine\.py::test_cuda_engine_in_16_bits_matches_numpy\[all-"
               r"|test_gpu_training\.py::test_cupy_training_with_the_fast_paths_tracks_numpy\[all\])",
    "bmm": r"(test_engine\.py::test_cuda_engine_with_its_kernels_matches_numpy\[kernels0\]|test_engine\.py::"
           r"test_cuda_engine_in_16_bits|test_gpu_training\.py::test_cupy_training_with_the_fast_paths_tracks_numpy\[bmm\])",
}
# A `pytest -v` result line. gpu_check.sh runs pytest from its work directory on the checkout's test files,
# so pytest writes each test's path relative to that directory ("../../repo/tests/test_x.py::t PASSED"):
# the id is taken from "tests/" on.
RESULT = re.compile(r"^(?:\S*/)?(tests/test_[^/\s]+\.py::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def _compile_records(work: Path) -> list:
    path, out = work / "compile.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("timed"):
            out.append(r)
    return out


def compile_seconds(work: Path) -> dict:
    """part -> (seconds NVRTC compiled, kernels compiled), summed over the part's Python processes, from
    the lines gpu_compile_timer.py leaves in WORK/compile.jsonl (absent: not timed)."""
    out = {}
    for r in _compile_records(work):
        s, n = out.get(r.get("part", ""), (0.0, 0))
        out[r.get("part", "")] = (s + r.get("nvrtc_s", 0.0), n + r.get("nvrtc_n", 0))
    return out


def compile_by_shard(work: Path) -> dict:
    """part -> shard -> seconds NVRTC compiled in that shard's processes (the parts run in shards only)."""
    out = {}
    for r in _compile_records(work):
        if r.get("shard"):
            shards = out.setdefault(r.get("part", ""), {})
            shards[r["shard"]] = shards.get(r["shard"], 0.0) + r.get("nvrtc_s", 0.0)
    return out


def part_logs(work: Path, name: str) -> list:
    """A part's log, then its shards' logs in shard order (gpu_check_tools.py pytest)."""
    shards = sorted(work.glob(f"{name}.shard*.log"), key=lambda p: int(re.sub(r"\D", "", p.name.rsplit(".shard", 1)[1]) or 0))
    return [work / f"{name}.log", *shards]


def shard_plan(work: Path, name: str) -> dict:
    path = work / f"{name}.shards.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}


def read_parts(work: Path) -> list:
    parts = []
    tsv = work / "parts.tsv"
    for line in tsv.read_text().splitlines() if tsv.exists() else []:
        name, rc, secs, limit = (line.split("\t") + ["", "", "", ""])[:4]
        parts.append({"name": name, "rc": int(rc or -1), "seconds": int(secs or 0), "limit": int(limit or 0),
                      "log": work / f"{name}.log"})  # fmt: skip
    return parts


def pytest_results(*logs: Path) -> dict:
    """test id -> outcome, from the `pytest -v` lines of these logs (they are written as each test ends, so
    a run that was stopped by its time limit still gives the tests that finished)."""
    results = {}
    for log in logs:
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            m = RESULT.match(line)
            if m:
                results[m.group(1)] = m.group(2)
    return results


def fast_path_verdicts(tests: dict, train: dict, bench: list) -> dict:
    """Per fast path: the evidence this run gathered and whether it all passed."""
    verdicts = {}
    engine = {k: [o for t, o in tests.items() if re.search(p, t)] for k, p in ENGINE_TESTS.items()}
    for path, pattern in FAST_PATH_TESTS.items():
        own = [o for t, o in tests.items() if re.search(pattern, t)]
        whole = engine["bmm" if path == "bmm" else "kernels"]
        runs = [r for n, r in train.items() if "kernels=all" in n]  # every path is on in those
        ran = [o for o in own + whole if o in ("PASSED", "FAILED", "ERROR")]
        bad = [o for o in own + whole if o in ("FAILED", "ERROR")] + [r for r in runs if not r.get("ok")]
        bench_failed = [u for u in bench if u.get("twins", {}).get("npgpt+kernels", {}).get("error")]
        evidence = (f"{own.count('PASSED')}/{len(own)} of its tests passed; whole-step test "
                    f"{'/'.join(whole) or 'not run'}; training with kernels=all "
                    f"{'ok' if runs and all(r.get('ok') for r in runs) else 'not ok' if runs else 'not run'}")  # fmt: skip
        if bench_failed:
            evidence += f"; the npgpt+kernels twin failed in {len(bench_failed)} benchmark unit(s)"
        whole_ok = "PASSED" in whole or (runs and all(r.get("ok") for r in runs))
        verdicts[path] = {"verified": bool(ran) and not bad and not bench_failed and own.count("PASSED") > 0 and bool(whole_ok),
                          "evidence": evidence}  # fmt: skip
    return verdicts


def read_bench(out: Path) -> list:
    path = out / "bench.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def targets(bench: list) -> list:
    """The issue's targets on 124M at 16 x 1024: npgpt TF32 >= torch eager TF32 tokens/s; bf16 >= 40% MFU."""
    lines = []
    for u in bench:
        if u.get("kind") != "unit" or u.get("B") != 16 or u.get("T") != 1024 or "twins" not in u:
            continue
        tw = u["twins"]
        best = max((tw[n] for n in ("npgpt", "npgpt+kernels") if "tokens_per_s" in tw.get(n, {})),
                   key=lambda r: r["tokens_per_s"], default=None)  # fmt: skip
        if best is None:
            continue
        if u["precision"] == "tf32" and "tokens_per_s" in tw.get("torch eager", {}):
            ratio = best["tokens_per_s"] / tw["torch eager"]["tokens_per_s"]
            lines.append(f"npgpt TF32 >= PyTorch eager TF32 (16x1024): {ratio:.2f}x -> {'met' if ratio >= 1 else 'not met'}")
        if u["precision"] == "bf16" and best.get("mfu") is not None:
            lines.append(f"npgpt bf16 >= 40% MFU (16x1024): {100 * best['mfu']:.1f}% -> {'met' if best['mfu'] >= 0.4 else 'not met'}")
    return lines


def part_result(part: dict, tests: dict, train: dict) -> str:
    rc, name = part["rc"], part["name"]
    if rc in (124, 137):
        head = f"TIMED OUT at {part['limit']} s"
    elif rc == 143:
        head = "KILLED (the check was stopped from outside)"
    elif rc == 0:
        head = "ok"
    else:
        head = f"exit {rc}"
    log = part["log"].read_text(errors="replace") if part["log"].exists() else ""
    if name in PYTEST_PARTS:
        logs = part_logs(part["log"].parent, name)
        mine = pytest_results(*logs)
        counts = {o: list(mine.values()).count(o) for o in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
        head += ": " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v)
        text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
        collected = re.findall(r"^=*\s*(\d+(?:/\d+)? tests? collected[^=]*?)\s*=*$", text, re.M)
        if not mine and collected:
            head += collected[-1]  # (head ends with ": " here)
        shards = shard_plan(part["log"].parent, name).get("shards") or (len(logs) - 1)
        if shards > 1:
            head += f" ({shards} shards)"
    elif name == "probe":
        failed = re.findall(r"^PROBE FAILED: (.*)$", log, re.M)
        head += f": {failed[-1]}" if failed else ""
    elif name == "train" and train:
        ok = sum(1 for k, r in train.items() if k != "cpu" and r.get("ok"))
        head += f": {ok}/{len(train) - 1} GPU settings track the CPU"
    elif name == "nvidia-smi":
        m = re.search(r"\|\s+\d+\s+(NVIDIA [^|]*?)\s{2,}", log)
        head += f": {m.group(1).strip()}" if m else ""
    elif name == "install":
        head += ": " + (log.strip().splitlines() or [""])[-1][:100]
    return head


def report(args) -> int:
    work, out = Path(args.work), Path(args.out)
    parts = read_parts(work)
    tests = {}
    for name in PYTEST_PARTS:
        tests.update(pytest_results(*part_logs(work, name)))
    compiles, by_shard = compile_seconds(work), compile_by_shard(work)
    train_path = work / "train.json"
    train_runs = json.loads(train_path.read_text()) if train_path.exists() else {}
    bench = read_bench(out)
    machine = bench[0] if bench and bench[0].get("kind") == "machine" else {}
    smi = work / "nvidia-smi.log"
    m = re.search(r"\|\s+\d+\s+(NVIDIA [^|]*?)\s{2,}", smi.read_text(errors="replace")) if smi.exists() else None
    if "gpu" not in machine and m:  # the benchmark did not get to describe the machine
        machine = {**machine, "gpu": m.group(1).strip()}
    verdicts = fast_path_verdicts(tests, train_runs, bench[1:])
    table = (out / "bench.md").read_text().strip() if (out / "bench.md").exists() else "(no benchmark units ran)"
    failed = [t for t, o in tests.items() if o in ("FAILED", "ERROR")]

    summary = ["# npgpt GPU check", "",
               f"GPU: {machine.get('gpu', 'unknown')}, {machine.get('memory_gib', '?')} GiB; CuPy {machine.get('cupy', '?')} "
               f"(CUDA runtime {machine.get('cuda_runtime', '?')}, driver {machine.get('driver', '?')}); "
               f"PyTorch {machine.get('torch', '?')}; Python {machine.get('python', '?')}; {time.strftime('%Y-%m-%d %H:%M')}.", "",
               "| part | result | seconds (limit) | of which compiling kernels |", "| --- | --- | ---: | ---: |"]  # fmt: skip
    for p in parts:
        comp, shards = compiles.get(p["name"]), by_shard.get(p["name"], {})
        if comp and len(shards) > 1:  # compiled at once in several processes: the longest is what the part waited
            comp = f"{comp[0]:.0f} s in {len(shards)} shards, the longest {max(shards.values()):.0f} s ({comp[1]} kernels)"
        else:
            comp = f"{comp[0]:.0f} s ({comp[1]} kernels)" if comp else ""
        summary.append(f"| {PARTS.get(p['name'], p['name'])} | {part_result(p, tests, train_runs)} | "
                       f"{p['seconds']} ({p['limit']}) | {comp} |")  # fmt: skip
    done = {p["name"] for p in parts}
    for name, title in PARTS.items():
        if name not in done:  # the check was stopped before it (or is still running: an interim report)
            summary.append(f"| {title} | not run | | |")
    timed_out = [p["name"] for p in parts if p["name"] in PYTEST_PARTS and p["rc"] in (124, 137)]
    if timed_out:
        n = sum(compiles.get(name, (0, 0))[1] for name in timed_out)
        secs = sum(compiles.get(name, (0, 0))[0] for name in timed_out)
        shards = sum(len(by_shard.get(name, {})) for name in timed_out)
        secs = f"{secs:.0f} s" + (f" in {shards} shards at once" if shards > len(timed_out) else "")
        summary += ["", f"{', '.join(timed_out)} ran out of time after compiling {n} kernels ({secs}): CuPy keeps "
                    "them in its kernel cache (~/.cupy/kernel_cache), so running the check again on this machine gets "
                    "further (docs/benchmarks.md, \"Where the limits come from\")."]  # fmt: skip
    if failed:
        summary += ["", "Failed tests:"] + [f"- {t}" for t in failed[:30]] + ([f"- ... {len(failed) - 30} more"] if len(failed) > 30 else [])
    on = sorted(k for k, v in verdicts.items() if v["verified"])
    summary += ["", "## Fast paths", "",
                "Verified by this run (to turn on by default: DEFAULT_ON in npgpt/cuda/__init__.py): "
                + (", ".join(on) if on else "none"), "", "| fast path | verified | evidence |", "| --- | --- | --- |"]  # fmt: skip
    for k, v in verdicts.items():
        summary.append(f"| {k} | {'yes' if v['verified'] else 'NO'} | {v['evidence']} |")
    if train_runs:
        summary += ["", "## Training, CuPy against NumPy", "", "| setting | max relative loss difference | bound | ok |",
                    "| --- | ---: | ---: | --- |"]  # fmt: skip
        for name, r in train_runs.items():
            if name != "cpu":
                diff = f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else r.get("error", "no losses")[:80]
                summary.append(f"| {name} | {diff} | {r.get('bound', 0):.0e} | {'yes' if r.get('ok') else 'NO'} |")
    summary += ["", "## Benchmark (124M)", "", table, ""] + [f"- {t}" for t in targets(bench[1:])]
    text = "\n".join(summary) + "\n"
    (out / "report.md").write_text(text)
    with (out / "logs.txt").open("w") as f:
        for p in parts:
            f.write(f"\n===== {p['name']}: exit {p['rc']} in {p['seconds']} s (limit {p['limit']} s) =====\n")
            f.write(p["log"].read_text(errors="replace") if p["log"].exists() else "(no log)\n")
            for shard in part_logs(work, p["name"])[1:]:
                f.write(f"\n===== {p['name']}, {shard.name.rsplit('.', 1)[0].rsplit('.', 1)[1]} =====\n")
                f.write(shard.read_text(errors="replace"))
    if not args.quiet:
        print(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="20 training steps on the GPU in five settings against the CPU")
    t.add_argument("work")
    t.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    t.add_argument("--max-steps", type=int, default=20)
    t.add_argument("--model-args", default="", help="more `npgpt train` arguments, e.g. a smaller model for a dry run")
    pr = sub.add_parser("probe", help="what every part needs (a kernel compile, bfloat16), tried once")
    pr.add_argument("--cpu", action="store_true", help="the dry run: the host's bfloat16 only")
    pr.add_argument("--facts", help="write the GPU's free memory and compute mode here (JSON)")
    p = sub.add_parser("pytest", help="one pytest part as several pytest processes at once")
    p.add_argument("work")
    p.add_argument("part")
    p.add_argument("--shards", default="auto", help="how many processes, or auto (default)")
    p.add_argument("--most", type=int, default=0, help="with auto: at most this many")
    p.epilog = "after --: pytest's arguments and files, passed to every shard"
    r = sub.add_parser("report", help="write OUT/report.md and OUT/logs.txt, print the summary")
    r.add_argument("work")
    r.add_argument("out")
    r.add_argument("--quiet", action="store_true", help="write the files, print nothing (the interim reports)")
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []  # pytest's arguments, for `pytest`
    args = ap.parse_args(argv[: len(argv) - len(rest) - 1] if "--" in argv else argv)
    args.pytest_args = rest
    return {"train": train, "probe": probe, "pytest": pytest_shards, "report": report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
