"""benchmarks/gpu_check.sh, gpu_bench.py and gpu_check_tools.py (issue 13's prepared GPU check), on the CPU:
the scripts parse, the benchmark driver's logic (units, alternation, the deadline, the table) runs on a
tiny model, the report reads the verdicts right from the logs a GPU run leaves, and the whole check runs
end to end in its dry-run mode."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_bench  # noqa: E402
import gpu_check_tools  # noqa: E402

TINY = ["--device", "cpu", "--preset", "nano", "--vocab-size", "97", "--emb-dim", "32", "--n-heads", "2", "--n-layers", "1",
        "--context-length", "16", "--steps", "1", "--warmup", "1"]  # fmt: skip


def test_the_shell_script_parses_and_explains_itself():
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "NPGPT_CHECK_SECONDS" in proc.stdout
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


def test_the_plan_puts_the_important_units_first():
    units = gpu_bench.plan([16, 8], ["tf32", "bf16", "fp32"], [16, 8])
    assert units[:3] == [(16, p, ("npgpt", "npgpt+kernels", "torch eager")) for p in ("tf32", "bf16", "fp32")]
    assert [u[0] for u in units[3:6]] == [8, 8, 8]
    assert all("torch.compile" in u[2] for u in units[6:]) and [u[0] for u in units[6:]] == [16] * 3 + [8] * 3


def test_bench_driver_on_the_cpu(tmp_path, capsys):
    """Every twin of a unit starts from the same weights and batch (equal first losses: npgpt against torch
    eager in float32 to 1e-5), and each unit's record is on disk with the table beside it."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("ml_dtypes")
    out = tmp_path / "bench.jsonl"
    assert gpu_bench.main([*TINY, "--out", str(out), "--batch-sizes", "2", "--compile-batch-sizes",
                           "--precisions", "fp32", "bf16", "--steps", "2"]) == 0  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["kind"] == "machine" and records[0]["device"] == "cpu"
    units = records[1:]
    assert [(u["B"], u["precision"]) for u in units] == [(2, "fp32"), (2, "bf16")]  # no TF32 on a CPU
    for u in units:
        tw = u["twins"]
        assert set(tw) == {"npgpt", "npgpt+kernels", "torch eager"}
        assert all(r["error"] is None and r["timed_steps"] == 2 and len(r["losses"]) == 3 for r in tw.values()), tw
        tol = 1e-5 if u["precision"] == "fp32" else 2e-3
        assert tw["npgpt"]["losses"][0] == pytest.approx(tw["torch eager"]["losses"][0], rel=tol)
        assert tw["npgpt"]["losses"] == tw["npgpt+kernels"]["losses"]  # on the CPU the kernels setting changes nothing
    table = (tmp_path / "bench.md").read_text()
    assert "| 2 x 16 | fp32 |" in table and "| 2 x 16 | bf16 |" in table
    assert "[gpu_bench] B=2 fp32" in capsys.readouterr().out


def test_bench_driver_skips_what_the_deadline_leaves_no_time_for(tmp_path):
    out = tmp_path / "bench.jsonl"
    assert gpu_bench.main([*TINY, "--out", str(out), "--batch-sizes", "2", "--precisions", "fp32", "--deadline", "0"]) == 0
    units = [json.loads(line) for line in out.read_text().splitlines()][1:]
    assert units and all(u["skipped"].startswith("out of time") for u in units)
    assert "skipped (time)" in (tmp_path / "bench.md").read_text()


def test_a_failing_twin_is_recorded_and_the_others_go_on():
    class Boom:
        def __call__(self, *a):
            raise RuntimeError("out of memory allocating 5 GiB")

    class Fine:
        def __call__(self, *a):
            return 3.0

    twins = [gpu_bench.Twin("npgpt"), gpu_bench.Twin("torch eager")]
    twins[0].step, twins[1].step = Boom(), Fine()
    for twin in twins:
        gpu_bench.time_twin(twin, None, None, 1, 2, __import__("numpy"), 0)
    assert twins[0].error == "RuntimeError: out of memory allocating 5 GiB" and twins[0].step is None
    assert twins[1].losses == [3.0] * 3 and len(twins[1].times) == 2
    assert gpu_bench._cell(twins[0].result(1e9, 10, None)) == "failed: RuntimeError"


def test_the_twins_of_a_unit_live_one_at_a_time(monkeypatch):
    """Issue 25 (6): at B=16, T=1024 the three 124M twins held at once needed ~70 of 80 GiB. Each twin is
    now built, timed and freed (its step dropped, the pools emptied) before the next is built."""
    events = []

    class Step:
        def __init__(self, name):
            self.name = name

        def __call__(self, *a):
            events.append(("step", self.name))
            return 1.0

    def build(name, *a):
        assert all(not t.step for t in built), "a twin was built while another was still alive"
        twin = gpu_bench.Twin(name)
        twin.step = Step(name)
        built.append(twin)
        events.append(("build", name))
        return twin

    built = []
    monkeypatch.setattr(gpu_bench, "build_twin", build)
    monkeypatch.setattr(gpu_bench, "free_memory", lambda device: events.append(("free", device)))
    twins = gpu_bench.run_unit(["npgpt", "npgpt+kernels", "torch eager"], None, None, 2, 8, "fp32", "cpu", None, None,
                               1, 1, __import__("numpy"), 0)  # fmt: skip
    assert [t.name for t in twins] == ["npgpt", "npgpt+kernels", "torch eager"]
    assert events == [e for n in ("npgpt", "npgpt+kernels", "torch eager")
                      for e in (("build", n), ("step", n), ("step", n), ("free", "cpu"))]  # fmt: skip
    assert all(t.step is None and t.losses == [1.0, 1.0] for t in twins)


def write_run(work: Path, out: Path, pytest_lines, train, units):
    """What gpu_check.sh leaves behind after a GPU run: parts.tsv, the logs, train.json, bench.jsonl."""
    work.mkdir()
    out.mkdir()
    parts = [("install", 0), ("probe", 0), ("nvidia-smi", 0), ("info", 0), ("pytest-core", 1), ("pytest-more", 0),
             ("pytest-nccl", 0), ("train", 0), ("bench", 0)]  # fmt: skip
    (work / "parts.tsv").write_text("".join(f"{n}\t{rc}\t3\t100\n" for n, rc in parts))
    for n, _ in parts:
        (work / f"{n}.log").write_text(f"$ {n}\n")
    (work / "pytest-core.log").write_text("\n".join(line for line in pytest_lines if "test_gradients" not in line) + "\n")
    (work / "pytest-more.log").write_text("\n".join(line for line in pytest_lines if "test_gradients" in line) + "\n")
    (work / "compile.jsonl").write_text(json.dumps({"part": "pytest-core", "timed": True, "nvrtc_s": 61.4, "nvrtc_n": 48})
                                        + "\n" + json.dumps({"part": "pytest-core", "timed": True, "nvrtc_s": 2.0,
                                                              "nvrtc_n": 2}) + "\n")  # fmt: skip
    (work / "nvidia-smi.log").write_text("|   0  NVIDIA H100 80GB HBM3          On  |   00000000:00:05.0 Off |\n")
    (work / "train.json").write_text(json.dumps(train))
    machine = {"kind": "machine", "gpu": "NVIDIA H100 80GB HBM3", "python": "3.12.3", "numpy": "2.5", "device": "cuda",
               "time": "now", "cupy": "14.2.0"}  # fmt: skip
    (out / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [machine, *units]))
    (out / "bench.md").write_text(gpu_bench.table([machine, *units]))


def unit(precision, npgpt, kernels, eager, mfu=None):
    r = lambda tps: {"error": None, "losses": [10.9], "tokens_per_s": tps, "ms": 1.0, "mfu": mfu}  # noqa: E731
    return {"kind": "unit", "B": 16, "T": 1024, "precision": precision,
            "twins": {"npgpt": r(npgpt), "npgpt+kernels": r(kernels), "torch eager": r(eager)}}  # fmt: skip


def test_report_reads_the_verdicts_from_a_gpu_run(tmp_path, capsys):
    """A made-up GPU run: one LayerNorm test failed, everything else passed. LayerNorm must not be
    recommended, the others must; the targets are read off the B=16 units."""
    lines = [
        "tests/test_cuda_kernels.py::test_layernorm_fwd[cupy-3-64] FAILED [  1%]",
        "tests/test_cuda_kernels.py::test_layernorm_bwd[cupy-3-64-False] PASSED [  2%]",
        "tests/test_cuda_kernels.py::test_gelu_bwd[cupy-4-32-row] PASSED [  3%]",
        "tests/test_cuda_kernels.py::test_cross_entropy[cupy-3-50-True] PASSED [  4%]",
        "tests/test_cuda_kernels.py::test_adamw_flat[cupy-100-True] PASSED [  5%]",
        "tests/test_cuda_kernels.py::test_sq_norm[cupy-100] PASSED [  6%]",
        "tests/test_cuda_kernels.py::test_attention[cupy-1-2-16-16-16-False] PASSED [  7%]",
        "tests/test_cuda_blas.py::test_bmm_matches_numpy[bf16] PASSED [  8%]",
        "tests/test_engine.py::test_cuda_engine_with_its_kernels_matches_numpy[all] PASSED [  9%]",
        "tests/test_engine.py::test_cuda_engine_with_its_kernels_matches_numpy[kernels0] PASSED [ 10%]",
        "tests/test_gradients.py::test_cupy_matches_numpy[float32-gelu] SKIPPED (x) [ 11%]",
    ]
    train = {"cpu": {"exit": 0}, "fp32": {"ok": True, "max_rel_diff": 2e-7, "bound": 1e-4},
             "fp32 kernels=all": {"ok": True, "max_rel_diff": 3e-7, "bound": 1e-4}}  # fmt: skip
    units = [unit("tf32", 90_000, 120_000, 100_000), unit("bf16", 150_000, 160_000, 170_000, mfu=0.42)]
    work, out = tmp_path / "work", tmp_path / "out"
    write_run(work, out, lines, train, units)
    assert gpu_check_tools.main(["report", str(work), str(out)]) == 0
    text = (out / "report.md").read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    assert "(to turn on by default: DEFAULT_ON in npgpt/cuda/__init__.py): adamw, attention, bmm, cross_entropy, gelu, sq_norm" in text
    assert "| layernorm | NO | 1/2 of its tests passed" in text
    assert "| pytest -m cuda: layers, engine, kernels, cuBLAS, training | exit 1: 9 passed, 1 failed | 3 (100) | 63 s (50 kernels) |" in text
    assert "| pytest -m cuda: gradients, encoder-decoder, fine-tuning, bench | ok: 1 skipped | 3 (100) |  |" in text
    assert "- tests/test_cuda_kernels.py::test_layernorm_fwd[cupy-3-64]" in text
    assert "npgpt TF32 >= PyTorch eager TF32 (16x1024): 1.20x -> met" in text
    assert "npgpt bf16 >= 40% MFU (16x1024): 42.0% -> met" in text
    assert "GPU: NVIDIA H100 80GB HBM3" in text
    logs = (out / "logs.txt").read_text()
    assert logs.index("===== install") < logs.index("===== pytest-core") < logs.index("===== bench")


def test_the_report_reads_pytest_run_as_the_check_runs_it(tmp_path):
    """gpu_check.sh runs pytest -v from its work directory on the checkout's test files (by absolute path,
    --rootdir the checkout): the outcomes are read from that real output, whatever path prefix pytest
    gives the ids."""
    repo, work = tmp_path / "repo", tmp_path / "tmp" / "work"
    (repo / "tests").mkdir(parents=True)
    work.mkdir(parents=True)
    (repo / "tests" / "test_cuda_kernels.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "def test_gelu(n):\n    assert n == 1\n"
        "def test_sq_norm():\n    pytest.skip('why')\n"
    )
    proc = subprocess.run([sys.executable, "-m", "pytest", str(repo / "tests" / "test_cuda_kernels.py"), "--rootdir", str(repo),
                           "-v", "-rfE", "-p", "no:cacheprovider"], cwd=work, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    log = work / "pytest.log"
    log.write_text(proc.stdout)
    assert gpu_check_tools.pytest_results(log) == {
        "tests/test_cuda_kernels.py::test_gelu[1]": "PASSED",
        "tests/test_cuda_kernels.py::test_gelu[2]": "FAILED",
        "tests/test_cuda_kernels.py::test_sq_norm": "SKIPPED",
    }


def test_a_timed_out_pytest_still_counts_the_tests_that_finished(tmp_path):
    lines = ["tests/test_cuda_blas.py::test_bmm_matches_numpy[f32] PASSED [  1%]"]
    work, out = tmp_path / "work", tmp_path / "out"
    write_run(work, out, lines, {}, [])
    tsv = (work / "parts.tsv").read_text().replace("pytest-core\t1\t3\t100", "pytest-core\t124\t150\t150")
    (work / "parts.tsv").write_text(tsv)
    gpu_check_tools.main(["report", str(work), str(out)])
    text = (out / "report.md").read_text()
    assert "TIMED OUT at 150 s: 1 passed" in text
    assert "pytest-core ran out of time after compiling 50 kernels (63 s): CuPy keeps them in its kernel cache" in text
    assert "| bmm | NO |" in text  # its own test passed, but no whole-step test or training run got to it


def test_a_check_stopped_midway_still_reports_what_ran(tmp_path):
    """The interim report gpu_check.sh writes after each part: a check killed from outside during pytest
    leaves the parts that ended, names the rest as not run, and takes the GPU's name from nvidia-smi."""
    work, out = tmp_path / "work", tmp_path / "out"
    write_run(work, out, [], {}, [])
    (out / "bench.jsonl").unlink()
    (work / "parts.tsv").write_text("install\t0\t4\t60\nprobe\t0\t6\t45\nnvidia-smi\t0\t1\t10\ninfo\t0\t3\t20\n"
                                    "pytest-core\t143\t40\t150\n")  # killed from outside during pytest-core
    assert gpu_check_tools.main(["report", str(work), str(out), "--quiet"]) == 0
    text = (out / "report.md").read_text()
    assert "GPU: NVIDIA H100 80GB HBM3," in text and "| nvidia-smi | ok: NVIDIA H100 80GB HBM3 | 1 (10) |" in text
    assert "| pytest -m cuda: layers, engine, kernels, cuBLAS, training | KILLED (the check was stopped from outside)" in text
    for title in ("pytest -m cuda: NCCL (test_distributed)", "20 training steps, CuPy against NumPy",
                  "benchmark table (gpu_bench.py)"):  # fmt: skip
        assert f"| {title} | not run | | |" in text, title
    assert "| npgpt info | not run" not in text and "| bmm | NO |" in text


NO_NETWORK = """
# Installed by tests/test_gpu_check.py: record and refuse every attempt to reach another machine.
import socket

_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo
LOCAL = ("127.", "::1", "localhost", "0.0.0.0")


def _note(what):
    with open({log!r}, "a") as f:
        f.write(what + "\\n")


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not str(address[0]).startswith(LOCAL):
        _note(f"connect {{address}}")
        raise OSError("tests/test_gpu_check.py: no network")
    return _connect(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host is not None and not str(host).startswith(LOCAL):
        _note(f"getaddrinfo {{host}}")
        raise socket.gaierror("tests/test_gpu_check.py: no network")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
"""


def no_network_env(tmp_path) -> tuple:
    """An environment whose Python processes (every one the check starts) cannot reach the network and
    write each attempt to the returned log."""
    guard, log = tmp_path / "guard", tmp_path / "network-attempts.txt"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(NO_NETWORK.format(log=str(log)))
    path = os.pathsep.join([str(guard), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}, log


def test_the_network_guard_works(tmp_path):
    env, log = no_network_env(tmp_path)
    code = "import urllib.request as u; u.urlopen('https://pypi.org/simple/', timeout=5)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "no network" in proc.stderr
    assert "getaddrinfo pypi.org" in log.read_text()


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_without_cupy_the_check_stops_at_once_and_says_why(tmp_path):
    """The real check (no --dry-run) with a Python that has no CuPy: no download is tried, the install part
    fails naming what is missing, and the report says so."""
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("this Python has CuPy")
    env, attempts = no_network_env(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"this Python ({sys.executable}) lacks: cupy" in proc.stdout
    report = (out / "report.md").read_text()
    assert "| install npgpt (no network) | exit 1: this Python" in report and "lacks: cupy" in report
    assert "| pytest -m cuda: layers, engine, kernels, cuBLAS, training | not run | | |" in report
    assert not attempts.exists(), attempts.read_text()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_dry_run_end_to_end(tmp_path):
    """`gpu_check.sh OUT --dry-run` on this CPU: every part runs in its small form, the report and the logs
    are written (four files, the device tool brings back at most eight), the summary is printed last, and
    no process tried to reach the network (the editable install included)."""
    env, attempts = no_network_env(tmp_path)
    env["NPGPT_CHECK_SECONDS"] = "600"
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench.jsonl", "bench.md", "logs.txt", "report.md"]
    report = (out / "report.md").read_text()
    for part in ("install npgpt (no network) | ok: installed: editable", "probe: a first kernel, bfloat16 | ok |",
                 "npgpt info | ok", "layers, engine, kernels, cuBLAS, training | ok: 2 passed",
                 "gradients, encoder-decoder, fine-tuning, bench | ok: ", "NCCL (test_distributed) | ok: ",
                 "tests collected", "5/5 GPU settings track the CPU", "benchmark table (gpu_bench.py) | ok",
                 "| 2 x 16 | fp32 |", "| 2 x 16 | bf16 |"):  # fmt: skip
        assert part in report, part
    logs = (out / "logs.txt").read_text()
    assert "[compile time] per test file" in logs  # the pytest parts log compile time apart (none here: no CuPy)
    assert "# npgpt GPU check" in proc.stdout and proc.stdout.rstrip().splitlines()[-1].startswith("[gpu_check] ")
    assert not list(tmp_path.glob("npgpt-gpu-check.*"))  # the work directory is removed
    assert not attempts.exists(), attempts.read_text()


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_a_check_stopped_from_outside_still_writes_its_report(tmp_path):
    """SIGTERM during a part (here the install, whose pip hangs): the part is stopped (its whole process
    group), recorded as killed, the report written, and the check exits 1 within seconds."""
    import signal
    import time

    env, _ = no_network_env(tmp_path)
    with (tmp_path / "guard" / "sitecustomize.py").open("a") as f:  # pip, in the install part, hangs
        f.write("\nimport sys, time\nif 'pip' in sys.orig_argv:\n    time.sleep(120)\n")
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(BENCH / "gpu_check.sh"), str(out), "--dry-run"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    time.sleep(8)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and time.perf_counter() - t0 < 30, stdout
    assert "stopped by a signal during install; writing the report" in stdout
    report = (out / "report.md").read_text()
    assert "| install npgpt (no network) | KILLED (the check was stopped from outside)" in report
    assert "| benchmark table (gpu_bench.py) | not run | | |" in report


def test_the_probe_names_what_is_missing(fake_cupy, monkeypatch, capsys):
    """Issue 25 (5): without the CUDA headers every kernel compile fails, and with a NumPy or ml_dtypes too
    old for bfloat16 every bf16 run does; the probe tries both once and says what to install, in one line."""
    import argparse

    args = argparse.Namespace(cpu=False)
    assert gpu_check_tools.probe(args) == 0
    assert "ok: a first kernel" in capsys.readouterr().out

    def no_headers(self, other):
        raise RuntimeError("NVRTC_ERROR_COMPILATION: catastrophic error: cannot open source file \"cuda_fp16.h\"")

    with monkeypatch.context() as m:
        m.setattr(fake_cupy.DeviceArray, "__iadd__", no_headers)
        assert gpu_check_tools.probe(args) == 1
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("PROBE FAILED")]
    assert len(line) == 1 and "the CUDA headers are missing, so no kernel compiles" in line[0]
    assert "pip install 'cupy-cuda12x[ctk]'" in line[0]

    real_astype = fake_cupy.DeviceArray.__getattr__

    def astype_fails(self, name):
        if name == "astype":
            def fail(dtype, *a, **k):
                if np.dtype(dtype).name == "bfloat16":
                    raise TypeError("Unsupported dtype bfloat16")
                return real_astype(self, "astype")(dtype, *a, **k)
            return fail
        return real_astype(self, name)

    import numpy as np

    with monkeypatch.context() as m:
        m.setattr(fake_cupy.DeviceArray, "__getattr__", astype_fails)
        assert gpu_check_tools.probe(args) == 1
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("PROBE FAILED")]
    assert len(line) == 1 and "cannot make bfloat16 arrays with NumPy" in line[0] and "ml_dtypes>=0.4" in line[0]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ml_dtypes", None)  # not installed
        assert gpu_check_tools.probe(args) == 1
    assert "PROBE FAILED: ml_dtypes is not installed: pip install" in capsys.readouterr().out


def test_the_compile_timer_wraps_cupys_compiler_when_it_loads(tmp_path):
    """gpu_compile_timer.install() in a fresh process: the two functions of a cupy.cuda.compiler (a
    stand-in package with CuPy's names) are wrapped when it is imported, and at exit the process's
    compiles are logged for its part."""
    pkg = tmp_path / "pkg" / "cupy" / "cuda"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "compiler.py").write_text(
        "import time\n"
        "def _compile_using_nvrtc_no_warning(*a):\n    time.sleep(0.05)\n"
        "def _compile_module_with_cache(*a):\n    _compile_using_nvrtc_no_warning()\n"
    )
    code = ("import gpu_compile_timer; gpu_compile_timer.install(); import cupy.cuda.compiler as c; "
            "c._compile_module_with_cache(); c._compile_module_with_cache()")  # fmt: skip
    log = tmp_path / "compile.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{BENCH}{os.pathsep}{tmp_path / 'pkg'}", "NPGPT_COMPILE_LOG": str(log),
           "NPGPT_CHECK_PART": "pytest-core"}  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["part"] == "pytest-core" and record["timed"] is True
    assert record["fetch_n"] == 2 and record["nvrtc_n"] == 2 and record["nvrtc_s"] >= 0.1
    assert gpu_check_tools.compile_seconds(tmp_path) == {"pytest-core": (record["nvrtc_s"], 2)}


def test_the_compile_budget_replays_the_kernels_in_the_checks_order(tmp_path):
    """gpu_compile_budget.count: each test's kernels (all it used) replayed in gpu_check.sh's order of parts
    and files; a kernel is compiled at its first use, so a kernel test_engine and test_bench share counts
    in pytest-core, whatever order the logged run had."""
    import gpu_compile_budget

    ew = lambda name: repr(("elementwise", name, ("<f4",), None, 1, True))  # noqa: E731
    rows = [{"test": "tests/test_bench.py::a", "kernels": [ew("add"), ew("exp")]},
            {"test": "tests/test_engine.py::b", "kernels": [ew("add"), repr(("reduction", "sum", "<f4", "all", True))]},
            {"test": "tests/test_cuda_kernels.py::c", "kernels": [repr(("rawmodule", "gelu.cu", ()))]},
            {"test": "tests/test_layers.py::d", "kernels": [ew("add")]}]  # fmt: skip
    log = tmp_path / "k.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parts = gpu_compile_budget.count(log)
    assert parts["pytest-core"] == {"test_layers.py": {"elementwise": 1}, "test_engine.py": {"reduction": 1},
                                    "test_cuda_kernels.py": {"rawmodule gelu.cu": 1}}  # fmt: skip
    assert parts["pytest-more"] == {"test_bench.py": {"elementwise": 1}} and parts["pytest-nccl"] == {}
