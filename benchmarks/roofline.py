"""The roofline of one GPT-2 training step on an H100 (issue 26, item 5): each op class's FLOPs and HBM
bytes, the least time it can take, and the step time, tokens/s and MFU that follow, for npgpt's GPU path
before issue 26 ("old"), with it ("new"), and for PyTorch eager (the `npgpt bench --vs-torch` twin:
transformers' GPT2LMHeadModel with sdpa attention, torch.autocast for bf16, torch.optim.AdamW), so that
the first GPU run (issue 27) has numbers to be judged by.

    python benchmarks/roofline.py                            # 124M, B=16, T=1024: the tables, printed
    python benchmarks/roofline.py --update-docs              # ... and written into docs/benchmarks.md's marked section
    python benchmarks/roofline.py --batch-size 8 --json r.json

How a step is modelled (every figure below follows from the model config and these rules):
- An op's time at the roofline is max(FLOPs / peak, bytes / HBM bandwidth): no faster than its arithmetic
  on the units it runs on (tensor cores, TF32 or 16-bit; the FP32 cores for the old flash kernel), nor
  than moving its bytes through HBM once. The step is the sum of its ops (one stream: kernels run one
  after another). Peaks: npgpt.bench.GPU_PEAKS (dense, NVIDIA's data sheets); bandwidth: HBM below.
- Bytes: each kernel reads its inputs from HBM and writes its outputs once; reuse inside a kernel (tiles,
  the second pass over a softmax row) is on chip or in L2 and not counted. A CuPy elementwise op or
  reduction is one kernel per NumPy-style operation: the old 16-bit path's chains are counted pass by
  pass from the fast ops' code (the per-element byte counts below name the function), temporaries
  through HBM (an upper bound: GPU_ROW_BLOCK-row blocks may partly stay in the 50 MB L2).
- "expected" replaces each peak by peak x EFFICIENCY: assumptions (stated below), not measurements; the
  first GPU run replaces them.
- MFU = the model's FLOPs (npgpt.memory.step_flops: 6 per parameter of the matrix products plus 12 L T C
  per token, the causal half of attention counted, the vocabulary unpadded, as `npgpt bench` reports)
  / (step time x the dense tensor-core peak of the precision: TF32 for "tf32", 16-bit for "bf16").
- Dropout off, as the benchmark runs it (a mask would add its bytes); no gradient accumulation.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from npgpt.bench import GPU_PEAKS
from npgpt.config import GPTConfig
from npgpt.memory import VOCAB_MULTIPLE, padded_vocab, param_count, step_flops

HBM = {"H100 SXM": 3.35e12, "H100 PCIe": 2.0e12}  # bytes/s (HBM3, HBM2e; NVIDIA's data sheets)
GPUS = tuple(HBM)
PRECISIONS = {"tf32": (4, "tf32"), "bf16": (2, "16-bit")}  # activation bytes, GPU_PEAKS key of the tensor cores
DESIGNS = ("old", "new", "torch")
# What fraction of a peak each kind of work is assumed to reach ("expected"); None: the roofline itself.
EFFICIENCY = {
    "gemm": 0.70,  # cuBLAS on the step's large GEMMs (16384 x 768 x 2304 and up), all dimensions multiples of 128
    "gemm_odd": 0.35,  # the same with one dimension odd (the unpadded 50257-column head): alignment-1 kernels, assumed half
    "memory": 0.80,  # of HBM bandwidth, for any elementwise kernel or reduction, fused or CuPy's
    "flash_fp32": None,  # kernels/attention.cu on the FP32 cores: FLASH_FP32_FLOPS below, absolute
    "flash2": 0.45,  # sdpa's FlashAttention-2 (bf16) or memory-efficient kernel (fp32) on the executed FLOPs
}
FLASH_FP32_FLOPS = 20e12  # issue 26's estimate for kernels/attention.cu (ptxas: 96-128 registers, 15-25 TFLOP/s)


@dataclass(frozen=True)
class Op:
    cls: str  # the op class a table row sums
    flops: float  # executed FLOPs
    bytes: float  # HBM bytes
    unit: str = "tensor"  # what the FLOPs run on: "tensor" (the precision's tensor cores) or "fp32"
    kind: str = "memory"  # its EFFICIENCY key


def _gemm(cls, m, k, n, a, out=None, kind="gemm"):
    """(m, k) @ (k, n) -> (m, n): 2mkn FLOPs; operands of a bytes read, the result (out bytes, default a) written."""
    return Op(cls, 2.0 * m * k * n, a * (m * k + k * n) + (a if out is None else out) * m * n, "tensor", kind)


def _mem(cls, nbytes):
    return Op(cls, 0.0, float(nbytes))


LINEAR = "matmuls: the blocks' linear layers"
HEAD = "matmuls: LM head"
ATT_MM = "attention: q k^T, P v and their backward"
ATT_EW = "attention: scale, mask, softmax (T x T elementwise)"
ATT_COPY = "attention: heads layout copies"
LN = "LayerNorm"
GELU = "GELU"
GLUE = "bias adds and sums, residual adds"
LOSS = "loss over the vocabulary"
EMB = "embeddings"
OPT = "AdamW, gradient norm, weight copies"
CLASSES = (LINEAR, HEAD, ATT_MM, ATT_EW, ATT_COPY, LN, GELU, GLUE, LOSS, EMB, OPT)

# Bytes per element of the old 16-bit path's CuPy chains (bfloat16 in and out, float32 temporaries),
# one pass per NumPy-style op in the named fast op (docs/benchmarks.md lists the passes).
OLD16_LN_FWD, OLD16_LN_BWD = 64, 110  # fast.layernorm_forward / layernorm_backward, per element of (N, C)
OLD16_GELU_FWD, OLD16_GELU_BWD = 100, 182  # fast.gelu_forward (bias add included) / gelu_backward_, of (N, 4C)
OLD16_LOSS = 52  # fast.cross_entropy_ with the gradient, per logit
OLD16_ADAMW = 124 + 4 + 6  # optim._adamw_update (13 passes), the norm's read, the 16-bit copy, per parameter
OLD16_SOFTMAX_PASSES = 10 + 9  # fast.attention's _softmax_ (10) and _softmax_backward_ (9), over (B, NH, T, T)
# PyTorch eager, per element: NewGELU is eight elementwise kernels forward (0.5 x (1 + tanh(s (x + a x^3))))
# and about ten backward (in the activations' dtype); under autocast LayerNorm and the loss run in float32
# with casts around them; torch.optim.AdamW's foreach path (not fused) is about 20 accesses per parameter.
TORCH_GELU_FWD, TORCH_GELU_BWD = 18, 28  # times a (the activations' bytes)
TORCH_ADAMW = 80  # bytes per parameter; autocast adds a 16-bit cast of each weight and a float32 cast of its gradient


def design_ops(cfg: GPTConfig, B: int, T: int, design: str, precision: str) -> list:
    """Every op of one training step (forward, backward, optimizer) of `design` at `precision`."""
    a = PRECISIONS[precision][0]
    N, C, L, V, H = B * T, cfg.emb_dim, cfg.n_layers, cfg.vocab_size, cfg.n_heads
    hs, att, P = C // H, B * H * T * T, param_count(cfg)
    lowp = a == 2
    ops = []
    # The blocks' linear layers: forward, dx, dW for c_attn, attn.c_proj, c_fc, mlp.c_proj. A 16-bit dW is
    # written in 16 bits and then read into the float32 gradient (npgpt; torch: the autocast cast's backward).
    for fan_in, fan_out in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)):
        for _ in range(L):
            ops += [_gemm(LINEAR, N, fan_in, fan_out, a), _gemm(LINEAR, N, fan_out, fan_in, a), _gemm(LINEAR, fan_in, N, fan_out, a)]
            if lowp:
                ops.append(_mem(LINEAR, (2 + 4) * fan_in * fan_out))
    # The LM head: logits = lnf @ head^T, dlnf = dlogits @ head, dhead = dlogits^T @ lnf.
    Vh = padded_vocab(V, VOCAB_MULTIPLE["gpu"]) if design == "new" else V
    kind = "gemm" if Vh % 128 == 0 else "gemm_odd"
    ops += [_gemm(HEAD, N, C, Vh, a, kind=kind), _gemm(HEAD, N, Vh, C, a, kind=kind), _gemm(HEAD, Vh, N, C, a, kind=kind)]
    if design == "new" and Vh != V:  # the padded weight copy each forward, and the gradient's V rows copied out
        ops.append(_mem(HEAD, 2 * a * V * C + (a + 4) * V * C))
    elif lowp:  # the 16-bit weight gradient into float32 (npgpt's product scratch; torch's autocast cast)
        ops.append(_mem(HEAD, (2 + 4) * V * C))
    ops += _attention_ops(design, precision, L, N, C, att, hs, a)
    ops += _elementwise_ops(design, precision, L, N, C, V if design != "new" else Vh, P, a)
    return ops


def _attention_ops(design, precision, L, N, C, att, hs, a) -> list:
    ops = []
    for _ in range(L):
        if design == "torch":  # sdpa: FlashAttention-2 (bf16) / memory-efficient (fp32): causal half executed,
            # fwd 2 products, bwd 5; q, k, v, out, dout read and dq, dk, dv written; no T x T in HBM
            ops.append(Op(ATT_MM, 7.0 * att * hs, a * 12 * N * C, "tensor", "flash2"))
            ops.append(_mem(ATT_COPY, a * (2 + 2 + 6) * N * C))  # out's transpose copy; its backward; dqkv's concatenation
        elif design == "old" and precision == "tf32":  # kernels/attention.cu: fwd 2 products, bwd 7 (dkdv 4, dq 3), causal half
            # HBM: fwd reads q, k, v, writes out; bwd: rowdot reads dO, out; dkdv reads q, k, v, dO, writes dk, dv;
            # dq reads q, k, v, dO, writes dq (the K, V tiles' reuse is on chip or in L2)
            ops.append(Op(ATT_MM, 9.0 * att * hs, 4 * (4 + 2 + 6 + 5) * N * C, "fp32", "flash_fp32"))
            ops.append(_mem(ATT_COPY, 4 * (6 + 2 + 2 + 2 + 2 + 6) * N * C))  # split, q's scaling; merge; dy, y into heads; dqkv
        else:  # cuBLAS strided-batched: the full T x T products; the scores written, then read by the softmax
            # q k^T writes the scores, P v reads them; backward: dv = P^T dy and dk = dS^T q, dq = dS k read a T x T
            # matrix, dP = dy v^T writes one; each also moves two (N, C)-sized operands
            for _ in range(6):
                ops.append(Op(ATT_MM, 2.0 * att * hs, a * (att + 2 * N * C), "tensor", "gemm"))
            # split (and old: q's scaling), merge; dy into heads (old: dq's scaling), dqkv
            ops.append(_mem(ATT_COPY, a * (6 + 2 + 2 + 6 + (4 if design == "old" else 0)) * N * C))
            if design == "new":  # attention_softmax.cu: forward reads the causal half, writes every element;
                ops.append(_mem(ATT_EW, a * (0.5 + 1) * att))  # the backward reads P and dP (half each), writes dS
                ops.append(_mem(ATT_EW, a * (0.5 + 0.5 + 1) * att))
            else:  # the old CuPy chains
                ops.append(_mem(ATT_EW, a * OLD16_SOFTMAX_PASSES * att))
    return ops


def _elementwise_ops(design, precision, L, N, C, Vh, P, a) -> list:
    lowp, old16 = a == 2, design == "old" and a == 2
    ops = []
    n_ln = 2 * L + 1
    if old16:
        ops += [_mem(LN, (OLD16_LN_FWD + OLD16_LN_BWD) * N * C * n_ln)]
        ops += [_mem(GELU, (OLD16_GELU_FWD + OLD16_GELU_BWD) * 4 * N * C * L)]
        ops += [_mem(LOSS, OLD16_LOSS * N * Vh), _mem(OPT, OLD16_ADAMW * P)]
    elif design == "torch":
        ln = (20 + 30) if lowp else (8 + 12)  # autocast: cast in, float32 LayerNorm, cast out; and back
        ops += [_mem(LN, ln * N * C * n_ln), _mem(GELU, a * (TORCH_GELU_FWD + TORCH_GELU_BWD) * 4 * N * C * L)]
        ops += [_mem(LOSS, (40 if lowp else 28) * N * Vh)]  # log_softmax and nll (in float32), their backward, casts
        ops += [_mem(OPT, (TORCH_ADAMW + (6 if lowp else 0)) * P)]  # + autocast's 16-bit copy of each weight
    else:  # fused kernels: LayerNorm r/w, its backward r 4 w 1 (dout and x read by the dw/db kernel, then
        # again by the dx kernel: kernels/layernorm.cu); GELU r 1 w 2 (pre kept), back r 2 w 1; the loss in
        # place, reading a row twice (a 200 KB row does not stay on chip) and writing it once; AdamW r p g m v,
        # w p m v (+ the 16-bit copy in the same pass), the gradient norm's read
        ops += [_mem(LN, a * (2 + 5) * N * C * n_ln), _mem(GELU, a * (3 + 3) * 4 * N * C * L)]
        ops += [_mem(LOSS, a * 3 * N * Vh), _mem(OPT, (28 + 4 + (2 if lowp else 0)) * P)]
    r = 4 if design == "torch" and lowp else a  # autocast keeps the residual stream in float32
    biases = 0 if design == "torch" else 2 * a * (3 + 1 + 1)  # npgpt adds biases in a pass of its own (c_fc's in GELU)
    per_layer = (biases + 2 * (2 * r + a) + a * (3 + 1 + 4 + 1) + 2 * 3 * r) * N * C  # + the bias sums, the gradient adds
    ops.append(_mem(GLUE, per_layer * L))
    ops.append(_mem(EMB, (3 * r + 2 * 4 + r) * N * C))  # gather and add positions; scatter-add into wte, wpe's sum
    return ops


def op_time(op: Op, gpu: str, precision: str, expected: bool) -> float:
    """Seconds of one op at the roofline (or expected: at EFFICIENCY of each peak)."""
    peak = GPU_PEAKS[gpu][PRECISIONS[precision][1] if op.unit == "tensor" else "fp32"] * 1e9
    bandwidth = HBM[gpu]
    if expected:
        if op.kind == "flash_fp32":
            peak = FLASH_FP32_FLOPS
        elif op.kind != "memory":
            peak *= EFFICIENCY[op.kind]
        bandwidth *= EFFICIENCY["memory"]
    return max(op.flops / peak, op.bytes / bandwidth)


def summarize(cfg: GPTConfig, B: int, T: int) -> dict:
    """{design: {precision: {"classes": {cls: (flops, bytes, {gpu: (roofline s, expected s)})},
    "step": {gpu: {...}}}}} and the model's FLOPs."""
    model_flops = step_flops(cfg, B, T)[0]
    out = {"model_flops": model_flops, "tokens": B * T, "designs": {}}
    for design in DESIGNS:
        out["designs"][design] = {}
        for precision in PRECISIONS:
            ops = design_ops(cfg, B, T, design, precision)
            classes = {}
            for cls in CLASSES:
                mine = [o for o in ops if o.cls == cls]
                times = {g: (sum(op_time(o, g, precision, False) for o in mine), sum(op_time(o, g, precision, True) for o in mine))
                         for g in GPUS}  # fmt: skip
                classes[cls] = (sum(o.flops for o in mine), sum(o.bytes for o in mine), times)
            step = {}
            for g in GPUS:
                peak = GPU_PEAKS[g][PRECISIONS[precision][1]] * 1e9
                roof, exp = (sum(c[2][g][i] for c in classes.values()) for i in (0, 1))
                step[g] = {"roofline_ms": roof * 1e3, "expected_ms": exp * 1e3, "tokens_per_s": B * T / exp,
                           "mfu_roofline": model_flops / (roof * peak), "mfu_expected": model_flops / (exp * peak)}  # fmt: skip
            out["designs"][design][precision] = {"classes": classes, "step": step}
    return out


NAMES = {"old": "npgpt before issue 26", "new": "npgpt with issue 26", "torch": "PyTorch eager"}
DETAIL = {
    ("old", "tf32"): "NPGPT_CUDA_KERNELS=all: the flash kernel on the FP32 cores, fused float32 kernels, head 50257",
    ("old", "bf16"): "no kernel applies at 16 bits: CuPy chains, the (B, NH, T, T) softmax in 19 passes, head 50257",
    ("new", "tf32"): "cuBLAS products and attention_softmax.cu, fused float32 kernels, head padded to 50304",
    ("new", "bf16"): "the same at 16 bits, with the 16-bit fused kernels (LayerNorm, GELU, loss, AdamW)",
    ("torch", "tf32"): "transformers GPT2LMHeadModel, sdpa (memory-efficient kernel), foreach AdamW",
    ("torch", "bf16"): "the same under torch.autocast(bfloat16): sdpa's FlashAttention-2, float32 LayerNorm and loss",
}


def markdown(s: dict, cfg: GPTConfig, B: int, T: int) -> str:
    """The summary table (every design, precision and GPU), then one table of op classes per design and
    precision on the H100 SXM."""
    lines = [f"GPT-2 {param_count(cfg) / 1e6:.0f}M, B={B}, T={T} ({B * T:,} tokens a step), model FLOPs "
             f"{s['model_flops'] / 1e12:.1f} TFLOP a step. Roofline: each op at max(FLOPs / peak, bytes / "
             "bandwidth); expected: at the assumed efficiencies (benchmarks/roofline.py, EFFICIENCY).", "",
             "| design | precision | GPU | roofline ms | expected ms | expected tokens/s | MFU roofline | MFU expected |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for design in DESIGNS:
        for precision in PRECISIONS:
            for g in GPUS:
                st = s["designs"][design][precision]["step"][g]
                lines.append(f"| {NAMES[design]} | {precision} | {g} | {st['roofline_ms']:.1f} | {st['expected_ms']:.1f} | "
                             f"{st['tokens_per_s']:,.0f} | {st['mfu_roofline']:.0%} | {st['mfu_expected']:.0%} |")  # fmt: skip
    for design in DESIGNS:
        for precision in PRECISIONS:
            d = s["designs"][design][precision]
            lines += ["", f"**{NAMES[design]}, {precision}** ({DETAIL[(design, precision)]}); H100 SXM:", "",
                      "| op class | GFLOP | GB moved | roofline ms | expected ms |", "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
            for cls, (flops, nbytes, times) in d["classes"].items():
                roof, exp = times["H100 SXM"]
                lines.append(f"| {cls} | {flops / 1e9:,.0f} | {nbytes / 1e9:.1f} | {roof * 1e3:.2f} | {exp * 1e3:.2f} |")
            st = d["step"]["H100 SXM"]
            flops = sum(c[0] for c in d["classes"].values())
            nbytes = sum(c[1] for c in d["classes"].values())
            lines.append(f"| **step** | {flops / 1e9:,.0f} | {nbytes / 1e9:.1f} | {st['roofline_ms']:.2f} | {st['expected_ms']:.2f} |")
    return "\n".join(lines) + "\n"


DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BEGIN, END = "<!-- roofline.py: begin (generated: python benchmarks/roofline.py --update-docs) -->", "<!-- roofline.py: end -->"


def update_docs(text: str, path: Path = DOCS) -> None:
    """Replace what lies between BEGIN and END in `path` by `text` (the markers must be there once each)."""
    doc = path.read_text()
    if doc.count(BEGIN) != 1 or doc.count(END) != 1:
        raise SystemExit(f"{path} must hold the markers {BEGIN!r} and {END!r} once each")
    head, rest = doc.split(BEGIN)
    path.write_text(head + BEGIN + "\n" + text + rest[rest.index(END) :])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", help="a GPTConfig preset (default gpt2: 124M)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--update-docs", action="store_true", help=f"write the tables into {DOCS.name}'s marked section")
    args = p.parse_args(argv)
    cfg = GPTConfig.from_preset(args.preset, drop_rate=0.0)
    s = summarize(cfg, args.batch_size, args.seq_len)
    text = markdown(s, cfg, args.batch_size, args.seq_len)
    print(text, end="")
    if args.update_docs:
        update_docs(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)


if __name__ == "__main__":
    main()
