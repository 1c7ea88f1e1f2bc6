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

