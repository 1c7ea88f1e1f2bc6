"""CUDA C sources that CuPy compiles at run time (installed as the package npgpt.kernels).

`kernel_dir()` is where they live in this installation; `kernel_source(name)` reads one .cu file.
See README.md in this folder for how the kernels are organised.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def kernel_dir() -> Path:
    return Path(str(resources.files(__name__)))


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
