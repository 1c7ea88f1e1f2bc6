"""benchmarks/roofline.py, the model behind docs/benchmarks.md's roofline: its numbers against closed
forms written out here, and the docs' tables against what the script computes now."""

import importlib.util
import sys
from pathlib import Path

import pytest

from npgpt.bench import GPU_PEAKS
from npgpt.config import GPTConfig

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("roofline", REPO / "benchmarks" / "roofline.py")
roofline = importlib.util.module_from_spec(spec)
sys.modules["roofline"] = roofline  # dataclasses look their module up there
spec.loader.exec_module(roofline)

CFG = GPTConfig.from_preset("gpt2", drop_rate=0.0)  # 124M: V 50257, C 768, L 12, NH 12, T 1024
B, T = 16, 1024
N = B * T


@pytest.fixture(scope="module")
def summary():
    return roofline.summarize(CFG, B, T)


def flops(s, design, precision, cls):
    return s["designs"][design][precision]["classes"][cls][0]


def test_the_matrix_products_are_six_flops_per_parameter_and_token(summary):
    """6 x (matrix parameters) x tokens: 12 C^2 per block and V C for the head (tied, counted once);
    the padded head has 50304 rows; attention's products 12 L B T^2 C (cuBLAS computes the whole T x T)."""
    matrix_params = 12 * 768**2 * 12 + 50257 * 768
    for design in ("old", "torch"):
        got = flops(summary, design, "bf16", roofline.LINEAR) + flops(summary, design, "bf16", roofline.HEAD)
        assert got == 6 * matrix_params * N
    assert flops(summary, "new", "bf16", roofline.HEAD) == 6 * 50304 * 768 * N
    assert flops(summary, "new", "tf32", roofline.ATT_MM) == 12 * 12 * B * T * T * 768
    # the flash kernel: 9 products (forward 2, backward 7) of 2 B T^2 C FLOPs over the causal half, per layer
    assert flops(summary, "old", "tf32", roofline.ATT_MM) == 12 * 9 * 2 * B * T * T * 768 / 2
    assert summary["model_flops"] == (6 * matrix_params + 12 * 12 * T * 768) * N


def test_the_fused_softmax_moves_three_and_a_half_passes_of_the_probabilities(summary):
    """Forward: half read, all written; backward: half of P and of dP read, dS written. In bf16, 2 bytes
    each of B x NH x T x T per layer."""
    nbytes = summary["designs"]["new"]["bf16"]["classes"][roofline.ATT_EW][1]
    assert nbytes == 3.5 * 2 * B * 12 * T * T * 12


def test_times_and_mfu_follow_from_the_peaks(summary):
    """The roofline time of a memory-only class is its bytes over the bandwidth; the step is the sum of its
    classes; MFU = model FLOPs / (time x the precision's tensor-core peak); tokens/s = tokens / time."""
    d = summary["designs"]["new"]["bf16"]
    nbytes, (roof, _) = d["classes"][roofline.LN][1], d["classes"][roofline.LN][2]["H100 SXM"]
    assert roof == pytest.approx(nbytes / 3.35e12)
    st = d["step"]["H100 SXM"]
    assert st["roofline_ms"] == pytest.approx(1e3 * sum(c[2]["H100 SXM"][0] for c in d["classes"].values()))
    assert st["mfu_roofline"] == pytest.approx(summary["model_flops"] / (st["roofline_ms"] / 1e3 * 989_400e9))
    assert st["tokens_per_s"] == pytest.approx(N / (st["expected_ms"] / 1e3))
    assert GPU_PEAKS["H100 SXM"]["16-bit"] == 989_400 and GPU_PEAKS["H100 SXM"]["tf32"] == 494_700
    linear = d["classes"][roofline.LINEAR]
    assert linear[2]["H100 SXM"][0] >= linear[0] / 989_400e9  # a GEMM is never faster than its FLOPs at peak


def test_the_docs_hold_what_the_script_computes_now():
    text = roofline.markdown(roofline.summarize(CFG, B, T), CFG, B, T)
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    assert roofline.BEGIN + "\n" + text + roofline.END in doc, "rerun: python benchmarks/roofline.py --update-docs"


def test_the_fused_layernorm_moves_seven_passes_of_its_activations(summary):
    """kernels/layernorm.cu: the forward reads x and writes out; the backward's dw/db kernel reads dout and
    x, its dx kernel reads them again and writes dx. 2L + 1 LayerNorms of (B T, C), 2 bytes in bf16."""
    nbytes = summary["designs"]["new"]["bf16"]["classes"][roofline.LN][1]
    assert nbytes == (2 + 5) * 2 * N * 768 * (2 * 12 + 1)
