"""Where the CUDA C sources are: the folder `kernels/` at the top of the repository, installed as `npgpt/kernels/`.

That folder is data, not a Python package: it has no `__init__.py`, so that running Python from the repository root
(`python -m pytest`) never lets it shadow an installed package named `kernels` (Hugging Face's, which transformers
imports). pyproject.toml still installs it as `npgpt/kernels/` (a package mapping); `kernel_dir()` looks there,
then beside the `npgpt/` folder (the source tree, an editable install).
"""

from __future__ import annotations

from pathlib import Path


def kernel_dir() -> Path:
    """The folder holding the installed .cu/.cuh files and README.md."""
    package = Path(__file__).resolve().parents[1]  # npgpt/
    candidates = [package / "kernels", package.parent / "kernels"]  # a wheel's npgpt/kernels; the source tree's kernels/
    for folder in candidates:
        if (folder / "common.cuh").is_file():
            return folder
    raise RuntimeError(f"the CUDA kernel sources are missing (looked in {', '.join(map(str, candidates))}); reinstall npgpt")


def kernel_sources() -> list[Path]:
    """Every .cu file shipped, sorted by name."""
    return sorted(kernel_dir().glob("*.cu"))


def kernel_source(name: str) -> str:
    """The text of kernels/<name> (".cu" added when missing)."""
    if not name.endswith(".cu"):
        name += ".cu"
    path = kernel_dir() / name
    if not path.is_file():
        available = ", ".join(p.name for p in kernel_sources()) or "none"
        raise ValueError(f"no kernel source {name!r} in {kernel_dir()}; available: {available}")
    return path.read_text(encoding="utf-8")
