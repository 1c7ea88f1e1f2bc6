"""What the compiler says about every CUDA kernel: registers, spills, static shared memory and the theoretical
occupancy on sm_80 (A100) and sm_90 (H100), written into docs/benchmarks.md.

    python benchmarks/kernel_resources.py            # compile, print the table, rewrite the docs section
    python benchmarks/kernel_resources.py --check    # compile and print only (the docs untouched)

1. Every kernels/*.cu is compiled whole for each architecture with the options CuPy compiles it with at run
   time (-std=c++17 -ftz=true; npgpt.cuda.nvrtc) through nvcc -cubin -Xptxas -v: a whole file holds every
   template instantiation the wrappers launch (each activation dtype's, every attention head size; the
   wrappers hand CuPy one head size at a time, which compiles the same kernels). The entries found must be
   exactly npgpt.cuda.kernels.KERNEL_ENTRIES: a kernel ptxas did not report, or one the wrappers do not
   know, is an error, so a new .cu file or kernel is picked up by rerunning this one command.
2. ptxas's report of each entry: registers per thread, spill stores and loads (bytes), the stack frame, the
   static shared memory.
3. Theoretical occupancy (active warps per SM / the SM's 64) from the SM's limits (SM_LIMITS, stated in the
   docs section) and the launch configuration the wrapper uses (npgpt.cuda.kernels.launch_block: threads
   per block; no kernel uses dynamic shared memory), with the allocation rules of NVIDIA's occupancy
   calculator (cuda_occupancy.h: registers allocated per warp in units of 256 within 4 partitions of the
   SM's register file; shared memory per block plus 1 KB the driver reserves, in units of 128 bytes, out
   of the largest carveout). tests/test_kernels_compile.py holds these numbers to cuda_occupancy.h's own.
4. The section of docs/benchmarks.md between RESOURCES_BEGIN and RESOURCES_END is replaced by the tables.

Needs nvcc (a CUDA toolkit), no GPU. Exits 1 when any kernel spills registers (the table is written all
the same), which tests/test_kernels_compile.py asserts too, file by file.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from npgpt.cuda.kernels import KERNEL_ENTRIES, launch_block  # noqa: E402
from npgpt.cuda.sources import kernel_sources  # noqa: E402

ARCHS = ("sm_80", "sm_90")
NVCC_OPTIONS = ("-std=c++17", "-ftz=true")  # as npgpt.cuda.nvrtc / CuPy compile the kernels at run time
DOCS = REPO / "docs" / "benchmarks.md"
RESOURCES_BEGIN = "<!-- kernel-resources: begin (written by benchmarks/kernel_resources.py; rerun it, do not edit) -->"
RESOURCES_END = "<!-- kernel-resources: end -->"

# The SM's limits (CUDA C++ Programming Guide, "Compute Capabilities", table of technical specifications, for
# 8.0 and 9.0; the allocation units as cuda_occupancy.h applies them).
SM_LIMITS = {
    "sm_80": dict(gpu="A100 (compute capability 8.0)", max_warps=64, max_blocks=32, regs=65536, reg_partitions=4,
                  reg_unit=256, max_regs_per_thread=255, smem=164 * 1024, smem_reserved=1024, smem_unit=128),
    "sm_90": dict(gpu="H100 (compute capability 9.0)", max_warps=64, max_blocks=32, regs=65536, reg_partitions=4,
                  reg_unit=256, max_regs_per_thread=255, smem=228 * 1024, smem_reserved=1024, smem_unit=128),
}  # fmt: skip

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(text: str) -> dict:
    """ptxas -v's report, by entry: {name: {"arch", "registers", "stack", "spill_stores", "spill_loads",
    "smem"}} (bytes; smem is the static shared memory, 0 when ptxas names none)."""
    report, name = {}, None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            name = m.group(1)
            report[name] = {"arch": m.group(2), "registers": None, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}
        elif name and (m := _FRAME.search(line)):
            report[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif name and (m := _USED.search(line)):
            report[name].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    missing = sorted(k for k, r in report.items() if r["registers"] is None)
    if missing:
        raise ValueError(f"ptxas reported no register count for {', '.join(missing)}; its output format changed?")
    return report


def compile_report(source: Path, arch: str, nvcc: str = "nvcc") -> dict:
    """nvcc -cubin -Xptxas -v of one .cu file for one architecture: parse_ptxas's report. Raises
    RuntimeError with nvcc's output when it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-cubin", f"-arch={arch}", *NVCC_OPTIONS, "-Xptxas", "-v", "-o", str(Path(tmp) / "k.cubin"), str(source)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return parse_ptxas(proc.stdout + proc.stderr)


def occupancy(registers: int, smem: int, block: int, arch: str) -> tuple[int, float, str]:
    """(blocks per SM, active warps / max warps, what limits it) for a kernel of `registers` per thread and
    `smem` bytes of static shared memory launched with `block` threads, on `arch` (SM_LIMITS)."""
    lim = SM_LIMITS[arch]
    warps = -(-block // 32)
    per_warp = -(-registers * 32 // lim["reg_unit"]) * lim["reg_unit"]  # registers are allocated per warp
    parts = lim["reg_partitions"]
    fits = registers <= lim["max_regs_per_thread"] and per_warp * (-(-warps // parts) * parts) <= lim["regs"]
    if not fits:
        by_regs = 0
    elif per_warp == 0:
        by_regs = lim["max_blocks"]
    else:  # each of the partitions holds whole warps' registers
        by_regs = (lim["regs"] // parts // per_warp) * parts // warps
    smem_block = -(-(smem + lim["smem_reserved"]) // lim["smem_unit"]) * lim["smem_unit"]
    limits = {"warps": lim["max_warps"] // warps, "blocks": lim["max_blocks"], "registers": by_regs,
              "shared memory": lim["smem"] // smem_block}  # fmt: skip
    blocks = min(limits.values())
    active = blocks * warps / lim["max_warps"]
    limiter = "-" if active >= 1.0 else " and ".join(k for k, v in limits.items() if v == blocks)
    return blocks, active, limiter


def collect(nvcc: str = "nvcc", jobs: int = 2) -> list[dict]:
    """One row per (kernel, architecture), every kernels/*.cu for every ARCHS, checked against KERNEL_ENTRIES."""
    work = [(src, arch) for src in kernel_sources() for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        reports = list(pool.map(lambda sa: compile_report(sa[0], sa[1], nvcc), work))
    rows = []
    for (src, arch), report in zip(work, reports):
        want = set(KERNEL_ENTRIES.get(src.name, ()))
        if set(report) != want:
            raise RuntimeError(f"{src.name} for {arch}: ptxas compiled {sorted(set(report) - want)} that KERNEL_ENTRIES "
                               f"does not list, and not {sorted(want - set(report))} that it does")  # fmt: skip
        for name in KERNEL_ENTRIES[src.name]:  # in the wrappers' order
            r = report[name]
            block = launch_block(src.name, name)
            blocks, active, limiter = occupancy(r["registers"], r["smem"], block, arch)
            rows.append({"file": src.name, "kernel": name, **r, "block": block, "blocks_per_sm": blocks,
                         "occupancy": active, "limiter": limiter})  # fmt: skip
    return rows


def spills(rows: list[dict]) -> list[str]:
    return [f"{r['kernel']} ({r['arch']}): {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
            for r in rows if r["spill_stores"] or r["spill_loads"]]  # fmt: skip


def nvcc_version(nvcc: str = "nvcc") -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return f"nvcc {m.group(2)} (CUDA {m.group(1)})" if m else "nvcc"


def render(rows: list[dict], version: str) -> str:
    """The docs section: the SM limits, then one table row per kernel with both architectures side by side."""
    by = {(r["kernel"], r["arch"]): r for r in rows}
    kernels = list(dict.fromkeys((r["file"], r["kernel"]) for r in rows))
    a, b = ARCHS
    la, lb = SM_LIMITS[a], SM_LIMITS[b]
    lines = [
        f"Compiled by {version} with `-cubin -std=c++17 -ftz=true -Xptxas -v` (CuPy's options at run time), "
        "every template instantiation the wrappers launch; no GPU involved. Occupancy is theoretical: active "
        "warps per SM over the SM's 64 for the wrapper's block (threads per block; no kernel uses dynamic "
        "shared memory), as NVIDIA's occupancy calculator (`cuda_occupancy.h`) allocates, from these limits:",
        "",
        f"| per SM | {a}: {la['gpu']} | {b}: {lb['gpu']} |",
        "| --- | --- | --- |",
        f"| warps (threads) | {la['max_warps']} ({32 * la['max_warps']}) | {lb['max_warps']} ({32 * lb['max_warps']}) |",
        f"| blocks | {la['max_blocks']} | {lb['max_blocks']} |",
        f"| 32-bit registers | {la['regs']} in {la['reg_partitions']} partitions, per warp in units of {la['reg_unit']}, "
        f"at most {la['max_regs_per_thread']} a thread | the same |",
        f"| shared memory | {la['smem'] // 1024} KB (the largest carveout), per block its static size + "
        f"{la['smem_reserved']} B reserved, in units of {la['smem_unit']} B | {lb['smem'] // 1024} KB, the same rules |",
        "",
        "Spills are ptxas's spill stores + loads in bytes per thread. Occupancy: blocks per SM and active warps "
        "/ 64, and what limits it when below 100%.",
        "",
        f"| file | kernel | block | registers {a} / {b} | spills {a} / {b} | static smem (B) | occupancy {a} | occupancy {b} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip

    def occ(r):
        n = r["blocks_per_sm"]
        text = f"{n} block{'' if n == 1 else 's'}, {100 * r['occupancy']:.0f}%"
        return text + (f" ({r['limiter']})" if r["limiter"] != "-" else "")

    for file, kernel in kernels:
        ra, rb = by[(kernel, a)], by[(kernel, b)]
        sp = lambda r: r["spill_stores"] + r["spill_loads"]  # noqa: E731
        smem = str(ra["smem"]) if ra["smem"] == rb["smem"] else f"{ra['smem']} / {rb['smem']}"
        lines.append(f"| {file} | `{kernel}` | {ra['block']} | {ra['registers']} / {rb['registers']} | {sp(ra)} / {sp(rb)} | "
                     f"{smem} | {occ(ra)} | {occ(rb)} |")  # fmt: skip
    bad = spills(rows)
    lines += ["", f"Register spills: {'none' if not bad else '; '.join(bad)}."]
    return "\n".join(lines)


def write_section(text: str, path: Path = DOCS) -> None:
    """Replace what lies between RESOURCES_BEGIN and RESOURCES_END in `path` with `text` (the markers stay)."""
    doc = path.read_text(encoding="utf-8")
    start, end = doc.find(RESOURCES_BEGIN), doc.find(RESOURCES_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no section between {RESOURCES_BEGIN!r} and {RESOURCES_END!r}")
    new = doc[: start + len(RESOURCES_BEGIN)] + "\n" + text.rstrip() + "\n" + doc[end:]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="print only (do not rewrite docs/benchmarks.md); exit 1 on a spill")
    ap.add_argument("--nvcc", default=shutil.which("nvcc"), help="the nvcc to use (default: the one on the PATH)")
    ap.add_argument("--jobs", type=int, default=2, help="compilations at once")
    args = ap.parse_args(argv)
    if not args.nvcc:
        print("kernel_resources: nvcc is not on the PATH (it comes with a CUDA toolkit); give --nvcc", file=sys.stderr)
        return 2
    rows = collect(args.nvcc, args.jobs)
    text = render(rows, nvcc_version(args.nvcc))
    print(text)
    if not args.check:
        write_section(text)
        print(f"\nwrote {len(rows) // len(ARCHS)} kernels x {len(ARCHS)} architectures into {DOCS.relative_to(REPO)}")
    return 1 if spills(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
