"""The installed package must carry its data: the BPE ranks, the bundled corpora, the kernels folder."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(out), "-q"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("npgpt-*.whl")
    return whl


def test_wheel_contains_kernels_and_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in [
        "npgpt/kernels/README.md",
        "npgpt/assets/r50k_base.tiktoken",
        "npgpt/assets/the-verdict.txt",
        "npgpt/assets/tang300.txt",
        "npgpt/assets/NOTICE.md",
        "npgpt/assets/en_ms_cldr.tsv",
        "npgpt/seq2seq/model.py",
        "npgpt/layers/decoder_block.py",
        "npgpt/assets/tang-forms-train.csv",
        "npgpt/assets/tang-instruct-test.json",
        "npgpt/finetune/classifier.py",
        "npgpt/layers/classifier_head.py",
        "npgpt/layers/attention.py",
        "npgpt/fast/attention.py",
        "npgpt/cli/__init__.py",
        "npgpt/cuda/kernels.py",
        "npgpt/cuda/emulate.py",
        "npgpt/kernels/common.cuh",
    ]:
        assert required in names, f"{required} missing from the wheel"
    for cu in (REPO / "kernels").glob("*.cu"):
        assert f"npgpt/kernels/{cu.name}" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def test_wheel_contains_every_module_of_the_package(wheel):
    """pyproject.toml lists the packages by name: a new one left out of the list (npgpt/loop/ was, at first)
    would be missing from every non-editable install."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (REPO / "npgpt").rglob("*.py"):
        relative = module.relative_to(REPO).as_posix()
        assert relative in names, f"{relative} is missing from the wheel: add its package to pyproject.toml"


def test_non_editable_install_finds_kernels_and_tokenizer(wheel, tmp_path):
    """Install the wheel into a bare folder and import it from there, away from the source tree."""
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    code = (
        "import npgpt, npgpt.cuda.sources as k, npgpt.tokenizer as t, npgpt.engine, npgpt.cli;"
        "assert str(k.kernel_dir()).startswith(%r), k.kernel_dir();"
        "assert (k.kernel_dir() / 'README.md').is_file();"
        "assert npgpt.__file__.startswith(%r);"
        "assert t.encode('Every effort moves you') == [6109, 3626, 6100, 345];"
        "from npgpt.finetune.config import bundled_file;"
        "assert str(bundled_file('tang-forms-train.csv')).startswith(%r) and bundled_file('tang-instruct-val.json').is_file();"
        "print('ok')"
    ) % (str(target), str(target), str(target))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(target), "PATH": ""})  # fmt: skip
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_kernels_folder_never_shadows_an_installed_package():
    """kernels/ is data: an __init__.py there made `import kernels` from the repository root find it before Hugging
    Face's `kernels` package, so transformers failed to import ("cannot import name 'CUDAProperties' from 'kernels'")."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() != str(REPO / "kernels" / "__init__.py")
    from npgpt.cuda.sources import kernel_dir

    assert (kernel_dir() / "common.cuh").is_file()
