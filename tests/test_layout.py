"""The package's shape: imports flow one way, every readable layer has its fast twin, and the Python
API does not need the command line. Read from the source (lazy imports inside functions included)."""

import ast
from pathlib import Path

import npgpt

ROOT = Path(npgpt.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str) -> set:
    """The npgpt modules (or packages) that module `name` imports anywhere in its source."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("npgpt") and m != name}


def test_the_import_graph_has_no_cycle():
    graph = {m: imports_of(m) for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for dep in sorted(graph.get(m, ())):
            visit(dep, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_layers_and_fast_ops_import_only_what_lies_below_them():
    below = ("npgpt.backend", "npgpt.parallel", "npgpt.precision", "npgpt.layers")
    for name in MODULES:
        if name.startswith("npgpt.layers"):
            assert all(m.startswith(below[0:1] + ("npgpt.layers",)) for m in imports_of(name)), name
        if name.startswith("npgpt.fast"):
            assert all(m.startswith(below + ("npgpt.fast",)) for m in imports_of(name)), (name, imports_of(name))


def test_only_the_command_line_uses_argparse_or_the_cli_package():
    for name, path in MODULES.items():
        if name == "npgpt.cli" or name.startswith("npgpt.cli.") or name == "npgpt.__main__":
            continue
        tree = ast.parse(path.read_text())
        plain = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "argparse" not in plain, f"{name} imports argparse: command-line code belongs in npgpt/cli/"
        assert not any(m.startswith("npgpt.cli") for m in imports_of(name)), f"{name} imports npgpt.cli"


def test_every_readable_layer_has_a_fast_twin_of_the_same_name():
    # Composites, which have no compute of their own: the fast steps call their parts' ops. GPT-2's block and
    # MLP (npgpt/engine/block.py wires their layers); the encoder's and decoder's blocks (post- or pre-norm
    # sub-layers, wired in seq2seq/engine.py). Everything else, fine-tuning's classifier_head and mixed_loss
    # included, has a file of its own in fast/ that names its readable twin.
    composites = {"block", "ffn", "encoder_block", "decoder_block"}
    layers = {p.stem for p in (ROOT / "layers").glob("*.py")}
    assert composites <= layers
    readable = layers - {"__init__"} - composites
    fast = {p.stem for p in (ROOT / "fast").glob("*.py")} - {"__init__", "common"}
    assert readable == fast, f"no fast twin: {sorted(readable - fast)}; no readable twin: {sorted(fast - readable)}"
    for stem in fast:
        doc = ast.get_docstring(ast.parse((ROOT / "fast" / f"{stem}.py").read_text()))
        assert f"npgpt.layers.{stem}" in doc, f"fast/{stem}.py does not name its readable twin"


MAX_CLASS_LINES, MAX_FUNCTION_LINES = 250, 80


def too_long(path: Path, source: str) -> list:
    """(name, lines, limit) of each class over MAX_CLASS_LINES and each function or method over MAX_FUNCTION_LINES
    in `source` (a definition's lines run from `def` / `class` to its last line: decorators not counted,
    its docstring and comments counted; nested definitions are measured too, and count in their parent)."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                limit = MAX_CLASS_LINES if isinstance(child, ast.ClassDef) else MAX_FUNCTION_LINES
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    found.append((f"{path}:{name}", lines, limit))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_no_class_over_250_lines_and_no_function_over_80():
    """The package stays readable unit by unit (issue 28): tests and benchmarks live outside npgpt/ and are exempt."""
    found = [f for p in sorted(ROOT.rglob("*.py")) for f in too_long(p.relative_to(ROOT.parent).as_posix(), p.read_text())]
    over = [f"{name}: {lines} lines (limit {limit})" for name, lines, limit in found]
    assert not over, "split these into smaller units:\n" + "\n".join(over)


def test_the_length_rule_measures_what_it_says():
    body = "\n".join(f"    x{i} = {i}" for i in range(79))
    method = "\n".join(f"        y{i} = {i}" for i in range(79))
    source = f"def fits():\n{body}\n\ndef over():\n{body}\n    x = 0\n\nclass C:\n    def m(self):\n{method}\n        z = 1\n"
    assert too_long(Path("f.py"), source) == [("f.py:over", 81, 80), ("f.py:C.m", 81, 80)]
    big_class = "class Big:\n" + "\n".join(f"    a{i} = {i}" for i in range(250))
    assert too_long(Path("g.py"), big_class) == [("g.py:Big", 251, 250)]
