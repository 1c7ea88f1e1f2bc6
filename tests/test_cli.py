import subprocess
import sys

import npgpt.layers
from npgpt.cli import main


def test_gradcheck_prints_the_table_and_passes(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    assert "max rel error" in out and "tol" in out
    for layer in ("embedding", "linear", "layernorm", "gelu", "attention", "cross_entropy", "dropout", "ffn", "block", "model"):
        assert layer in out
    assert "FAIL" not in out


def test_gradcheck_fails_with_a_broken_backward(capsys, monkeypatch):
    real = npgpt.layers.gelu_backward

    def broken(dout, cache):
        return real(dout, cache) * 1.001  # a 0.1% error is far above the tolerance

    monkeypatch.setattr(npgpt.layers, "gelu_backward", broken)
    assert main(["gradcheck", "--only", "gelu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "gelu" in out


def test_gradcheck_only_filter_and_list(capsys):
    assert main(["gradcheck", "--list", "--only", "attention"]) == 0
    names = capsys.readouterr().out.split("\n")
    assert names[0].startswith("attention") and all("attention" in n for n in names if n)
    assert main(["gradcheck", "--only", "nothing-matches-this"]) == 2


def test_console_script_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "npgpt", "gradcheck", "--only", "linear"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "linear" in out.stdout


def test_info_reports_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("device in use", "numpy", "BLAS", "CUDA", "tiktoken"):
        assert key in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out
