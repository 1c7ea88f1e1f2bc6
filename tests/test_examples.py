"""The learner's track: every script in examples/ runs in fast mode and shows what it claims to show,
and docs/backprop.md has every anchor the layer files point to."""

import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BACKPROP_MD = REPO / "docs" / "backprop.md"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

EXPECTED_EXAMPLES = [
    "01_layernorm.py",
    "02_gelu_vs_relu.py",
    "03_feed_forward.py",
    "04_shortcut_connections.py",
    "05_transformer_block.py",
    "06_gpt_model.py",
    "07_generate_untrained.py",
    "08_dataset.py",
    "09_cross_entropy.py",
    "10_training_loop.py",
    "11_chinese_pretraining.py",
    "12_check_your_own_layer.py",
    "13_translation_transformer.py",
    "14_classification_finetuning.py",
    "15_instruction_finetuning.py",
]


def run_example(name: str, out_dir: Path) -> str:
    """Run examples/<name> in fast mode with its outputs in out_dir; return its stdout."""
    env = {
        **os.environ,  # keeps NPGPT_CACHE_DIR from conftest: nothing is written to ~/.cache
        "NPGPT_EXAMPLES_FAST": "1",
        "NPGPT_EXAMPLES_OUT": str(out_dir),
        "NPGPT_DEVICE": "cpu",
        "MPLBACKEND": "Agg",
        "PYTHONIOENCODING": "utf-8",
    }
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], cwd=out_dir, env=env, capture_output=True,
        encoding="utf-8", errors="replace", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"{name} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"


def test_examples_are_the_course_in_order():
    found = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    assert found == EXPECTED_EXAMPLES
    for name in found:
        source = (EXAMPLES / name).read_text(encoding="utf-8")
        assert source.startswith('"""'), f"{name} must open with a docstring saying what it teaches"
        assert "Run:" in source.split('"""')[1], f"{name}'s docstring must say how to run it"


def test_01_layernorm(tmp_path):
    out = run_example("01_layernorm.py", tmp_path)
    assert "every row has mean 0 and variance 1" in out
    assert "layernorm gradcheck: all passed" in out
    assert re.search(r"layernorm\s+dx\s+64/96\s+axes\s", out)  # every index of every axis, 64 in all
    assert re.search(r"layernorm\s+dweight\s+8/8\s+all\s", out)
    assert "covers axes: every index of every axis perturbed at least once" in out
    assert "FAIL" not in out


def test_02_gelu_vs_relu(tmp_path):
    out = run_example("02_gelu_vs_relu.py", tmp_path)
    assert_png(tmp_path / "02_gelu_vs_relu.png")
    slope_error = float(re.search(r"max \|gelu_backward - numerical slope\|: (\S+)", out).group(1))
    assert slope_error < 1e-6


def test_03_feed_forward(tmp_path):
    out = run_example("03_feed_forward.py", tmp_path)
    assert "after expand (c_fc): (2, 3, 3072)" in out
    assert "after project:       (2, 3, 768)" in out
    assert "4,722,432" in out


def test_04_shortcut_connections(tmp_path):
    out = run_example("04_shortcut_connections.py", tmp_path)
    assert_png(tmp_path / "04_shortcut_connections.png")
    without, with_ = out.split("with shortcuts:")[0], out.split("with shortcuts:")[1]
    norms_without = [float(v) for v in re.findall(r"\|dW\| = (\S+)", without)]
    norms_with = [float(v) for v in re.findall(r"\|dW\| = (\S+)", with_)]
    assert len(norms_without) == len(norms_with) >= 5
    assert norms_without[0] < norms_without[-1] / 10  # vanishing towards the first layer
    assert norms_with[0] > 10 * norms_without[0]  # the shortcuts carry the gradient back


def test_05_transformer_block(tmp_path):
    out = run_example("05_transformer_block.py", tmp_path)
    assert "input shape:  (2, 4, 768)" in out and "output shape: (2, 4, 768)" in out
    assert "7,085,568" in out
    assert "block gradcheck: all 13 tensors passed" in out


def test_06_gpt_model(tmp_path):
    out = run_example("06_gpt_model.py", tmp_path)
    assert "Total number of parameters (untied output head): 163,009,536" in out
    assert "Number of parameters with weight tying:          124,412,160" in out
    assert "621.83 MB" in out and "474.59 MB" in out
    assert "Output shape: (2, 4, 50257)" in out


def test_07_generate_untrained(tmp_path):
    out = run_example("07_generate_untrained.py", tmp_path)
    assert out.count("top-5 next tokens") == 3  # fast mode: three new tokens, one line each
    assert "model.generate(..., temperature=0) gives the same tokens: True" in out
    assert "output text: 'Every effort moves you" in out


def test_08_dataset(tmp_path):
    out = run_example("08_dataset.py", tmp_path)
    assert "20,479 characters -> 5,145 tokens" in out
    assert "'I HAD always' ---> ' thought'" in out
    assert "18 training windows (9 batches of 2)" in out


def test_09_cross_entropy(tmp_path):
    out = run_example("09_cross_entropy.py", tmp_path)
    by_hand = float(re.search(r"cross-entropy by hand: (\S+)", out).group(1))
    library = float(re.search(r"softmax_cross_entropy_forward: (\S+)", out).group(1))
    assert "match: True" in out
    assert by_hand == pytest.approx(library, rel=1e-5)
    assert 9.0 < library < 12.0  # untrained: about log(50257) = 10.8


def test_10_training_loop(tmp_path):
    out = run_example("10_training_loop.py", tmp_path)
    assert_png(tmp_path / "10_training_loop.png")
    assert re.search(r"train loss \S+ -> \S+, val loss \S+ -> \S+", out)
    assert "after epoch 1: 'Every effort moves you" in out


def test_11_chinese_pretraining(tmp_path):
    out = run_example("11_chinese_pretraining.py", tmp_path)
    run_dir = tmp_path / "11_chinese_pretraining"
    assert_png(run_dir / "loss.png")
    assert (run_dir / "summary.json").is_file()
    assert list((run_dir / "checkpoints").glob("step-*/model.safetensors"))
    assert "--- sample 1 ---\n床前明月光" in out


def test_12_check_your_own_layer(tmp_path):
    out = run_example("12_check_your_own_layer.py", tmp_path)
    assert out.count("FAILED") == 3  # one line per deliberate mistake
    assert "backward modified dout" in out
    assert "gradient of x has shape (5,), expected (4, 5)" in out
    assert "refused: gradcheck: mish_dropout's forward is not deterministic: two calls on the same inputs" in out
    assert re.search(r"mish_dropout\s+dx\s+20/20\s+all\s+\S+\s+1e-07\s+pass", out)  # seeded inside: checked
    assert "All checks behaved as expected" in out


# --- every example is also a notebook -------------------------------------------------------------

CELL_MARKER = re.compile(r"^# %%(.*)$", re.MULTILINE)


def percent_cells(source: str) -> list[tuple[str, str]]:
    """(kind, text) of every cell of a `# %%` script, kind "markdown" for `# %% [markdown]` cells,
    "code" for the others and "before" for the text above the first marker (which VS Code does not run)."""
    marks = list(CELL_MARKER.finditer(source))
    cells = [("before", source[: marks[0].start()] if marks else source)]
    for m, nxt in zip(marks, marks[1:] + [None]):
        kind = "markdown" if m.group(1).strip() == "[markdown]" else "code"
        cells.append((kind, source[m.end() : nxt.start() if nxt else len(source)]))
    return cells


@pytest.mark.parametrize("name", EXPECTED_EXAMPLES)
def test_every_example_is_a_notebook_with_prose_between_its_cells(name):
    source = (EXAMPLES / name).read_text(encoding="utf-8")
    cells = percent_cells(source)
    kinds = [kind for kind, _ in cells]
    assert kinds.count("markdown") >= 1 and kinds.count("code") >= 2, f"{name}: too few cells"
    before = cells[0][1].strip()  # only the docstring: an editor that skips it loses nothing
    assert isinstance(ast.literal_eval(before), str), f"{name}: code above the first `# %%` line"
    assert "Notebook:" in before, f"{name}'s docstring must say it opens as a notebook"
    for kind, text in cells[1:]:
        if kind == "markdown":
            lines = [line for line in text.splitlines() if line.strip()]
            assert lines and all(line.startswith("#") for line in lines), f"{name}: markdown cell with code:\n{text}"
        else:
            compile(text, f"{name} cell", "exec")  # a cell must not cut a statement in two
    assert not list(EXAMPLES.glob("*.ipynb")), "no .ipynb copies to keep in sync"


@pytest.mark.parametrize("name", EXPECTED_EXAMPLES)
def test_jupytext_reads_the_same_cells(name):
    """What Jupyter shows through jupytext: the docstring cell, then the cells above, markdown as markdown."""
    jupytext = pytest.importorskip("jupytext")
    notebook = jupytext.read(EXAMPLES / name)
    ours = [(kind, text.strip("\n")) for kind, text in percent_cells((EXAMPLES / name).read_text(encoding="utf-8"))]
    assert [c.cell_type for c in notebook.cells] == ["code" if kind == "before" else kind for kind, _ in ours]
    for cell, (kind, text) in zip(notebook.cells, ours):
        if kind == "markdown":  # jupytext strips the comment signs
            assert cell.source == "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.splitlines())
        else:
            assert cell.source.strip() == text.strip()


NOTEBOOK_RUNNER = """
import sys
sys.path.insert(0, sys.argv[2])
from test_examples import percent_cells
namespace = {"__name__": "__main__"}  # a notebook kernel: no __file__, cells run one after the other
source = open(sys.argv[1], encoding="utf-8").read()
for kind, text in percent_cells(source):
    if kind != "markdown":
        exec(compile(text, sys.argv[1], "exec"), namespace)
"""


@pytest.mark.parametrize("name", EXPECTED_EXAMPLES)
def test_examples_run_cell_by_cell_like_a_notebook(name, tmp_path):
    """Cells run in order in one namespace with no __file__ (as in Jupyter); plots go to out/ in the
    working directory, the notebook's folder."""
    env = {**os.environ, "NPGPT_EXAMPLES_FAST": "1", "NPGPT_DEVICE": "cpu", "MPLBACKEND": "Agg", "PYTHONIOENCODING": "utf-8"}
    env.pop("NPGPT_EXAMPLES_OUT", None)
    proc = subprocess.run(
        [sys.executable, "-c", NOTEBOOK_RUNNER, str(EXAMPLES / name), str(Path(__file__).parent)],
        cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"{name} as a notebook:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    pngs = {"02_gelu_vs_relu.py": "02_gelu_vs_relu.png", "04_shortcut_connections.py": "04_shortcut_connections.png",
            "10_training_loop.py": "10_training_loop.png", "11_chinese_pretraining.py": "11_chinese_pretraining/loss.png",
            "14_classification_finetuning.py": "14_classification_finetuning/confusion.png",
            "15_instruction_finetuning.py": "15_instruction_finetuning/loss.png"}  # fmt: skip
    if name in pngs:
        assert_png(tmp_path / "out" / pngs[name])


def test_13_translation_transformer(tmp_path):
    out = run_example("13_translation_transformer.py", tmp_path)
    assert_png(tmp_path / "13_translation_transformer.png")
    assert "2,064 pairs -> 1,858 for training, 206 held out" in out
    assert re.search(r"padding mask \(True = ignored as a key\):\n\[\[False", out)
    assert re.search(r"decoder: tgt_in \(3, \d+\) \+ memory -> logits \(3, \d+, 1847\)", out)
    first, last = (float(v) for v in re.search(r"held-out loss (\S+) -> (\S+)", out).groups())
    assert last < first  # it learns, even in a few steps
    assert out.count("greedy: ") == 3 and out.count("beam 4: ") == 3
    assert re.search(r"held-out \(50 pairs, greedy\): exact match \S+%, BLEU \S+", out)
    assert "cannot translate yet, so an exact match near 0% and a BLEU near 0 are expected" in out
    # The untrained loss: ln V + s^2 / 2 for tied logits of spread s (about 1), not ln V.
    loss = float(re.search(r"untrained loss (\S+)", out).group(1))
    ln_v, s, predicted = (float(v) for v in re.search(r"ln V = (\S+), but .* std s = (\S+), .* = (\S+)$", out, re.M).groups())
    assert ln_v == pytest.approx(math.log(1847), abs=1e-3) and 0.8 < s < 1.2
    assert predicted == pytest.approx(ln_v + s * s / 2, abs=0.01)  # s is printed to 2 decimals
    assert abs(loss - predicted) < 0.1 < loss - ln_v  # the half nat is real; the prediction accounts for it


def test_14_classification_finetuning(tmp_path):
    out = run_example("14_classification_finetuning.py", tmp_path)
    run_dir = tmp_path / "14_classification_finetuning"
    for png in ("loss.png", "accuracy.png", "confusion.png"):
        assert_png(run_dir / png)
    assert "'春眠不觉晓，': 14 tokens, padded to 23; the head reads position 13, which has seen '春眠不觉晓，'" in out
    assert "FAIL" not in out and "mixed_loss" in out and "classifier_head" in out
    acc, base = re.search(r"test accuracy (\S+)% against a majority-class baseline of (\S+)%", out).groups()
    assert 0 <= float(acc) <= 100 and 0 < float(base) < 100
    assert out.count("true: ") == 4


def test_15_instruction_finetuning(tmp_path):
    out = run_example("15_instruction_finetuning.py", tmp_path)
    assert_png(tmp_path / "15_instruction_finetuning" / "loss.png")
    assert "### Instruction:\nContinue this line of the poem." in out and "### Response:\n" in out
    assert re.search(r"\d+ positions: \d+ targets inside the prompt are -100, \d+ count", out)
    assert "'Continue this line of the poem.': exact" in out
    assert "'Is this the first or the second half of a line?': exact" in out
    assert "the most frequent answer in training" in out


# --- docs/backprop.md --------------------------------------------------------------------------------


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes for a Markdown file's headings (fenced code blocks skipped)."""
    anchors, seen, in_fence = set(), {}, False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_fence or not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_github_anchor_rules():
    md = "# Top\n## Cross-entropy\n```\n# not a heading\n```\n## Softmax and its Jacobian\n## Cross-entropy\n"
    assert github_anchors(md) == {"top", "cross-entropy", "softmax-and-its-jacobian", "cross-entropy-1"}


def test_every_layer_anchor_exists_in_backprop_md():
    anchors = github_anchors(BACKPROP_MD.read_text(encoding="utf-8"))
    referenced = {}
    for path in sorted((REPO / "npgpt" / "layers").glob("*.py")):
        for anchor in re.findall(r"docs/backprop\.md#([\w-]+)", path.read_text(encoding="utf-8")):
            referenced.setdefault(anchor, []).append(path.name)
    assert {"embedding", "linear", "layernorm", "gelu", "attention", "cross-entropy", "dropout"} <= set(referenced)
    missing = {a: files for a, files in referenced.items() if a not in anchors}
    assert not missing, f"anchors referenced from npgpt/layers but not headings of docs/backprop.md: {missing}"


def test_backprop_md_internal_links_resolve():
    text = BACKPROP_MD.read_text(encoding="utf-8")
    anchors = github_anchors(text)
    broken = sorted(set(re.findall(r"\]\(#([\w-]+)\)", text)) - anchors)
    assert not broken, f"links to missing sections: {broken}"


def test_the_learning_track_lists_every_example_and_the_readme_links_it():
    """The README's learning track moved to docs/learning-track.md (issue 30); the README links it."""
    track = (REPO / "docs" / "learning-track.md").read_text(encoding="utf-8")
    assert "## All fifteen scripts" in track
    section = track.split("## All fifteen scripts", 1)[1].split("\n## ", 1)[0]
    assert "](backprop.md)" in section
    positions = [section.find(f"examples/{name}") for name in EXPECTED_EXAMPLES]
    assert all(p >= 0 for p in positions), "every example is listed"
    assert positions == sorted(positions), "examples are listed in course order"
    assert "](docs/learning-track.md)" in (REPO / "README.md").read_text(encoding="utf-8")
