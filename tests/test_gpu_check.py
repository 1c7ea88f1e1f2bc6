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
    """What gpu_check.sh leaves behind after a GPU run: parts.tsv, the logs (pytest-core's in two shards:
    the driver's log and one log per shard), train.json, bench.jsonl."""
    work.mkdir()
    out.mkdir()
    parts = [("install", 0), ("probe", 0), ("nvidia-smi", 0), ("info", 0), ("pytest-core", 1), ("pytest-more", 0),
             ("pytest-nccl", 0), ("train", 0), ("bench", 0)]  # fmt: skip
    (work / "parts.tsv").write_text("".join(f"{n}\t{rc}\t3\t100\n" for n, rc in parts))
    for n, _ in parts:
        (work / f"{n}.log").write_text(f"$ {n}\n")
    core = [line for line in pytest_lines if "test_gradients" not in line]
    (work / "pytest-core.shard1.log").write_text("\n".join(core[::2]) + "\n")  # the shards' own logs: the results
    (work / "pytest-core.shard2.log").write_text("\n".join(core[1::2]) + "\n")
    (work / "pytest-core.shards.json").write_text(json.dumps({"shards": 2}))
    (work / "pytest-more.log").write_text("\n".join(line for line in pytest_lines if "test_gradients" in line) + "\n")
    (work / "compile.jsonl").write_text(json.dumps({"part": "pytest-core", "shard": "1", "timed": True, "nvrtc_s": 61.4,
                                                    "nvrtc_n": 48}) + "\n" +
                                        json.dumps({"part": "pytest-core", "shard": "2", "timed": True, "nvrtc_s": 2.0,
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
        "tests/test_cuda_attention_softmax.py::test_softmax_kernels_match_the_fast_ops[cupy-2-3-7-bfloat16-0.2] PASSED [  7%]",
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
    assert ("(to turn on by default: DEFAULT_ON in npgpt/cuda/__init__.py): adamw, attention, attention_softmax, bmm, cross_entropy, gelu, "
            "sq_norm") in text
    assert "| layernorm | NO | 1/2 of its tests passed" in text
    assert ("| pytest -m cuda: layers, engine, kernels, cuBLAS, training | exit 1: 10 passed, 1 failed (2 shards) | 3 (100) | "
            "63 s in 2 shards, the longest 61 s (50 kernels) |") in text  # fmt: skip
    assert "| pytest -m cuda: gradients, encoder-decoder, fine-tuning, bench | ok: 1 skipped | 3 (100) |  |" in text
    assert "- tests/test_cuda_kernels.py::test_layernorm_fwd[cupy-3-64]" in text
    assert "npgpt TF32 >= PyTorch eager TF32 (16x1024): 1.20x -> met" in text
    assert "npgpt bf16 >= 40% MFU (16x1024): 42.0% -> met" in text
    assert "GPU: NVIDIA H100 80GB HBM3" in text
    logs = (out / "logs.txt").read_text()
    assert logs.index("===== install") < logs.index("===== pytest-core") < logs.index("===== pytest-core, shard1") < \
        logs.index("===== pytest-core, shard2") < logs.index("===== pytest-more") < logs.index("===== bench")


def test_the_report_judges_every_fast_path():
    """Each name NPGPT_CUDA_KERNELS takes has the tests that verify it in the report's "Fast paths" table
    (a path missing there could never be listed as verified, so never turned on by default), and each
    pattern names tests that exist (a whole file: one with CUDA tests)."""
    from npgpt.cuda import KERNEL_NAMES

    assert set(gpu_check_tools.FAST_PATH_TESTS) == set(KERNEL_NAMES)
    tests = Path(__file__).resolve().parent
    for path, pattern in gpu_check_tools.FAST_PATH_TESTS.items():
        file, names = pattern.replace("\\", "").split("::")
        text = (tests / file).read_text()
        if not names:
            assert "pytest.mark.cuda" in text, (path, pattern)
        for name in filter(None, names.strip("()[").split("|")):
            assert f"def {name}" in text, (path, pattern, name)


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
    assert "pytest-core ran out of time after compiling 50 kernels (63 s in 2 shards at once): CuPy keeps them in its " \
        "kernel cache" in text
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
    """`gpu_check.sh OUT --dry-run` on this CPU: every part runs in its small form (pytest-core's two tests
    in two shards, one each), the report and the logs are written (four files, the device tool brings back
    at most eight), the summary is printed last, and no process tried to reach the network (the editable
    install included)."""
    env, attempts = no_network_env(tmp_path)
    env["NPGPT_CHECK_SECONDS"] = "600"
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out), "--dry-run"], capture_output=True, text=True,
                          env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench.jsonl", "bench.md", "logs.txt", "report.md"]
    report = (out / "report.md").read_text()
    for part in ("install npgpt (no network) | ok: installed: editable", "probe: a first kernel, bfloat16 | ok |",
                 "npgpt info | ok", "layers, engine, kernels, cuBLAS, training | ok: 2 passed (2 shards)",
                 "gradients, encoder-decoder, fine-tuning, bench | ok: ", "NCCL (test_distributed) | ok: ",
                 "tests collected", "5/5 GPU settings track the CPU", "benchmark table (gpu_bench.py) | ok",
                 "| 2 x 16 | fp32 |", "| 2 x 16 | bf16 |"):  # fmt: skip
        assert part in report, part
    logs = (out / "logs.txt").read_text()
    assert "[compile time] per test file" in logs  # the pytest parts log compile time apart (none here: no CuPy)
    shard1, shard2 = logs.split("===== pytest-core, shard1 =====")[1].split("===== pytest-core, shard2 =====")
    shard2 = shard2.split("\n===== ")[0]
    assert [shard.count(" PASSED") for shard in (shard1, shard2)] == [1, 1]  # the split was real: one test each
    assert "test_constants_match_cupy PASSED" in shard1 + shard2 and "test_bmm_edges_and_errors PASSED" in shard1 + shard2
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


# --- the pytest parts in shards: gpu_shards.py's plan, gpu_check_tools.py's driver ------------------------------

import gpu_shards  # noqa: E402


def chain_table(**tests) -> gpu_shards.Table:
    """A kernel table of made-up tests of test_x.py, each a list of kernel numbers; every kernel takes 1 s."""
    n = 1 + max(k for ks in tests.values() for k in ks)
    return gpu_shards.Table({"compile_s": {"elementwise": 1.0}, "kernels": ["elementwise"] * n,
                             "tests": {f"test_x.py::{t}": ks for t, ks in tests.items()}})  # fmt: skip


def ids(*names):
    return [f"tests/test_x.py::{n}" for n in names]  # as pytest writes them, relative to the rootdir


@pytest.fixture
def no_overheads(monkeypatch):
    """Plans in whole seconds of compiling: no process start, no time on the GPU."""
    monkeypatch.setattr(gpu_shards, "STARTUP_S", 0.0)
    monkeypatch.setattr(gpu_shards, "RUN_S", 0.0)


A, B, C = list(range(10)), list(range(10, 20)), list(range(20, 30))


def test_the_plan_spreads_kernel_families_over_the_shards_and_compiles_each_once(no_overheads):
    """Two tests of each of families A and B (10 kernels each) and one of C: one process compiles the 30
    kernels one after another (30 s); three compile the three families at once (10 s), none twice, and a
    fourth process would make nothing sooner."""
    table, tests = chain_table(a1=A, a2=A, b1=B, b2=B, c=C), ids("a1", "a2", "b1", "b2", "c")
    assert gpu_shards.simulate(tests, [0] * 5, table, 1)["makespan_s"] == 30
    plan = gpu_shards.plan(tests, table, 3)
    assert sorted(set(plan)) == [0, 1, 2] and plan[tests.index(ids("b1")[0])] != plan[0] != plan[-1]
    sim = gpu_shards.simulate(tests, plan, table, 3)
    assert (sim["makespan_s"], sim["compile_s"], sim["duplicated"]) == (10, 30, 0)
    assert len(sim["compiled"]) == 30 and sum(s["tests"] for s in sim["shards"]) == 5
    n, best = gpu_shards.shards_needed(tests, table, 16)
    assert n == 3 and best["makespan_s"] == 10
    assert gpu_shards.plan(tests, table, 3) == plan  # the same for every shard that computes it


def test_the_simulation_compiles_a_kernel_twice_only_when_two_shards_need_it_at_once(no_overheads):
    """CuPy takes no lock: a shard that needs a kernel another shard is still compiling compiles it too; one
    that needs it after the other has finished loads it from the cache."""
    table = chain_table(a1=A, a2=A, y=list(range(30, 42)), z=list(range(30, 35)), w=list(range(30, 39)), x=[9])
    same_time = gpu_shards.simulate(ids("a1", "a2"), [0, 1], table, 2)
    assert (same_time["makespan_s"], same_time["duplicated"], same_time["duplicated_s"]) == (10, 10, 10)
    later = gpu_shards.simulate(ids("a1", "y", "x"), [0, 1, 1], table, 2)  # x needs kernel 9 at 12 s; ready at 10 s
    assert (later["makespan_s"], later["compile_s"], later["duplicated"]) == (12, 22, 0)
    sooner = gpu_shards.simulate(ids("a1", "z", "x"), [0, 1, 1], table, 2)  # x compiles kernel 9 at 5 s, a1 loads it at 9 s
    assert (sooner["shards"][0]["end"], sooner["shards"][1]["end"], sooner["duplicated"]) == (9, 6, 0)
    racing = gpu_shards.simulate(ids("a1", "w", "x"), [0, 1, 1], table, 2)  # at 9 s both start compiling kernel 9
    assert (racing["shards"][0]["end"], racing["shards"][1]["end"], racing["duplicated"]) == (10, 10, 1)
    cached = gpu_shards.simulate(ids("a1"), [0], table, 1, cached=A)  # compiled by an earlier part
    assert cached["makespan_s"] == 0 and cached["compile_s"] == 0


def test_tests_the_table_does_not_know_are_spread_evenly(no_overheads):
    table = chain_table(a1=A)
    tests = ids("new1", "new2", "new3", "new4")
    plan = gpu_shards.plan(tests, table, 2)
    assert sorted(plan) == [0, 0, 1, 1]
    assert gpu_shards.simulate(tests, plan, table, 2)["makespan_s"] == 2 * gpu_shards.UNKNOWN_S


def write_table(path: Path, table: gpu_shards.Table) -> Path:
    path.write_text(json.dumps({"compile_s": table.compile_s, "kernels": ["elementwise"] * len(table.cost),
                                "tests": table.tests}))  # fmt: skip
    return path


def test_shards_are_at_most_the_cores_and_what_the_gpu_holds(tmp_path, monkeypatch):
    """--shards auto: the plan's fewest (3 here), at most one per core, as many as the GPU's free memory
    holds at SHARD_GPU_GIB each, one when the GPU's compute mode admits one process; a number is taken as
    given."""
    import argparse

    monkeypatch.setenv("NPGPT_SHARD_TABLE", str(write_table(tmp_path / "t.json", chain_table(a1=A, a2=A, b1=B, c=C))))
    monkeypatch.setattr(gpu_check_tools.os, "sched_getaffinity", lambda pid: set(range(16)))
    args = argparse.Namespace(shards="auto", most=0, work=str(tmp_path))
    files = ["/repo/tests/test_x.py"]
    n, why = gpu_check_tools.shard_count(args, files)
    assert n == 3 and why.startswith("16 cores") and "for the 4 tests it knows" in why
    (tmp_path / "gpu.json").write_text(json.dumps({"free_gib": 10.0, "total_gib": 80.0, "compute_mode": 0}))
    n, why = gpu_check_tools.shard_count(args, files)
    assert n == 2 and "10.0 GiB of GPU memory free holds 2 at 4 GiB each" in why
    (tmp_path / "gpu.json").write_text(json.dumps({"free_gib": 79.0, "total_gib": 80.0, "compute_mode": 3}))
    n, why = gpu_check_tools.shard_count(args, files)
    assert n == 1 and "exclusive process: one process at a time" in why
    assert gpu_check_tools.shard_count(argparse.Namespace(shards="5", most=0, work=str(tmp_path)), files) == (5, "as asked")


def run_shards(tmp_path, test_source: str, *driver_args, timeout=None, env=None):
    """gpu_check_tools.py pytest over tests/test_p.py (made of test_source) in tmp_path, as gpu_check.sh runs
    it: from a work directory, pytest given the file by its path. Returns (process, work directory)."""
    (tmp_path / "tests").mkdir(exist_ok=True)
    (tmp_path / "tests" / "test_p.py").write_text(test_source)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    cmd = [sys.executable, str(BENCH / "gpu_check_tools.py"), "pytest", str(work), "pytest-core", *driver_args, "--",
           "--rootdir", str(tmp_path), "-v", "-p", "no:cacheprovider", str(tmp_path / "tests" / "test_p.py")]  # fmt: skip
    if timeout:
        cmd = ["timeout", str(timeout), *cmd]
    env = {**os.environ, "PYTHONPATH": str(BENCH), "NPGPT_SHARD_TABLE": str(tmp_path / "none.json"), **(env or {})}
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, timeout=120), work


def test_a_part_in_shards_runs_each_test_once_and_fails_when_one_fails(tmp_path):
    proc, work = run_shards(tmp_path, "import pytest\n@pytest.mark.parametrize('i', range(6))\n"
                                      "def test_p(i):\n    assert i != 4\n", "--shards", "3")  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    per_shard = [gpu_check_tools.pytest_results(work / f"pytest-core.shard{i}.log") for i in (1, 2, 3)]
    assert [len(r) for r in per_shard] == [2, 2, 2]  # tests the table does not know: spread evenly
    every = {t: o for r in per_shard for t, o in r.items()}
    assert len(every) == 6 and [t for t, o in every.items() if o == "FAILED"] == ["tests/test_p.py::test_p[4]"]
    assert gpu_check_tools.pytest_results(*gpu_check_tools.part_logs(work, "pytest-core")) == every
    assert "[shards] pytest-core: 3 pytest processes at once (as asked)" in proc.stdout
    assert "[shards] pytest-core: exit 1 in " in proc.stdout and ": 5 passed, 1 failed" in proc.stdout
    plan = json.loads((work / "pytest-core.shards.json").read_text())
    assert plan["shards"] == 3 and [s["exit"] for s in plan["per_shard"]].count(1) == 1
    assert [s["planned_tests"] for s in plan["per_shard"]] == [2, 2, 2]


def test_shards_that_collect_different_tests_are_an_error(tmp_path):
    """Each shard plans from what it collected: if the collections differ (here a parameter read from the
    shard's own environment), a test may run twice or not at all, and the part says so."""
    proc, _ = run_shards(tmp_path, "import os, pytest\n@pytest.mark.parametrize('who', [os.environ['NPGPT_SHARD']])\n"
                                   "def test_p(who):\n    pass\n", "--shards", "2")  # fmt: skip
    assert proc.returncode == 3 and "the shards did not collect the same tests" in proc.stdout, proc.stdout


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_a_part_in_shards_stopped_by_its_limit_leaves_what_ended_and_no_process(tmp_path):
    """A part's limit is `timeout`, which on its deadline or a SIGTERM (gpu_check.sh's on_signal sends one)
    signals the driver and its process group: every shard stops, the tests that ended are in the shards'
    logs, the driver says which shards it stopped, and the report counts what ended."""
    import signal
    import time

    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_p.py").write_text(
        "import os, time\ndef test_quick():\n    pass\n"
        "def test_slow():\n    open(os.environ['PIDS'], 'a').write(f'{os.getpid()}\\n')\n    time.sleep(300)\n")
    work, pids = tmp_path / "work", tmp_path / "pids.txt"
    work.mkdir()
    cmd = ["timeout", "120", sys.executable, str(BENCH / "gpu_check_tools.py"), "pytest", str(work), "pytest-core",
           "--shards", "2", "--", "--rootdir", str(tmp_path), "-v", "-p", "no:cacheprovider", str(tmp_path / "tests")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(BENCH), "NPGPT_SHARD_TABLE": str(tmp_path / "none.json"), "PIDS": str(pids)}
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.perf_counter() + 90
    while time.perf_counter() < deadline and not (pids.exists() and "test_quick PASSED" in "".join(
            p.read_text() for p in work.glob("pytest-core.shard*.log"))):  # fmt: skip
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to `timeout`, as on its deadline
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, stdout
    assert "STOPPED after" in stdout and "1 passed" in stdout, stdout
    assert gpu_check_tools.pytest_results(*gpu_check_tools.part_logs(work, "pytest-core")) == {
        "tests/test_p.py::test_quick": "PASSED"}
    (pid,) = [int(p) for p in pids.read_text().split()]
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists(), "a shard outlived its part"
    assert json.loads((work / "pytest-core.shards.json").read_text())["shards"] == 2
    (work / "parts.tsv").write_text("pytest-core\t124\t12\t12\n")  # as run_part records a part stopped at its limit
    (work / "pytest-core.log").write_text(stdout)
    out = tmp_path / "out"
    out.mkdir()
    assert gpu_check_tools.main(["report", str(work), str(out), "--quiet"]) == 0
    assert "| pytest -m cuda: layers, engine, kernels, cuBLAS, training | TIMED OUT at 12 s: 1 passed (2 shards) |" in \
        (out / "report.md").read_text()


def test_the_probe_writes_what_the_shards_need_to_know_of_the_gpu(fake_cupy, tmp_path, capsys):
    """The stand-in's memGetInfo is (8 GiB free, 16 GiB) and its device in the default compute mode."""
    import argparse

    facts = tmp_path / "gpu.json"
    assert gpu_check_tools.probe(argparse.Namespace(cpu=False, facts=str(facts))) == 0
    assert json.loads(facts.read_text()) == {"free_gib": 8.0, "total_gib": 16.0, "compute_mode": 0}
    assert "GPU memory free: 8.0 of 16.0 GiB; compute mode: default" in capsys.readouterr().out


def test_the_kernel_order_log_keeps_the_order_of_first_use(tmp_path):
    """gpu_compile_budget.py as a pytest plugin: per test, the kernels the stand-in saw in the order they were
    first used (a GPU process compiles them in that order), where conftest.py's log sorts them."""
    (tmp_path / "conftest.py").write_text("import sys, types\nfake = types.ModuleType('fake_cupy')\n"
                                          "fake.kernels_used = set()\nsys.modules['fake_cupy'] = fake\n")  # fmt: skip
    (tmp_path / "test_k.py").write_text("import sys\ndef test_k():\n    for k in ['b', 'a', 'c', 'a']:\n"
                                        "        sys.modules['fake_cupy'].kernels_used.add(('elementwise', k))\n"
                                        "def test_none():\n    pass\n")  # fmt: skip
    log = tmp_path / "order.jsonl"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_compile_budget",
                           str(tmp_path / "test_k.py")], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(BENCH), "NPGPT_KERNEL_ORDER_LOG": str(log)})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows == [{"test": "test_k.py::test_k", "kernels": [repr(("elementwise", k)) for k in "bac"]},
                    {"test": "test_k.py::test_none", "kernels": []}]  # fmt: skip


def test_the_limits_are_twice_the_estimate_the_committed_table_gives():
    """docs/gpu_compile_budget.json's estimate of each pytest part over 16 cores is what the kernel table the
    shards plan with (benchmarks/gpu_test_kernels.json) gives, and gpu_check.sh's limits are twice it,
    rounded up to 10 s: regenerating one without the others fails here."""
    import math
    import re

    import gpu_compile_budget

    table = json.loads((BENCH / "gpu_test_kernels.json").read_text())
    assert all(0 <= k < len(table["kernels"]) for ks in table["tests"].values() for k in ks)
    assert set(table["kernels"]) <= set(table["compile_s"])
    budget = json.loads((ROOT / "docs" / "gpu_compile_budget.json").read_text())
    assert gpu_compile_budget.spread(table, budget["spread"]["cores"]) == budget["spread"]
    script = (BENCH / "gpu_check.sh").read_text()
    for part in ("pytest-core", "pytest-more"):
        limit = int(re.search(rf"^run_part {part} (\d+) ", script, re.M).group(1))
        assert limit == 10 * math.ceil(2 * budget["spread"]["parts"][part]["wall_s"] / 10), part
